"""Judge training speed (``cxrgen judge train --precision``): one optimisation step of the evaluation judge,
fp32 against bfloat16 autocast, at the input sides the evaluation uses.

A step is what ``train_step`` does (intensity augmentation, forward, masked BCE + posture loss, backward,
AdamW) on a batch of random images and labels: data loading is left out, so this is the network's share.
Median of --repeats steps after --warmup steps, per (arch, side, precision).

Usage: python benchmarks/judge_speed.py [--arch resnet18] [--sizes 128,256] [--batch 32] [--repeats 5]
Writes benchmarks/results/judge-speed-cpu.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from simulate import machine  # noqa: E402


def step_seconds(arch: str, size: int, precision: str, batch: int, warmup: int, repeats: int) -> list[float]:
    import math

    import torch

    from training.evaluate.judge import POSE_KEYS, CXRJudge, JudgeConfig, make_optimizer, train_step
    from training.findings import OBSERVATIONS

    torch.manual_seed(0)
    cfg = JudgeConfig(arch=arch, image_size=size, batch_size=batch, device="cpu", precision=precision)
    judge = CXRJudge(arch, size)
    opt = make_optimizer(judge, cfg)
    labels = (torch.rand(batch, len(OBSERVATIONS)) > 0.8).float()
    labels[:, 0] = math.nan  # some unknown labels, as in real batches
    b = {"image": torch.rand(batch, 1, size, size) * 2 - 1, "labels": labels, "label_mask": ~torch.isnan(labels),
         "pose": torch.randn(batch, len(POSE_KEYS))}
    gen = torch.Generator().manual_seed(0)
    times = []
    for i in range(warmup + repeats):
        t = time.perf_counter()
        train_step(judge, b, opt, cfg, gen)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def main() -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--sizes", default="128,256")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/judge-speed-cpu.json")
    a = p.parse_args()
    rows = []
    for size in (int(s) for s in a.sizes.split(",")):
        for precision in ("fp32", "bf16"):
            t = step_seconds(a.arch, size, precision, a.batch, a.warmup, a.repeats)
            rows.append({"arch": a.arch, "image_size": size, "precision": precision, "batch": a.batch,
                         "seconds": [round(x, 4) for x in t], "median_s_per_step": round(statistics.median(t), 4),
                         "images_per_s": round(a.batch / statistics.median(t), 1)})
    fp32 = {r["image_size"]: r["median_s_per_step"] for r in rows if r["precision"] == "fp32"}
    for r in rows:
        r["speedup_vs_fp32"] = round(fp32[r["image_size"]] / r["median_s_per_step"], 2)
    result = {"benchmark": "judge-speed", "device": machine(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "repeats": a.repeats, "rows": rows}
    (REPO / a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['device']}, {result['threads']} threads, median of {a.repeats} steps")
    print("| arch | side | precision | s / step (batch %d) | images / s | speed-up |" % a.batch)
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arch']} | {r['image_size']} | {r['precision']} | {r['median_s_per_step']:.3f} | "
              f"{r['images_per_s']} | {r['speedup_vs_fp32']}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
