"""Simulator throughput and peak memory (issue 2 target: >= 10 images/s at 256x256, < 4 GB).

Runs ``cxrgen simulate`` end to end (sampling, pathology insertion, projection, detector
and display physics, JPEG + report writing, CSVs) into fresh folders, ``--repeats`` times,
and reports the median. The anatomy cache (~/.cache/cxrgen) is warmed first, as it is
after the first run on any machine; worker start-up is included in the wall time.

Usage: python benchmarks/simulate.py [--n 300] [--size 256] [--workers 2] [--repeats 3]
Writes benchmarks/results/simulate.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

from training.simulator.anatomy import load_anatomy
from training.simulator.dataset import SimulateConfig, simulate


def run_once(n: int, size: int, workers: int, seed: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        simulate(SimulateConfig(out=d, n=n, size=size, seed=seed, workers=workers), progress=False)
        return time.perf_counter() - t


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def named_models(parser: argparse.ArgumentParser, specs: list[str], repo: Path) -> list[tuple[str, str]]:
    """[(name, folder)] of NAME=MODEL arguments (MODEL a folder relative to ``repo``); a malformed one or a
    missing folder is ``parser``'s error (exit 2)."""
    models = []
    for spec in specs:
        name, eq, folder = spec.partition("=")
        if not eq or not name or not (repo / folder).is_dir():
            parser.error(f"{spec!r}: expected NAME=MODEL with MODEL a pipeline folder")
        models.append((name, folder))
    return models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "simulate.json"))
    args = ap.parse_args()

    load_anatomy()  # warm the on-disk anatomy cache
    times = [run_once(args.n, args.size, args.workers, seed) for seed in range(args.repeats)]
    med = statistics.median(times)
    # ru_maxrss is KiB on Linux: the largest worker, and this process.
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    parent = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    peak = parent + args.workers * child  # upper bound: all workers at their peak at once
    result = {
        "benchmark": "simulate", "machine": machine(), "n": args.n, "size": args.size,
        "workers": args.workers, "repeats": args.repeats, "seconds": [round(t, 2) for t in times],
        "images_per_s_median": round(args.n / med, 2),
        "minutes_per_10k_images": round(10_000 / (args.n / med) / 60, 1),
        "peak_memory_gib_upper_bound": round(peak, 2), "worker_peak_rss_gib": round(child, 2),
        "parent_peak_rss_gib": round(parent, 2),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"| machine | size | workers | images/s (median of {args.repeats}) | 10k images | peak memory |")
    print("|---|---|---|---|---|---|")
    print(f"| {result['machine']} | {args.size} | {args.workers} | {result['images_per_s_median']} | "
          f"{result['minutes_per_10k_images']} min | <= {result['peak_memory_gib_upper_bound']} GiB |")


if __name__ == "__main__":
    main()
