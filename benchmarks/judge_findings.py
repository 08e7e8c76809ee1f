"""Why the evaluation judge is weak on two findings (issue 8's judge prerequisite): its real-image AUROC per
simulated finding kind, and per lesion size.

A CheXpert label such as Lung Lesion is made positive by several simulated kinds (calcified granuloma, nodule,
mass); the judge may see some and not others. For each label below 0.85 (or --labels), each kind that makes it
positive is scored on its own: positives = images with that kind, negatives = images where the label is 0
(the same negatives for every kind). Lesions are also split by diameter. Reads the simulator's ground truth,
so it runs on simulated data only.

``--generated EVAL_FOLDER`` asks the same of a generator: the images ``cxrgen evaluate`` made for the test
prompts (kept in EVAL_FOLDER/generated/heldout.pt, one per test film, in order) are scored beside the real films,
kind by kind, with the ratio generated / real: which lesions the generator draws, and which it leaves out.

Usage: python benchmarks/judge_findings.py [--judge runs/judge256] [--data runs/sim256-judge] [--split test]
                                           [--size 128] [--labels L1,L2] [--generated EVAL_FOLDER] [--out FILE]
Writes benchmarks/results/judge-findings-cpu.json (or --out) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from simulate import machine  # noqa: E402

SIZE_BINS = ((0, 10), (10, 20), (20, 35), (35, 1000))  # lesion diameter, mm


def kinds_of(rows: list[dict], label: str) -> list[str]:
    """The simulated kinds that appear in images positive for ``label`` (sorted by count, most first)."""
    from collections import Counter

    c = Counter(f["kind"] for r in rows if r["labels"].get(label) == 1.0 for f in r["findings"])
    # A kind belongs to the label when every image that has it is positive for it.
    own = [k for k, _ in c.most_common()
           if all(r["labels"].get(label) == 1.0 for r in rows if any(f["kind"] == k for f in r["findings"]))]
    return own


def auroc_subset(scores, rows, label: str, keep) -> tuple[float | None, int]:
    """AUROC of ``scores`` with positives = rows where ``keep(row)``, negatives = rows negative for ``label``."""
    import numpy as np

    from training.evaluate.judge import binary_auroc

    pos = [i for i, r in enumerate(rows) if keep(r)]
    neg = [i for i, r in enumerate(rows) if r["labels"].get(label) == 0.0]
    if not pos or not neg:
        return None, len(pos)
    idx = pos + neg
    y = np.array([1.0] * len(pos) + [0.0] * len(neg))
    return float(binary_auroc(scores[idx], y)), len(pos)


def spot_maps(judge, ds, batch_size: int = 32):
    """The spot head's (N, h, w) cell probabilities and the films (N, H, W) in [0, 1], in ``ds`` order."""
    import torch

    maps, films = [], []
    with torch.no_grad():
        for i in range(0, len(ds), batch_size):
            x = torch.stack([ds[j]["image"] for j in range(i, min(i + batch_size, len(ds)))])
            maps.append(torch.sigmoid(judge(x)["spot"][:, 0].float()))
            films.append((x[:, 0] + 1) / 2)
    return torch.cat(maps), torch.cat(films)


