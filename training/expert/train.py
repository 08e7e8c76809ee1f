"""``cxrgen expert train``: the panel's networks, calibration and held-out metrics.

Phases (``train_panel``):
  1. read the simulated splits (train: fit; validate: calibrate; test: report) and the generated folder
  2. train the reader CNN on ground truth (presence, laterality, severity, pose)
  3. train the realism critic: real films (0) vs generated and corrupted films (1)
  4. calibrate: anatomy bands on train films; real-film tails of every criterion on validate films
  5. measure on test films and held-out generated images; save the panel folder
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from training.evaluate.judge import augment, binary_auroc, posture_error, resolve_device

from . import anatomy
from .calibrate import Tail, fit_groups, fit_quantiles, fit_tail
from .config import (CRITERIA, FORMAT_VERSION, GRADED_KINDS, KIND_NAMES, SEVERITIES, SIDED_KINDS, PanelConfig,
                     related)
from .corrupt import CORRUPTIONS, blur, corrupt
from .data import SimSplit, load_images, load_split, read_generated, stable_fraction
from .nets import Critic, Reader, resize
from .panel import Panel

OTHER_EYES = {1: "the evaluation judge (issue 3)", 3: "the reward models"}  # simulate seeds of the other eyes


# ------------------------------------------------------------------------------- reader


def presence_weights(presence: torch.Tensor, cap: float) -> torch.Tensor:
    """Positive-class weights sqrt(negatives / positives) per kind, in [1, cap]: rare kinds (2-4 % of
    films show a pneumothorax) are not drowned by their negatives, without the instability of full
    inverse-frequency weights. ``cap`` <= 1 turns weighting off."""
    prev = presence.float().mean(0).clamp(min=1e-3)
    return ((1 - prev) / prev).sqrt().clamp(min=1.0, max=max(1.0, cap))


def reader_loss(reader: Reader, x: torch.Tensor, y: dict, cfg: PanelConfig,
                pos_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Presence BCE + side BCE (where present with a side) + severity CE (where graded) + pose MSE."""
    out = reader(x)
    presence = F.binary_cross_entropy_with_logits(out["presence"], y["presence"], pos_weight=pos_weight)
    mask = y["side_mask"][..., None].expand_as(out["side"]).float()
    side = (F.binary_cross_entropy_with_logits(out["side"], y["side"], reduction="none") * mask).sum() \
        / mask.sum().clamp(min=1)
    sev_t = y["severity"].reshape(-1)
    severity = (F.cross_entropy(out["severity"].reshape(-1, len(SEVERITIES)), sev_t.clamp(min=0), reduction="none")
                * (sev_t >= 0)).sum() / (sev_t >= 0).sum().clamp(min=1)
    pose = F.mse_loss(out["pose_z"], (y["pose"] - reader.pose_mean) / reader.pose_std)
    loss = presence + cfg.side_weight * side + cfg.severity_weight * severity + cfg.pose_weight * pose
    parts = {"presence": presence, "side": side, "severity": severity, "pose": pose, "loss": loss}
    return loss, {k: float(v.detach()) for k, v in parts.items()}


def _batch(split: SimSplit, idx: torch.Tensor, device) -> tuple[torch.Tensor, dict]:
    y = {"presence": split.presence[idx], "side": split.side[idx], "side_mask": split.side_mask[idx],
         "severity": split.severity[idx], "pose": split.pose[idx]}
    return split.unit(idx).to(device), {k: v.to(device) for k, v in y.items()}


def _schedule(opt, steps: int):
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))


