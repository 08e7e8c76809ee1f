"""``cxrgen evaluate``: the seed papers' metrics for a generator, on held-out prompts.

The judge (``judge.py``, a CXR DenseNet-121 trained on simulator ground truth) is the
classifier of conditioning and the feature extractor for FID / KID, as RoentGen used a
CXR DenseNet-121 (Inception weights cannot be downloaded here). Metrics:

* conditioning AUROC per finding: judge on generated images vs the prompts' labels
  (CXRL: 0.81 mean on MIMIC-CXR);
* effusion detection rate: share of images prompted with a moderate or large effusion
  that the judge calls positive at the threshold that maximises Youden's J on real
  validation images (Chambon et al.: 95 %);
* FID and KID on judge features, generated vs real test images, beside the
  real-vs-real floor of two disjoint real splits;
* MS-SSIM diversity: 4 samples per prompt, mean pairwise (RoentGen), beside the same
  statistic over groups of 4 real images;
* posture: the judge's posture head on generated images, mean absolute rotation from
  the canonical pose (CXRL's posture alignment), beside real images';
* augmentation utility (RoentGen: +5 %): a classifier trained on N real vs N real + M
  synthetic images, AUROC on the real test split.

Procedure of ``evaluate``: 1. data  2. judge  3. generate  4. conditioning  5. FID / KID
6. diversity  7. posture  8. augmentation  9. report.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

import numpy as np
import torch

from ..findings import OBSERVATIONS
from . import judge as J
from .config import EvalConfig  # noqa: F401  (re-exported: the harness API takes it)


EFFUSION = OBSERVATIONS.index("Pleural Effusion")


class ImageSet(torch.utils.data.Dataset):
    """Images in [-1, 1] (N, 1, H, W) with labels, shaped like MimicCXRDataset samples."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        lab = self.labels[i]
        return {"image": self.images[i], "labels": lab, "label_mask": ~torch.isnan(lab), "dicom_id": str(i)}


class JudgeFeatures(torch.nn.Module):
    """torchmetrics feature-extractor adapter: images in [0, 1], any channels -> judge features."""

    def __init__(self, judge: J.CXRJudge):
        super().__init__()
        self.judge = judge.eval()
        self.num_features = judge.n_features

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        x = x.mean(1, keepdim=True) if x.shape[1] != 1 else x
        return self.judge.features(x * 2 - 1)


# --------------------------------------------------------------------------- 1.-3. data, judge, images


def dataset(cfg: EvalConfig, split: str, size: int, gt: bool = True):
    """A split at ``size``; simulator ground truth attached when the data set has it (real data has not)."""
    from ..data.mimic import MimicCXRDataset

    gt = gt and (Path(cfg.data) / "ground_truth.jsonl").is_file()
    return MimicCXRDataset(root=cfg.data, split=split, size=size, normalize="unit", return_ground_truth=gt)


def get_judge(cfg: EvalConfig, size: int | None = None) -> J.CXRJudge:
    """Load --judge, or the one trained into OUT/judge before, or train it now (simulator ground truth).

    A judge trains on the data read at ``size``, the generator's resolution (default: its own input side),
    and resizes to its input side itself: it learns from what it will grade, since the held-out real and
    generated images it reads are at the generator's resolution."""
    path = Path(cfg.judge) if cfg.judge else Path(cfg.out) / "judge"
    if (path / "judge.json").is_file():
        return J.load_judge(path, device=cfg.device)
    if cfg.judge:
        raise FileNotFoundError(f"no judge.json in {path}")
    jc = J.JudgeConfig(arch=cfg.judge_arch, image_size=cfg.judge_size, epochs=cfg.judge_epochs, seed=cfg.seed,
                       device=cfg.device)
    size = size or cfg.judge_size
    return J.train_judge(dataset(cfg, cfg.train_split, size), dataset(cfg, cfg.val_split, size), jc, path)


def take(ds, n: int) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """The first n samples (deterministic): images, labels, ground-truth rows."""
    items = [ds[i] for i in range(min(n, len(ds)))]
    return (torch.stack([it["image"] for it in items]), torch.stack([it["labels"] for it in items]),
            [it.get("ground_truth") or {"prompt": it["prompt"]} for it in items])


