"""Does a generator put a sided finding on the prompted side? The judge's AUROC does not ask (a right effusion
drawn on the left scores as an effusion), so this reads the images ``cxrgen evaluate`` kept.

For every test exam of --data with a sided finding (its ground truth names the kind and the side) the left-right
asymmetry of the film is measured: mean brightness of the image's left half minus its right half (the patient's
right is on the image's left), less the median over all films of the same source. Per kind, the side separation
is the mean asymmetry of right-sided exams minus that of left-sided ones: positive for a finding that whitens
(effusion, consolidation), negative for one that darkens (pneumothorax). A generator's images of the same prompts
(image i from the prompt of exam i, as ``cxrgen evaluate`` made them) should separate the sides the same way:
``ratio`` = generated separation / real separation (1: as real films; 0: the words' side is ignored; < 0: drawn
on the other side), kept for kinds whose real separation is clear (|t| >= 3).

Usage: python benchmarks/laterality.py NAME=EVAL_FOLDER [NAME=EVAL_FOLDER ...] [--data runs/sim256-judge]
                                       [--n 600] [--out FILE]
EVAL_FOLDER is a ``cxrgen evaluate --out`` folder evaluated on --data's first --n test prompts; its
generated/heldout.pt is read, nothing is sampled. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SIDES = ("right", "left")


def asymmetry(images) -> np.ndarray:
    """(N,) image-left half minus image-right half mean brightness of (N, 1, H, W) or (N, H, W) images."""
    x = np.asarray(images, dtype=np.float64).reshape(len(images), -1, np.shape(images)[-1])
    half = x.shape[-1] // 2
    return x[:, :, :half].mean(axis=(1, 2)) - x[:, :, -half:].mean(axis=(1, 2))


def sided(rows: list[dict]) -> dict[str, dict[str, list[int]]]:
    """kind -> side -> indices of the exams (ground-truth rows) with that kind on that side only."""
    out: dict[str, dict[str, list[int]]] = {}
    for i, row in enumerate(rows):
        for f in row.get("findings", []):
            if f.get("side") in SIDES:
                out.setdefault(f["kind"], {s: [] for s in SIDES})[f["side"]].append(i)
    return out


def separation(asym: np.ndarray, groups: dict[str, list[int]]) -> tuple[float, float]:
    """(right minus left mean asymmetry, its t statistic) for one kind's groups of exams."""
    r, l = asym[groups["right"]], asym[groups["left"]]
    sep = float(r.mean() - l.mean())
    se = float(np.sqrt(r.var(ddof=1) / len(r) + l.var(ddof=1) / len(l))) if len(r) > 1 and len(l) > 1 else float("inf")
    return sep, sep / se if se > 0 else 0.0


def laterality(real, generated: dict, rows: list[dict], min_n: int = 5, min_t: float = 3.0) -> dict:
    """Per kind with >= ``min_n`` exams on each side: real and generated separations, t, and ratio; per source the
    median-centred asymmetry is used. ``generated``: name -> images in the same order as ``real`` and ``rows``."""
    a_real = asymmetry(real)
    a_real = a_real - np.median(a_real)
    a_gen = {n: asymmetry(g) for n, g in generated.items()}
    a_gen = {n: a - np.median(a) for n, a in a_gen.items()}
    kinds = {}
    for kind, groups in sorted(sided(rows).items()):
        if min(len(groups["right"]), len(groups["left"])) < min_n:
            continue
        sep, t = separation(a_real, groups)
        row = {"n_right": len(groups["right"]), "n_left": len(groups["left"]), "real": sep, "real_t": t,
               "clear": abs(t) >= min_t, "models": {}}
        for n, a in a_gen.items():
            g, gt = separation(a, groups)
            row["models"][n] = {"separation": g, "t": gt, "ratio": g / sep if sep else None}
        kinds[kind] = row
    summary = {}
    for n in generated:
        ratios = [k["models"][n]["ratio"] for k in kinds.values() if k["clear"]]
        summary[n] = {"kinds": len(ratios), "ratio_mean": float(np.mean(ratios)) if ratios else None,
                      "same_side": int(sum(r > 0 for r in ratios))}
    return {"kinds": kinds, "summary": summary}


def table(result: dict) -> str:
    names = list(result["summary"])
    rows = ["| kind | right / left exams | real separation (t) | " + " | ".join(f"{n}: separation (ratio)" for n in names) + " |",
            "|" + "---|" * (3 + len(names))]
    for kind, k in result["kinds"].items():
        cells = [f"{k['models'][n]['separation']:+.3f} ({k['models'][n]['ratio']:+.2f})" for n in names]
        mark = "" if k["clear"] else " (not clear)"
        rows.append(f"| {kind}{mark} | {k['n_right']} / {k['n_left']} | {k['real']:+.3f} ({k['real_t']:+.1f}) | "
                    + " | ".join(cells) + " |")
    rows.append("| **mean ratio, clear kinds (same side / kinds)** | | | " + " | ".join(
        f"{s['ratio_mean']:.2f} ({s['same_side']} / {s['kinds']})" if s["ratio_mean"] is not None else "-"
        for s in result["summary"].values()) + " |")
    return "\n".join(rows)


def main() -> int:
    import torch

    from simulate import machine

    from training.evaluate.config import EvalConfig
    from training.evaluate.harness import dataset, load_generated, take

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", metavar="NAME=EVAL_FOLDER")
    p.add_argument("--data", default="runs/sim256-judge", help="the data the evaluations used (its test split)")
    p.add_argument("--n", type=int, default=600, help="the evaluations' --n-prompts")
    p.add_argument("--size", type=int, default=128, help="the generators' side (real films are read at it)")
    p.add_argument("--out", help="results JSON")
    a = p.parse_args()
    folders = {}
    for text in a.models:
        name, eq, folder = text.partition("=")
        path = REPO / folder / "generated" / "heldout.pt"
        if not (eq and name and folder):
            p.error(f"{text!r}: expected NAME=EVAL_FOLDER")
        if not path.is_file():
            p.error(f"{folder}: no generated/heldout.pt (run cxrgen evaluate --out {folder} first)")
        folders[name] = folder
    if not (REPO / a.data / "ground_truth.jsonl").is_file():
        p.error(f"--data {a.data}: no ground_truth.jsonl (simulated data only: the sides come from it)")
    real, _, rows = take(dataset(EvalConfig(out="/dev/null", data=str(REPO / a.data)), "test", a.size), a.n)
    generated = {}
    for name, folder in folders.items():
        images = load_generated(REPO / folder)
        if len(images) < len(real) or images.shape[-1] != real.shape[-1]:
            p.error(f"{folder}: {tuple(images.shape)} images do not cover the {len(real)} test prompts at {a.size} px")
        generated[name] = images[:len(real)].numpy()
    result = laterality(real.numpy(), generated, rows)
    if a.out:
        Path(a.out).write_text(json.dumps({"benchmark": "laterality", "device": machine(), "data": a.data,
                                           "n_prompts": a.n, "models": folders, **result}, indent=1) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