def train_reader(train: SimSplit, cfg: PanelConfig, device, log_file: Path) -> Reader:
    torch.manual_seed(cfg.seed)
    reader = Reader(cfg.reader_size, cfg.width)
    std = train.pose.std(0, unbiased=False)
    reader.set_pose_stats(train.pose.mean(0), torch.where(std > 1e-6, std, torch.ones_like(std)))
    reader.to(device)
    opt = torch.optim.AdamW(reader.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_batches = math.ceil(len(train) / cfg.batch_size)
    sched = _schedule(opt, cfg.epochs * n_batches)
    g, aug = torch.Generator().manual_seed(cfg.seed), torch.Generator().manual_seed(cfg.seed + 1)
    pos_weight = presence_weights(train.presence, cfg.pos_weight_max).to(device)
    for epoch in range(1, cfg.epochs + 1):
        t0, parts = time.perf_counter(), []
        reader.train()
        for idx in torch.randperm(len(train), generator=g).split(cfg.batch_size):
            x, y = _batch(train, idx, device)
            loss, p = reader_loss(reader, augment(x, cfg.jitter, aug), y, cfg, pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            parts.append(p)
        _log(log_file, {"stage": "reader", "epoch": epoch, **_mean(parts), "seconds": time.perf_counter() - t0})
    return reader.eval()


# ------------------------------------------------------------------------------- critic


def critic_batch(train: SimSplit, idx: torch.Tensor, generated: torch.Tensor | None, cfg: PanelConfig,
                 g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Real films ``idx`` (label 0) and as many fakes (label 1): half corrupted films, half generated.

    Returned at the critic's size, each image blurred by its own sigma ~ U(0, critic_blur) (real
    and fake alike, so sharpness carries no label) and intensity-jittered.
    """
    real = train.unit(idx)
    n_gen = 0 if generated is None or len(generated) == 0 else len(idx) // 2
    src = torch.randint(0, len(train), (len(idx) - n_gen,), generator=g)
    fakes = [corrupt(train.unit(src), g)[0]]
    if n_gen:
        fakes.append(resize(generated[torch.randint(0, len(generated), (n_gen,), generator=g)], real.shape[-1]))
    x = resize(torch.cat([real, *fakes]), cfg.critic_size)
    y = torch.cat([torch.zeros(len(real)), torch.ones(len(x) - len(real))])
    sigma = torch.rand(len(x), generator=g) * cfg.critic_blur * cfg.critic_size / cfg.reader_size
    return augment(blur(x, sigma), cfg.jitter, g), y


def train_critic(train: SimSplit, generated: torch.Tensor | None, cfg: PanelConfig, device,
                 log_file: Path) -> Critic:
    torch.manual_seed(cfg.seed + 2)
    critic = Critic(cfg.critic_size, cfg.critic_sigma).to(device)
    opt = torch.optim.AdamW(critic.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = _schedule(opt, cfg.critic_epochs * math.ceil(len(train) / cfg.batch_size))
    g = torch.Generator().manual_seed(cfg.seed + 3)
    for epoch in range(1, cfg.critic_epochs + 1):
        t0, losses = time.perf_counter(), []
        critic.train()
        for idx in torch.randperm(len(train), generator=g).split(cfg.batch_size):
            x, y = critic_batch(train, idx, generated, cfg, g)
            loss = F.binary_cross_entropy_with_logits(critic(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        _log(log_file, {"stage": "critic", "epoch": epoch, "loss": float(np.mean(losses)),
                        "seconds": time.perf_counter() - t0})
    return critic.eval()


# -------------------------------------------------------------------------- calibration


def calibrate(raw: dict, split: SimSplit, bands: dict) -> dict:
    """Real-film tails of every criterion's raw measurement, from the validation films."""
    logits, present = raw["presence"], split.presence.numpy() > 0.5
    pos = {k: logits[present[:, j], j] for j, k in enumerate(KIND_NAMES)}
    neg = {}
    for j, k in enumerate(KIND_NAMES):
        clear = ~present[:, [KIND_NAMES.index(r) for r in related(k)]].any(1)
        neg[k] = logits[clear, j]
    on, off = {}, {}
    side_t, side_m = split.side.numpy() > 0.5, split.side_mask.numpy()
    for j, k in enumerate(SIDED_KINDS):
        v, t = raw["side"][side_m[:, j], j], side_t[side_m[:, j], j]
        on[k], off[k] = v[t], v[~t]
    size = {}
    grades = np.arange(len(SEVERITIES))
    for j, k in enumerate(GRADED_KINDS):
        known = split.severity[:, j].numpy() >= 0
        size[k] = np.abs(raw["severity"][known, j] @ grades - split.severity[known, j].numpy())
    excess = anatomy.excess(raw["anatomy"], bands).max(1)
    rotation = np.sqrt((raw["pose"][:, :3] ** 2).sum(1))
    # Priors, used only when the validation films hold no example at all (tiny smoke-test data):
    # logits centred on 0 with a wide scale, a grade error of half a step.
    on_prior, off_prior = Tail(0.0, 2.0, False), Tail(0.0, 2.0, True)
    return {
        "presence_pos": _tails(fit_groups(pos, upper=False, min_scale=0.25, prior=on_prior)),
        "presence_neg": _tails(fit_groups(neg, upper=True, min_scale=0.25, prior=off_prior)),
        "side_on": _tails(fit_groups(on, upper=False, min_scale=0.25, prior=on_prior)),
        "side_off": _tails(fit_groups(off, upper=True, min_scale=0.25, prior=off_prior)),
        "size": _tails(fit_groups(size, upper=True, min_scale=0.1, prior=Tail(0.5, 0.5, True))),
        "anatomy": fit_tail(excess, upper=True, min_scale=0.02).to_dict(),
        "artefact": fit_tail(raw["critic"], upper=True, min_scale=0.25).to_dict(),
        "anatomy_bands": bands,
        "rotation_deg_percentiles": {str(q): float(np.percentile(rotation, q)) for q in (50, 90, 95, 99)},
    }


def criterion_tails(panel: Panel, split: SimSplit) -> dict:
    """Second level: the real-film quantiles of each criterion's per-image worst evidence, each film
    assessed against its own ground-truth findings (what a correct generation would show)."""
    assert not panel.meta["calibration"].get("criteria"), "first-level calibration only"
    worst: dict[str, list[float]] = {c: [] for c in CRITERIA}
    for a in panel.assess(split.unit(), split.findings):
        for c, v in a.evidence().items():
            if v is not None:
                worst[c].append(v)
    # A criterion no validation film exercised keeps the identity (z stays z).
    return {c: fit_quantiles(v, min_step=0.01).to_dict() for c, v in worst.items() if len(v) >= 2}


def _tails(tails: dict) -> dict:
    return {k: t.to_dict() for k, t in tails.items()}


# ------------------------------------------------------------------------------ metrics


def reader_metrics(raw: dict, split: SimSplit) -> dict:
    """Test-split AUROC per kind (and mean), laterality and severity accuracy, pose MAE."""
    aurocs = {k: binary_auroc(raw["presence"][:, j], split.presence[:, j]) for j, k in enumerate(KIND_NAMES)}
    defined = [v for v in aurocs.values() if not math.isnan(v)]
    side_ok, sev_ok = [], []
    for j in range(len(SIDED_KINDS)):
        m = split.side_mask[:, j].numpy() & (split.side[:, j].sum(1).numpy() == 1)  # unilateral only
        side_ok += list(raw["side"][m, j].argmax(1) == split.side[m, j].numpy().argmax(1))
    for j in range(len(GRADED_KINDS)):
        m = split.severity[:, j].numpy() >= 0
        sev_ok += list(raw["severity"][m, j].argmax(1) == split.severity[m, j].numpy())
    return {
        "reader_auroc": aurocs, "reader_mean_auroc": float(np.mean(defined)) if defined else math.nan,
        "laterality_accuracy": float(np.mean(side_ok)) if side_ok else math.nan, "laterality_n": len(side_ok),
        "severity_accuracy": float(np.mean(sev_ok)) if sev_ok else math.nan, "severity_n": len(sev_ok),
        "pose_mae": posture_error(raw["pose"], split.pose.numpy()),
    }


@torch.no_grad()
def critic_metrics(panel: Panel, test: SimSplit, real_raw: dict, generated: torch.Tensor | None,
                   seed: int) -> dict:
    """AUROC real test films vs held-out generated images, and vs corrupted test films (per kind)."""
    real = real_raw["critic"]
    out: dict = {}
    if generated is not None and len(generated):
        gen = panel.read(generated)
        out["critic_auroc_real_vs_generated"] = binary_auroc(np.r_[real, gen["critic"]],
                                                             np.r_[np.zeros(len(real)), np.ones(len(gen["critic"]))])
        out["generated_anatomy_excess_mean"] = float(anatomy.excess(gen["anatomy"], panel.bands).max(1).mean())
    g = torch.Generator().manual_seed(seed + 4)
    bad, kinds = corrupt(test.unit(), g)
    bad_raw = panel.read(bad)
    y = np.r_[np.zeros(len(real)), np.ones(len(bad))]
    out["critic_auroc_real_vs_corrupted"] = binary_auroc(np.r_[real, bad_raw["critic"]], y)
    kinds = np.array(kinds)
    out["critic_auroc_by_corruption"] = {
        k: binary_auroc(np.r_[real, bad_raw["critic"][kinds == k]],
                        np.r_[np.zeros(len(real)), np.ones((kinds == k).sum())])
        for k in CORRUPTIONS if (kinds == k).any()}
    excess = anatomy.excess(bad_raw["anatomy"], panel.bands).max(1)
    out["anatomy_auroc_real_vs_corrupted"] = binary_auroc(
        np.r_[anatomy.excess(real_raw["anatomy"], panel.bands).max(1), excess], y)
    return out


# --------------------------------------------------------------------------------- main


def _split_generated(folder: str | Path | None, holdout: float, size: int) -> tuple[torch.Tensor | None, ...]:
    """Generated images, split by a hash of the file name into (train, held-out)."""
    if folder is None:
        return None, None
    images = read_generated(folder)
    held = [stable_fraction(im.path.name) < holdout for im in images]
    train = [im.path for im, h in zip(images, held) if not h]
    test = [im.path for im, h in zip(images, held) if h]
    return load_images(train, size), load_images(test, size)


def check_data_seed(root: Path) -> int | None:
    """The simulate seed of ``root``; refuses the other eyes' data (DESIGN.md: three separate eyes)."""
    path = Path(root) / "simulate_config.json"
    if not path.is_file():
        return None
    seed = json.loads(path.read_text()).get("seed")
    if seed in OTHER_EYES:
        raise ValueError(f"{root} was simulated with --seed {seed}, the data of {OTHER_EYES[seed]}; the panel is "
                         f"a separate eye and trains on its own data (cxrgen simulate --seed 2 --out runs/sim-panel)")
    if seed != 2:
        print(f"expert train: warning: {root} was simulated with --seed {seed}; the panel's data is --seed 2",
              file=sys.stderr)
    return seed


def train_panel(data: str | Path, generated: str | Path | None, out: str | Path, cfg: PanelConfig) -> Panel:
    """Train, calibrate, measure and save a panel into ``out`` (see the module docstring)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train_panel(data, generated, out, cfg)
    finally:
        torch.set_num_threads(threads)


def _train_panel(data: str | Path, generated: str | Path | None, out: str | Path, cfg: PanelConfig) -> Panel:
    device = resolve_device(cfg.device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = out / "train_log.jsonl"
    log_file.write_text("")
    # 1. data
    seed = check_data_seed(Path(data))
    train, val, test = (load_split(data, s, cfg.reader_size, cfg.limit) for s in ("train", "validate", "test"))
    gen_train, gen_test = _split_generated(generated, cfg.generated_holdout, cfg.reader_size)
    # 2-3. networks
    reader = train_reader(train, cfg, device, log_file)
    critic = train_critic(train, gen_train, cfg, device, log_file)
    # 4. calibration
    panel = Panel(reader.cpu(), critic.cpu(), anatomy.mean_film(train.unit()), _meta(cfg))
    bands = anatomy.bands(anatomy.features(train.unit(), panel.mean_film).numpy(), cfg.anatomy_band)
    val_raw = panel.read(val.unit())
    panel.set_calibration(calibrate(val_raw, val, bands))
    panel.set_calibration({**panel.meta["calibration"], "criteria": criterion_tails(panel, val)})
    # 5. metrics
    test_raw = panel.read(test.unit())
    panel.meta["metrics"] = {**reader_metrics(test_raw, test),
                             **critic_metrics(panel, test, test_raw, gen_test, cfg.seed)}
    panel.meta["data"] = {"root": str(data), "simulate_seed": seed, "train": len(train), "validate": len(val),
                          "test": len(test), "generated": None if generated is None else str(generated),
                          "generated_train": 0 if gen_train is None else len(gen_train),
                          "generated_heldout": 0 if gen_test is None else len(gen_test)}
    panel.save(out)
    return panel


def _meta(cfg: PanelConfig) -> dict:
    from .raters import DEFAULT_RATERS

    return {
        "format": FORMAT_VERSION, "config": dataclasses.asdict(cfg), "criteria": list(CRITERIA),
        "kinds": list(KIND_NAMES), "sided_kinds": list(SIDED_KINDS), "graded_kinds": list(GRADED_KINDS),
        "anatomy_features": anatomy.FEATURES,
        "raters": [r.to_dict() for r in DEFAULT_RATERS],
    }


def _mean(parts: list[dict]) -> dict:
    return {k: float(np.mean([p[k] for p in parts])) for k in parts[0]} if parts else {}


def _log(path: Path, entry: dict) -> None:
    """One line per epoch: to train_log.jsonl and, as progress for a run of minutes, to stdout."""
    print("expert train:", json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in entry.items()}),
          flush=True)
    with path.open("a") as f:
        f.write(json.dumps(entry) + "\n")