def vae_roundtrip(pipe, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Real images through the generator's VAE. Their FID against the real images is the best FID
    the latent model can reach: the autoencoder's share of the generated images' FID."""
    from ..model.components import vae_roundtrip as roundtrip

    return roundtrip(pipe.vae, images, batch_size)


def model_fingerprint(model: str | Path) -> str:
    """sha256 over a checkpoint's weight files (names and bytes): equal means the same generator."""
    import hashlib

    h = hashlib.sha256()
    root = Path(model)
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt")):
        h.update(str(f.relative_to(root)).encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def generate_images(pipe, prompts: list[str], cfg: EvalConfig, seed: int, name: str | None = None,
                    fingerprint: str | None = None, chunk: int = 64) -> torch.Tensor:
    """The images of ``prompts`` ((N, 1, H, W) in [-1, 1]), image i from seed + i, reused from
    OUT/generated/NAME.pt when that file was made by the same weights, prompts, seed and sampler settings:
    evaluating again with another judge does not sample again. They are sampled and kept in chunks of about
    ``chunk`` images (NAME.partK.pt, removed once NAME.pt is written), so an interrupted evaluation resumes
    from its last finished chunk. ``fingerprint``: ``model_fingerprint(cfg.model)`` when the caller already has
    it (one read of the weights per evaluation)."""
    from ..artifacts import cached_tensors
    from ..generation import generate

    size = pipe.vae.config.sample_size

    def sample(part: list[str], first_seed: int) -> torch.Tensor:
        imgs = torch.from_numpy(generate(pipe, part, first_seed, cfg.steps, cfg.guidance, "", cfg.batch_size, size))
        return imgs[:, None] * 2 - 1

    if name is None:
        return sample(prompts, seed)
    import hashlib

    settings = [fingerprint or model_fingerprint(cfg.model), prompts, seed, cfg.steps, cfg.guidance,
                cfg.scheduler, cfg.batch_size, size, cfg.device]
    key = hashlib.sha256(json.dumps(settings).encode()).hexdigest()
    folder = Path(cfg.out) / "generated"
    step = max(1, chunk // cfg.batch_size) * cfg.batch_size  # whole generation batches: the same batches as one run

    def sample_in_chunks() -> torch.Tensor:
        return torch.cat([cached_tensors(folder / f"{name}.part{start // step:04d}.pt", [key, start],
                                         lambda: sample(prompts[start:start + step], seed + start))
                          for start in range(0, len(prompts), step)])

    imgs = cached_tensors(folder / f"{name}.pt", key, sample_in_chunks)
    for part in folder.glob(f"{name}.part*.pt"):
        part.unlink(missing_ok=True)
    return imgs


def diversity_images(pipe, prompts: list[str], cfg: EvalConfig, fingerprint: str) -> torch.Tensor:
    """4 samples of each of the first ``cfg.diversity_prompts`` prompts (seeds from seed + 10,000), kept as
    OUT/generated/diversity.pt: MS-SSIM's images."""
    k = min(cfg.diversity_prompts, len(prompts))
    return generate_images(pipe, [p for p in prompts[:k] for _ in range(4)], cfg, cfg.seed + 10_000, "diversity",
                           fingerprint)


def load_generated(out, name: str = "heldout") -> torch.Tensor:
    """The images an evaluation kept in OUT/generated/NAME.pt (``generate_images``), also from an evaluation
    that wrote the older layout (the images under "images")."""
    blob = torch.load(Path(out) / "generated" / f"{name}.pt", map_location="cpu", weights_only=True)
    return blob["value"] if "value" in blob else blob["images"]


# --------------------------------------------------------------------------- 4.-8. metrics


def youden_threshold(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """The score threshold maximising sensitivity + specificity - 1 on known labels."""
    known = ~torch.isnan(targets)
    s, t = scores[known].numpy(), targets[known].numpy() >= 0.5
    if t.all() or (~t).all():
        return 0.5
    best, thr = -1.0, 0.5
    for c in np.unique(s):
        j = (s[t] >= c).mean() + (s[~t] < c).mean() - 1
        if j > best:
            best, thr = j, float(c)
    return thr


def effusion_detection_rate(probs: torch.Tensor, rows: list[dict], threshold: float) -> float:
    """Share of images prompted with a moderate / large effusion that the judge calls positive."""
    hit = [bool(probs[i, EFFUSION] >= threshold) for i, r in enumerate(rows)
           if any(f["kind"] == "pleural_effusion" and f.get("severity") in ("moderate", "large")
                  for f in r.get("findings", []))]
    return float(np.mean(hit)) if hit else math.nan


def fid_kid(feat: JudgeFeatures, a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """FID and KID (torchmetrics, custom features) between image sets a and b in [-1, 1]."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    fid = FrechetInceptionDistance(feature=feat, normalize=True)
    kid = KernelInceptionDistance(feature=feat, normalize=True, subset_size=min(50, len(a), len(b)))
    for m in (fid, kid):
        m.update((a + 1) / 2, real=True)
        m.update((b + 1) / 2, real=False)
    return float(fid.compute()), float(kid.compute()[0])


def mean_pairwise_msssim(groups: list[torch.Tensor]) -> float:
    """Mean MS-SSIM over all pairs inside each group (images in [-1, 1]).

    Kernel 7 and as many of Wang et al.'s five scales as the image allows (four at
    128 px; torchmetrics' default five scales with kernel 11 need 161 px), their betas
    renormalised.
    """
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as msssim

    size = groups[0].shape[-1]
    scales = max(1, min(5, int(math.log2((size - 1) / 6)) + 1))
    betas = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)[:scales]
    betas = tuple(b / sum(betas) for b in betas)
    vals = []
    for g in groups:
        for i, j in itertools.combinations(range(len(g)), 2):
            x, y = (g[i:i + 1] + 1) / 2, (g[j:j + 1] + 1) / 2
            vals.append(float(msssim(x, y, data_range=1.0, kernel_size=7, betas=betas)))
    return float(np.mean(vals))


def mean_abs_rotation(judge: J.CXRJudge, images: torch.Tensor) -> float:
    """The judge's predicted |roll|, |yaw|, |pitch| averaged: distance from the canonical pose (deg)."""
    _, _, _, pose, _ = J.predict(judge, ImageSet(images, torch.full((len(images), 14), math.nan)))
    rot = [J.POSE_KEYS.index(k) for k in ("roll_deg", "yaw_deg", "pitch_deg")]
    return float(pose[:, rot].abs().mean())


def augmentation_auroc(cfg: EvalConfig, train: ImageSet, test_ds, out: Path) -> float:
    """Mean test AUROC of a classifier trained from scratch on ``train``."""
    jc = J.JudgeConfig(arch=cfg.augment_arch, image_size=train.images.shape[-1], epochs=cfg.augment_epochs,
                       seed=cfg.seed, posture=False, device=cfg.device, batch_size=32)
    clf = J.train_judge(train, None, jc, out)
    probs, labels, mask, _, _ = J.predict(clf, test_ds)
    return J.mean_auroc(J.auroc_per_finding(probs, labels, mask))


# --------------------------------------------------------------------------- 9. report


def save_grid(images: torch.Tensor, captions: list[str], path: Path, cols: int = 4) -> None:
    from PIL import Image, ImageDraw, ImageFont

    n, _, h, w = images.shape
    rows = math.ceil(n / cols)
    strip = 14
    sheet = Image.new("L", (cols * w, rows * (h + strip)), color=255)
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default(size=10)
    for i in range(n):
        x, y = (i % cols) * w, (i // cols) * (h + strip)
        tile = ((images[i, 0].clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
        sheet.paste(Image.fromarray(tile, mode="L"), (x, y + strip))
        draw.text((x + 2, y + 1), captions[i][: w // 6], fill=0, font=font)
    sheet.save(path)


def auroc_plot(gen: dict, real: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k in OBSERVATIONS if not (math.isnan(gen.get(k, math.nan)) and math.isnan(real.get(k, math.nan)))]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(x - 0.2, [real.get(k, math.nan) for k in names], 0.4, label="judge on real test images")
    ax.bar(x + 0.2, [gen.get(k, math.nan) for k in names], 0.4, label="judge on generated (prompt labels)")
    ax.set_xticks(x, names, rotation=35, ha="right", fontsize=8)
    ax.set_ylim(0, 1), ax.axhline(0.5, color="grey", lw=0.5), ax.set_ylabel("AUROC"), ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2)
    fig.tight_layout(), fig.savefig(path, dpi=120), plt.close(fig)


def write_report(m: dict, out: Path) -> None:
    def f(v):
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    extra = f" plus {m['n_prompts_extra']} from the prompts file" if m.get("n_prompts_extra") else ""
    lines = [f"# Evaluation of {m['model_version']}", "", f"Data: `{m['data']}`; {m['n_prompts']} held-out test "
             f"prompts{extra}; {m.get('scheduler', 'ddim')} sampler, {m['steps']} steps, guidance {m['guidance']}.", "",
             "| metric | generated | real |",
             "|---|---|---|",
             f"| conditioning AUROC (mean) | {f(m['conditioning_auroc_mean'])} | {f(m['judge_auroc_real_mean'])} |",
             f"| generated / real AUROC ratio: mean, min | {f(m.get('auroc_ratio_mean'))} | "
             f"min {f(m.get('auroc_ratio_min'))} |",
             f"| judge AUROC on VAE round trips of real images (mean) | | {f(m.get('judge_auroc_vae_mean'))} |",
             f"| panel plausible rate (majority) | {f(m.get('panel_plausible_rate'))} | "
             f"{f(m.get('panel_plausible_rate_real'))} |",
             f"| effusion detection rate (moderate/large) | {f(m['effusion_detection_rate'])} | "
             f"{f(m['effusion_detection_rate_real'])} |",
             f"| FID (judge features) | {f(m['fid'])} | floor {f(m['fid_floor'])} |",
             f"| KID | {f(m['kid'])} | floor {f(m['kid_floor'])} |",
             f"| FID of VAE reconstructions (autoencoder's share) | {f(m['fid_vae_reconstruction'])} | |",
             f"| MS-SSIM, 4 samples per prompt | {f(m['ms_ssim_generated'])} | {f(m['ms_ssim_real'])} |",
             f"| mean abs rotation from canonical (deg) | {f(m['posture_error_deg'])} | "
             f"{f(m['posture_error_deg_real'])} |"]
    luc = m.get("pneumothorax_lucency", {})
    if "real" in luc:
        lines.append(f"| pneumothorax region: intensity vs normal / texture ratio | "
                     f"{f(luc['generated']['delta_intensity'])} / {f(luc['generated']['texture_ratio'])} | "
                     f"{f(luc['real']['delta_intensity'])} / {f(luc['real']['texture_ratio'])} |")
    if "augmentation_auroc_real_only" in m:
        lines.append(f"| augmentation: AUROC real only / real + synthetic | {f(m['augmentation_auroc_real_only'])} | "
                     f"{f(m['augmentation_auroc_real_plus_synthetic'])} |")
    lines += ["", "| finding | positives | AUROC generated | AUROC real | ratio | AUROC VAE round trip |",
              "|---|---|---|---|---|---|"]
    for k, v in m["conditioning_auroc"].items():
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        lines.append(f"| {k} | {m.get('positives', {}).get(k, '')} | {f(v)} | {f(m['judge_auroc_real'].get(k))} | "
                     f"{f(m.get('auroc_ratio', {}).get(k))} | {f(m.get('judge_auroc_vae', {}).get(k))} |")
    lines += ["", "![samples](samples.png)", "", "![auroc](auroc.png)", ""]
    if "real" in luc:
        lines += ["![pneumothorax](pneumothorax.png)", ""]
    (out / "report.md").write_text("\n".join(lines))


def conditioning(judge, real_val, gen: ImageSet, gen_rows, test_imgs, test_labels, test_rows) -> dict:
    """4. Conditioning AUROC and effusion detection (threshold from real validation images)."""
    probs, labels, mask, _, _ = J.predict(judge, gen)
    aurocs = J.auroc_per_finding(probs, labels, mask)
    vp, vl, _, _, _ = J.predict(judge, real_val)
    thr = youden_threshold(vp[:, EFFUSION], vl[:, EFFUSION])
    rp, rl, rm, _, _ = J.predict(judge, ImageSet(test_imgs, test_labels))
    real_aurocs = J.auroc_per_finding(rp, rl, rm)
    return {"conditioning_auroc": aurocs, "conditioning_auroc_mean": J.mean_auroc(aurocs),
            "judge_auroc_real": real_aurocs, "judge_auroc_real_mean": J.mean_auroc(real_aurocs),
            "effusion_threshold": thr, "effusion_detection_rate": effusion_detection_rate(probs, gen_rows, thr),
            "effusion_detection_rate_real": effusion_detection_rate(rp, test_rows, thr)}


def evaluate(cfg: EvalConfig) -> dict:
    """Run every metric; write OUT/metrics.json, report.md, samples.png, auroc.png. With ``cfg.generate_only``:
    sample and keep the images only, and return how many."""
    from ..model.checkpoint import Manifest, load_pipeline

    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    # 1.-2. Data at the generator's resolution, and the judge.
    pipe, manifest = load_pipeline(cfg.model, device=cfg.device)
    from ..generation import set_scheduler

    set_scheduler(pipe, cfg.scheduler)
    size = pipe.vae.config.sample_size
    judge = None if cfg.generate_only else get_judge(cfg, size)
    test_imgs, test_labels, test_rows = take(dataset(cfg, cfg.test_split, size), cfg.n_prompts)
    val_imgs, val_labels, val_rows = take(dataset(cfg, cfg.val_split, size), cfg.n_prompts)
    # 3. One image per held-out prompt: the test split's, then the prompts file's (worded otherwise).
    prompts = [r["prompt"] for r in test_rows]
    extra_prompts, extra_labels, extra_rows = extra_heldout(cfg)
    weights = model_fingerprint(cfg.model)  # the key of the cached images
    all_imgs = generate_images(pipe, prompts + extra_prompts, cfg, cfg.seed, "heldout", weights)
    if cfg.generate_only:  # the diversity images too (step 6's prompts and seeds), then stop
        rep = diversity_images(pipe, prompts, cfg, weights)
        return {"generated": str(out / "generated"), "heldout": len(all_imgs), "diversity": len(rep)}
    gen_imgs, extra_imgs = all_imgs[:len(prompts)], all_imgs[len(prompts):]
    m = {"model_version": manifest.version if manifest else Path(cfg.model).name, "data": cfg.data,
         "n_prompts": len(prompts), "n_prompts_extra": len(extra_prompts), "steps": cfg.steps,
         "guidance": cfg.guidance, "scheduler": cfg.scheduler}
    held_labels = torch.cat([test_labels, extra_labels]) if extra_prompts else test_labels
    m.update(conditioning(judge, ImageSet(val_imgs, val_labels), ImageSet(all_imgs, held_labels),
                          test_rows + extra_rows, test_imgs, test_labels, test_rows))
    m["positives"] = {o: int((held_labels[:, i] == 1).sum()) for i, o in enumerate(OBSERVATIONS)}
    m.update(auroc_ratio(m["conditioning_auroc"], m["judge_auroc_real"]))
    if extra_prompts:
        m["conditioning_auroc_mean_extra"] = J.mean_auroc(judge_aurocs(judge, extra_imgs, extra_labels))
    # 4b. Can the autoencoder carry each finding? The judge on VAE round trips of the real test images.
    rt_test = vae_roundtrip(pipe, test_imgs)
    m["judge_auroc_vae"] = judge_aurocs(judge, rt_test, test_labels)
    m["judge_auroc_vae_mean"] = J.mean_auroc(m["judge_auroc_vae"])
    # 4c. The simulated expert panel's plausibility verdicts (a different network from judge and rewards).
    m.update(panel_rates(cfg, all_imgs, [r.get("findings", []) for r in test_rows + extra_rows], test_imgs,
                         [r.get("findings", []) for r in test_rows]))
    # 4d. Pneumothorax: lucent and without markings, as in real films? (region from real validation films)
    from . import lucency

    try:
        luc = lucency.pneumothorax_lucency(val_imgs, val_rows, test_imgs, test_rows, gen_imgs, test_rows)
        lucency.plot(luc, test_imgs, test_rows, gen_imgs, test_rows, out / "pneumothorax.png")
        luc.pop("_masks")
        m["pneumothorax_lucency"] = luc
    except ValueError as e:  # no normal or no pneumothorax films among the held-out ones
        m["pneumothorax_lucency"] = {"skipped": str(e)}
    # 5. FID / KID on judge features, and the real-vs-real floor (test vs validate).
    feat = JudgeFeatures(judge)
    m["fid"], m["kid"] = fid_kid(feat, test_imgs, gen_imgs)
    m["fid_floor"], m["kid_floor"] = fid_kid(feat, test_imgs, val_imgs)
    m["fid_vae_reconstruction"], _ = fid_kid(feat, test_imgs, vae_roundtrip(pipe, val_imgs))
    m["fid_ratio_to_floor"] = m["fid"] / m["fid_floor"] if m["fid_floor"] else math.nan
    # 6. Diversity: 4 samples per prompt vs groups of 4 real images.
    rep = diversity_images(pipe, prompts, cfg, weights)
    k = len(rep) // 4
    m["ms_ssim_generated"] = mean_pairwise_msssim(list(rep.split(4)))
    m["ms_ssim_real"] = mean_pairwise_msssim(list(test_imgs[: 4 * (len(test_imgs) // 4)][: 4 * k].split(4)))
    # 7. Posture.
    m["posture_error_deg"] = mean_abs_rotation(judge, gen_imgs)
    m["posture_error_deg_real"] = mean_abs_rotation(judge, test_imgs)
    # 8. Augmentation utility.
    if cfg.augment_real > 0:
        m.update(augmentation(cfg, pipe, size, test_imgs, test_labels, out, weights))
    # 9. Report.
    save_grid(gen_imgs[:16], prompts[:16], out / "samples.png")
    auroc_plot(m["conditioning_auroc"], m["judge_auroc_real"], out / "auroc.png")
    m = J._jsonable(m)
    (out / "metrics.json").write_text(json.dumps(m, indent=2) + "\n")
    write_report(m, out)
    return m


def extra_heldout(cfg: EvalConfig) -> tuple[list[str], torch.Tensor, list[dict]]:
    """The prompts file's held-out prompts, their labels (N, 14) and rows shaped like ground-truth rows."""
    from ..findings import labels as finding_labels
    from ..generation import read_prompts_file

    if not cfg.prompts_file:
        return [], torch.zeros(0, len(OBSERVATIONS)), []
    pairs = read_prompts_file(cfg.prompts_file)
    labels = torch.tensor([[finding_labels(fs)[o] for o in OBSERVATIONS] for _, fs in pairs])
    return [p for p, _ in pairs], labels, [{"prompt": p, "findings": [f.to_dict() for f in fs]} for p, fs in pairs]


def judge_aurocs(judge, images: torch.Tensor, labels: torch.Tensor) -> dict:
    probs, lab, mask, _, _ = J.predict(judge, ImageSet(images, labels))
    return J.auroc_per_finding(probs, lab, mask)


def auroc_ratio(gen: dict, real: dict) -> dict:
    """Issue 8's conditioning measure: the judge's AUROC on generated images over its AUROC on real ones,
    per finding (a generated image should carry as much of the finding as a real one, for the same judge)."""
    ratio = {k: gen[k] / real[k] for k in gen
             if gen.get(k) is not None and real.get(k) is not None and not math.isnan(gen[k])
             and not math.isnan(real[k]) and real[k] > 0}
    vals = list(ratio.values())
    return {"auroc_ratio": ratio, "auroc_ratio_mean": float(np.mean(vals)) if vals else math.nan,
            "auroc_ratio_min": float(np.min(vals)) if vals else math.nan}


def panel_rates(cfg: EvalConfig, gen_imgs: torch.Tensor, gen_findings: list, real_imgs: torch.Tensor,
                real_findings: list) -> dict:
    """The panel's majority plausibility rate on the generated images and on the real test films."""
    from ..align.heldout import load_eyes, panel_verdicts

    if cfg.panel == "none":
        return {}
    panel, raters, _ = load_eyes(cfg.panel, None, device=cfg.device)
    if panel is None:
        return {}
    gen = panel_verdicts(panel, raters, gen_imgs, gen_findings, cfg.seed, "evaluate")
    real = panel_verdicts(panel, raters, real_imgs, real_findings, cfg.seed, "evaluate-real")
    return {"panel_plausible_rate": gen["panel_plausible_rate"], "panel_plausible_ratings": gen["panel_plausible_ratings"],
            "panel_plausible_rate_real": real["panel_plausible_rate"], "panel_version": panel.version}


def augmentation(cfg: EvalConfig, pipe, size: int, test_imgs, test_labels, out: Path,
                 fingerprint: str | None = None) -> dict:
    """8. Classifier on N real train images vs N real + M synthetic (prompts of other train studies)."""
    train_ds = dataset(cfg, cfg.train_split, size, gt=False)
    imgs, labels, rows = take(train_ds, cfg.augment_real + cfg.augment_synthetic)
    real = ImageSet(imgs[: cfg.augment_real], labels[: cfg.augment_real])
    syn_prompts = [r["prompt"] for r in rows[cfg.augment_real:]]
    syn = generate_images(pipe, syn_prompts, cfg, cfg.seed + 20_000, "augmentation", fingerprint)
    mixed = ImageSet(torch.cat([real.images, syn]), torch.cat([real.labels, labels[cfg.augment_real:]]))
    test = ImageSet(test_imgs, test_labels)
    return {"augmentation_auroc_real_only": augmentation_auroc(cfg, real, test, out / "aug_real"),
            "augmentation_auroc_real_plus_synthetic": augmentation_auroc(cfg, mixed, test, out / "aug_mixed"),
            "augmentation_n_real": len(real), "augmentation_n_synthetic": len(syn)}
