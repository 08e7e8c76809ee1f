"""Why the evaluation judge is weak on two findings (issue 8's judge prerequisite): its real-image AUROC per
simulated finding kind, and per lesion size.

A CheXpert label such as Lung Lesion is made positive by several simulated kinds (calcified granuloma, nodule,
mass); the judge may see some and not others. For each label below 0.85 (or --labels), each kind that makes it
positive is scored on its own: positives = images with that kind, negatives = images where the label is 0
(the same negatives for every kind). Lesions are also split by diameter. Reads the simulator's ground truth,
so it runs on simulated data only.

Usage: python benchmarks/judge_findings.py [--judge runs/judge256] [--data runs/sim256-judge] [--split test]
                                           [--size 128] [--labels L1,L2] [--out FILE]
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


def main() -> int:
    import numpy as np

    from training.evaluate.judge import OBSERVATIONS, auroc_per_finding, load_judge, predict
    from training.evaluate.config import EvalConfig
    from training.evaluate.harness import dataset

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--judge", default="runs/judge256")
    p.add_argument("--data", default="runs/sim256-judge")
    p.add_argument("--split", default="test")
    p.add_argument("--size", type=int, default=128, help="the resolution the images are read at (the generator's)")
    p.add_argument("--labels", default=None, help="comma-separated labels (default: those with AUROC < 0.85)")
    p.add_argument("--out", default="benchmarks/results/judge-findings-cpu.json", help="results file")
    a = p.parse_args()
    if not (REPO / a.data / "ground_truth.jsonl").is_file():
        p.error(f"{a.data} has no ground_truth.jsonl: this diagnostic needs simulated data")
    judge = load_judge(REPO / a.judge)
    ds = dataset(EvalConfig(out="/dev/null", data=str(REPO / a.data)), a.split, a.size)
    probs, labels, mask, _, _ = predict(judge, ds)
    overall = auroc_per_finding(probs, labels, mask)
    rows = [ds[i]["ground_truth"] for i in range(len(ds))]  # the simulator's row of each image, in order
    names = a.labels.split(",") if a.labels else [k for k, v in overall.items() if v is not None and v < 0.85]
    result = {"benchmark": "judge-findings", "device": machine(), "judge": a.judge,
              "judge_config": judge.meta.get("config"), "data": a.data,
              "split": a.split, "size": a.size, "n_images": len(rows),
              "auroc": {k: v for k, v in overall.items() if v is not None}, "labels": {}}
    lines = ["| label | positives by | n | AUROC |", "|---|---|---|---|"]
    for label in names:
        j = OBSERVATIONS.index(label)
        s = probs[:, j].numpy()
        per_kind = {}
        for kind in kinds_of(rows, label):
            auc, n = auroc_subset(s, rows, label, lambda r, k=kind: any(f["kind"] == k for f in r["findings"]))
            per_kind[kind] = {"n": n, "auroc": auc}
            lines.append(f"| {label} | {kind} | {n} | {auc:.3f} |" if auc is not None else f"| {label} | {kind} | {n} | |")
        per_size = {}
        for lo, hi in SIZE_BINS:
            def keep(r, lo=lo, hi=hi):
                return r["labels"].get(label) == 1.0 and any(
                    lo <= (f.get("params") or {}).get("diameter_mm", -1) < hi for f in r["findings"])
            auc, n = auroc_subset(s, rows, label, keep)
            if n:
                per_size[f"{lo}-{hi} mm"] = {"n": n, "auroc": auc}
                lines.append(f"| {label} | lesion {lo}-{hi} mm | {n} | {auc:.3f} |")
        lines.append(f"| {label} | all | {int(np.nansum(labels[:, j].numpy() == 1))} | {overall[label]:.3f} |")
        result["labels"][label] = {"auroc": overall[label], "by_kind": per_kind, "by_lesion_diameter": per_size}
    out = REPO / a.out
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
