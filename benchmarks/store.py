"""Feedback store write throughput under 32 concurrent writers (issue 7, section 5: "Store").

For SQLite (a WAL file, synchronous=NORMAL) and PostgreSQL (a throwaway cluster from Debian's
binaries with its default, durable settings: fsync on, synchronous_commit on), ``--writers`` threads
share one store and each writes ``--n`` generations (8x8 PNG blobs) and a rating of each: every write
is its own committed transaction with an idempotency key and a feed seq (training/feedback/stress.py).
Writes per second = committed writes / wall time, median of ``--repeats`` runs, each on a fresh store.
After every run the store is checked: every acknowledged write present exactly once, feed 1..N.

Usage: python benchmarks/store.py [--writers 32] [--n 20] [--repeats 3]
Writes benchmarks/results/store-cpu.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.feedback import stress  # noqa: E402
from simulate import machine  # noqa: E402  (same machine description as the simulator benchmark)
from training.feedback.pgtemp import TempCluster  # noqa: E402
from training.feedback.store import open_store  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def run_once(url: str, blobs: Path, writers: int, n: int) -> tuple[float, int]:
    """One timed run on a fresh store: (seconds, committed writes); raises if anything was lost."""
    with open_store(url, blobs) as store:
        t = time.perf_counter()
        results = stress.run_threads(store, writers, n, shared=False, retry=False)
        seconds = time.perf_counter() - t
        writes = stress.check(store, results)
    expected = 1 + writers * n * 2  # the rater, then a generation and a rating per step
    assert writes == expected, f"{writes} writes stored, {expected} acknowledged"
    return seconds, writes


def bench(name: str, urls, blobs: Path, args) -> dict:
    runs = [run_once(url, blobs / f"{name}-{i}", args.writers, args.n) for i, url in enumerate(urls)]
    rates = [w / s for s, w in runs]
    return {"database": name, "writes_per_run": runs[0][1], "seconds": [round(s, 2) for s, _ in runs],
            "writes_per_s": [round(r, 1) for r in rates], "writes_per_s_median": round(statistics.median(rates), 1),
            "lost": 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--writers", type=int, default=32)
    ap.add_argument("--n", type=int, default=20, help="generations (each rated once) per writer")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "store-cpu.json"))
    args = ap.parse_args()
    rows, load = [], os.getloadavg()[0]  # the machine may be shared: say how busy it was
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        rows.append(bench("sqlite", [f"sqlite:///{tmp}/s{i}.db" for i in range(args.repeats)], tmp, args))
        with TempCluster(durable=True) as pg:
            version = subprocess.run([str(pg.bindir / "postgres"), "--version"], capture_output=True,
                                     text=True).stdout.strip()
            rows.append(bench("postgresql", [pg.create_database(f"bench{i}") for i in range(args.repeats)], tmp, args))
    result = {"benchmark": "store", "machine": machine(), "nproc": os.cpu_count(),
              "load_average_1min_at_start": round(load, 2), "python": platform.python_version(),
              "writers": args.writers, "threads": True, "n_per_writer": args.n, "repeats": args.repeats,
              "postgresql": f"{version}, throwaway cluster, Unix socket, default durability (fsync on)",
              "sqlite": "WAL, synchronous=NORMAL", "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"| database | writers | writes/run | writes/s (median of {args.repeats}) | lost |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['database']} | {args.writers} | {r['writes_per_run']} | {r['writes_per_s_median']} | 0 |")
    print(f"machine: {result['machine']}; wrote {os.path.relpath(out, ROOT)}")


if __name__ == "__main__":
    main()