def spot_pointing(judge, ds, rows: list[dict], data: Path, figure: Path | None, k: int = 8) -> tuple[dict, str]:
    """Does the spot head look where the lesion is? For each film showing one of the head's kinds, whether its
    most confident cell touches the finding's mask (the pointing game: the mask's cells, grown by one cell),
    per kind; and its most confident cell on films with no lesion (what it finds where there is nothing)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from training.simulator.masks import load_masks

    kinds = judge.meta.get("spot_kinds") or []
    maps, films = spot_maps(judge, ds)
    h = maps.shape[-1]
    out, lines = {"kinds": kinds, "by_kind": {}}, ["| spot head: kind | films | best cell on the finding |",
                                                   "|---|---|---|"]
    for kind in kinds:
        table, _ = load_masks(data, (kind,))
        hits = []
        for i, r in enumerate(rows):
            if r["dicom_id"] in table and table[r["dicom_id"]].any():
                m = F.adaptive_max_pool2d(torch.from_numpy(table[r["dicom_id"]].astype(np.float32))[None], h)
                m = F.max_pool2d(m[None], 3, 1, 1)[0, 0] > 0  # grown by one cell
                hits.append(bool(m.flatten()[int(maps[i].argmax())]))
        out["by_kind"][kind] = {"n": len(hits), "pointing": float(np.mean(hits)) if hits else None}
        if hits:
            lines.append(f"| {kind} | {len(hits)} | {np.mean(hits):.3f} |")
    clean = [i for i, r in enumerate(rows) if not any(f["kind"] in kinds for f in r["findings"])]
    lesion = [i for i, r in enumerate(rows) if any(f["kind"] in kinds for f in r["findings"])]
    best = maps.flatten(1).amax(1).numpy()
    out["best_cell_median"] = {"with_lesion": float(np.median(best[lesion])) if lesion else None,
                               "without": float(np.median(best[clean])) if clean else None}
    if figure is not None and lesion:
        union, _ = load_masks(data, tuple(kinds))
        side = films.shape[-1]
        tiles = []
        for i in lesion[:k]:
            g = films[i].numpy()
            heat = F.interpolate(maps[i][None, None], size=(side, side), mode="nearest")[0, 0].numpy()
            rgb = np.stack([np.clip(g + 0.6 * heat, 0, 1), g * (1 - 0.4 * heat), g * (1 - 0.4 * heat)], -1)
            m = torch.from_numpy(union[rows[i]["dicom_id"]].astype(np.float32))[None, None]
            m = F.interpolate(m, size=(side, side), mode="nearest")[0, 0]
            edge = (F.max_pool2d(m[None, None], 3, 1, 1)[0, 0] - m).numpy() > 0
            rgb[edge] = (0.1, 1.0, 0.1)
            tiles.append(np.concatenate([np.stack([g] * 3, -1), rgb], 0))
        from PIL import Image

        figure.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.concatenate(tiles, 1) * 255).astype(np.uint8)).save(figure)
        out["figure"] = str(figure.relative_to(REPO)) if figure.is_relative_to(REPO) else str(figure)
    return out, "\n".join(lines)


def generated_images(folder: Path, data: str, n_test: int):
    """The images ``cxrgen evaluate`` generated for the first test prompts of ``data`` (N, 1, H, W), read from
    FOLDER/generated/heldout.pt; a SystemExit naming the problem when the folder holds another data set's
    evaluation or none."""
    import torch

    metrics, cache = folder / "metrics.json", folder / "generated" / "heldout.pt"
    if not metrics.is_file() or not cache.is_file():
        raise SystemExit(f"judge_findings: --generated {folder}: no finished cxrgen evaluate there "
                         f"(needs metrics.json and generated/heldout.pt)")
    m = json.loads(metrics.read_text())
    if (REPO / m["data"]).resolve() != Path(data).resolve():
        raise SystemExit(f"judge_findings: --generated {folder} evaluated {m['data']}, not --data {data}")
    images = torch.load(cache, weights_only=True)["value"][: m["n_prompts"]]
    if len(images) != m["n_prompts"] or m["n_prompts"] > n_test:
        raise SystemExit(f"judge_findings: --generated {folder}: {len(images)} images for {m['n_prompts']} "
                         f"test prompts of {n_test} test films")
    return images


def pair_figure(real, gen, rows: list[dict], kinds: list[str], path: Path, k: int = 3) -> None:
    """PNG of the first ``k`` test films showing each of ``kinds``: the real film above the image generated for
    its report (same order as the tables)."""
    stack_figure(rows, kinds, [k] * len(kinds), lambda i: [real[i, 0], gen[i, 0]], path)


def stack_figure(rows: list[dict], kinds, per_kind, films_of, path: Path) -> int:
    """PNG of columns, one per test film: for each kind the first ``per_kind`` films (of ``rows``, the test split's
    ground truth) showing it, each column ``films_of(i)``'s (H, W) images in [-1, 1], stacked top to bottom.
    Returns the columns drawn (no file when none)."""
    import numpy as np
    from PIL import Image

    cols = []
    for kind, k in zip(kinds, per_kind):
        for i in [i for i, r in enumerate(rows) if any(f["kind"] == kind for f in r["findings"])][:k]:
            cols.append(np.concatenate([(f.numpy() + 1) / 2 for f in films_of(i)], 0))
    if cols:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.concatenate(cols, 1).clip(0, 1) * 255).astype(np.uint8)).save(path)
    return len(cols)


def label_table(s, rows: list[dict], label: str, real=None) -> tuple[dict, list[str]]:
    """``label``'s AUROC per simulated kind and per lesion diameter from scores ``s`` (one per row); with
    ``real`` (the same, from real films) each line also gives the real AUROC and the ratio."""
    def line(name, n, auc, ref):
        if real is None:
            return f"| {label} | {name} | {n} | {auc:.3f} |" if auc is not None else f"| {label} | {name} | {n} | |"
        r = ref.get("auroc") if ref else None
        ratio = f" ({auc / r:.2f})" if auc is not None and r else ""
        return f"| {label} | {name} | {n} | {r:.3f} | {auc:.3f}{ratio} |" if auc is not None and r is not None \
            else f"| {label} | {name} | {n} | | |"

    ref = real or {"by_kind": {}, "by_lesion_diameter": {}}
    out, lines = {"by_kind": {}, "by_lesion_diameter": {}}, []
    for kind in kinds_of(rows, label):
        auc, n = auroc_subset(s, rows, label, lambda r, k=kind: any(f["kind"] == k for f in r["findings"]))
        out["by_kind"][kind] = {"n": n, "auroc": auc}
        lines.append(line(kind, n, auc, ref["by_kind"].get(kind)))
    for lo, hi in SIZE_BINS:
        def keep(r, lo=lo, hi=hi):
            return r["labels"].get(label) == 1.0 and any(
                lo <= (f.get("params") or {}).get("diameter_mm", -1) < hi for f in r["findings"])
        auc, n = auroc_subset(s, rows, label, keep)
        if n:
            out["by_lesion_diameter"][f"{lo}-{hi} mm"] = {"n": n, "auroc": auc}
            lines.append(line(f"lesion {lo}-{hi} mm", n, auc, ref["by_lesion_diameter"].get(f"{lo}-{hi} mm")))
    auc, n = auroc_subset(s, rows, label, lambda r: r["labels"].get(label) == 1.0)
    out["auroc"] = auc
    lines.append(line("all", n, auc, ref))
    return out, lines


def main() -> int:
    from training.evaluate.judge import OBSERVATIONS, auroc_per_finding, load_judge, predict
    from training.evaluate.config import EvalConfig
    from training.evaluate.harness import ImageSet, dataset
    from training.simulator.masks import LESION_KINDS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--judge", default="runs/judge256")
    p.add_argument("--data", default="runs/sim256-judge")
    p.add_argument("--split", default="test")
    p.add_argument("--size", type=int, default=128, help="the resolution the images are read at (the generator's)")
    p.add_argument("--labels", default=None, help="comma-separated labels (default: those with AUROC < 0.85)")
    p.add_argument("--generated", default=None, metavar="EVAL_FOLDER",
                   help="a cxrgen evaluate folder of --data: score its test prompts' generated images beside the "
                        "real films, kind by kind")
    p.add_argument("--out", default="benchmarks/results/judge-findings-cpu.json", help="results file")
    p.add_argument("--figure", default=None,
                   help="a judge with a spot head: PNG of test films with lesions, the head's cells (red) and the "
                        "finding masks (green outline); with --generated: real films of each lesion kind above the "
                        "images generated for their reports")
    a = p.parse_args()
    if not (REPO / a.data / "ground_truth.jsonl").is_file():
        p.error(f"{a.data} has no ground_truth.jsonl: this diagnostic needs simulated data")
    if a.generated and a.split != "test":
        p.error("--generated: cxrgen evaluate generates for the test split's prompts; drop --split")
    judge = load_judge(REPO / a.judge)
    ds = dataset(EvalConfig(out="/dev/null", data=str(REPO / a.data)), a.split, a.size)
    gen = generated_images(REPO / a.generated, str(REPO / a.data), len(ds)) if a.generated else None
    n = len(gen) if gen is not None else len(ds)
    if gen is not None:  # the real films of the same prompts, at the generated images' side
        import torch

        items = [ds[i] for i in range(n)]  # each film decoded once
        real = torch.stack([it["image"] for it in items])
        if real.shape[-1] != gen.shape[-1]:
            p.error(f"--generated: its images are {gen.shape[-1]} px; give --size {gen.shape[-1]}")
        labels_n = torch.stack([it["labels"] for it in items])
        probs, labels, mask, _, _ = predict(judge, ImageSet(real, labels_n))
        gprobs, _, _, _, _ = predict(judge, ImageSet(gen, labels_n))
        rows = [it["ground_truth"] for it in items]
    else:
        probs, labels, mask, _, _ = predict(judge, ds)
        rows = [ds[i]["ground_truth"] for i in range(n)]  # the simulator's row of each image, in order
    overall = auroc_per_finding(probs, labels, mask)
    names = a.labels.split(",") if a.labels else [k for k, v in overall.items() if v is not None and v < 0.85]
    result = {"benchmark": "judge-findings", "device": machine(), "judge": a.judge,
              "judge_config": judge.meta.get("config"), "data": a.data,
              "split": a.split, "size": a.size, "n_images": len(rows),
              "auroc": {k: v for k, v in overall.items() if v is not None}, "labels": {}}
    if gen is not None:
        result.update(generated=a.generated, generated_auroc={
            k: v for k, v in auroc_per_finding(gprobs, labels, mask).items() if v is not None}, generated_labels={})
        lines = ["| label | positives by | n | AUROC real | AUROC generated (ratio) |", "|---|---|---|---|---|"]
    else:
        lines = ["| label | positives by | n | AUROC |", "|---|---|---|---|"]
    for label in names:
        j = OBSERVATIONS.index(label)
        result["labels"][label], text = label_table(probs[:, j].numpy(), rows, label)
        if gen is not None:
            result["generated_labels"][label], text = label_table(gprobs[:, j].numpy(), rows, label,
                                                                  result["labels"][label])
        lines += text
    if gen is not None and a.figure:
        kinds = list(dict.fromkeys(k for label in names for k in kinds_of(rows, label)
                                   if k in LESION_KINDS))
        pair_figure(real, gen, rows, kinds or kinds_of(rows, names[0]), REPO / a.figure)
        result["figure"] = a.figure
    if judge.spot and gen is None:
        result["spot"], text = spot_pointing(judge, ds, rows, REPO / a.data, REPO / a.figure if a.figure else None)
        lines += ["", text]
    out = REPO / a.out
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
