"""RSS of a real two-worker server over consecutive phases of the reliability load mix (issue 11, memory).

The load test (tests/test_reliability.py) asks whether RSS stays flat once the server is warm. This script
shows the shape behind that verdict: it starts ``bentoml serve`` on loopback (tests/service_support.py),
drives the test's request mix with 12 clients for --phases phases of --seconds each, and records each
phase's requests, errors and RSS growth per server process. A one-time rise levels off within a few phases;
a leak grows in every phase. Run it twice to compare an allocator setting, e.g.
``MALLOC_ARENA_MAX=2 python benchmarks/rss_phases.py --label arena2``.

Usage: python benchmarks/rss_phases.py [--label base] [--phases 4] [--seconds 60]
Writes benchmarks/results/rss-phases-cpu.json (one entry per label) and prints a line per phase.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from simulate import machine  # noqa: E402

MiB = 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", default="base", help="name of this run in the results file")
    ap.add_argument("--phases", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=60, help="length of each phase")
    ap.add_argument("--clients", type=int, default=12)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "rss-phases-cpu.json")
    a = ap.parse_args()
    if a.phases < 1 or a.seconds <= 0 or a.clients < 1:
        ap.error("--phases, --seconds and --clients must be positive")
    import test_reliability as tr
    from service_support import start_live

    run = {"label": a.label, "device": machine(), "clients": a.clients, "workers": 2, "phase_s": a.seconds,
           "env": {k: os.environ.get(k) for k in ("MALLOC_ARENA_MAX", "MALLOC_TRIM_THRESHOLD_")}, "phases": []}
    with tempfile.TemporaryDirectory(prefix="cxrgen-rss-") as tmp:
        live = start_live(Path(tmp), workers=2, **tr.limits_env())
        try:
            tr.seed_generations(live)  # eight stored generations for the feedback routes, as the test

            def per_process() -> dict[int, float]:
                out = {}
                for p in live.processes():
                    try:
                        out[p.pid] = p.memory_info().rss / MiB
                    except Exception:  # a process that ended between listing and reading
                        pass
                return out

            for k in range(a.phases):
                before = per_process()
                outcomes = tr.drive(live, a.clients, a.seconds, live.ids, live.pairs, run=f"{a.label}-{k}")
                time.sleep(1)
                after = per_process()
                grew = sum(after.values()) - sum(before.values())
                row = {"phase": k, "requests": len(outcomes),
                       "errors": sum(1 for o in outcomes if not 200 <= o.status < 300),
                       "rss_total_mib": round(sum(after.values()), 1), "growth_mib": round(grew, 1),
                       "kib_per_request": round(grew * 1024 / max(len(outcomes), 1), 2),
                       "growth_per_process_mib": sorted(round(after.get(p, 0) - v, 1) for p, v in before.items())}
                run["phases"].append(row)
                print(json.dumps(row), flush=True)
        finally:
            live.stop()
    doc = json.loads(a.out.read_text()) if a.out.is_file() else {"benchmark": "rss-phases", "runs": {}}
    doc["runs"][a.label] = run
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
