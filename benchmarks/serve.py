"""Serving latency and throughput (issue 9, section 7): the service against a direct pipeline call.

1. Direct: ``training.generation.generate`` on one prompt (batch 1), 3 x --repeats calls, in this
   process before the servers start and again after they stop (the two never share the CPU); the
   median of both sets is the reference.
2. Served: a real ``bentoml serve`` (one worker) with batching on (CXRGEN_MAX_BATCH=8) and off (1).
   For 1, 4 and 16 concurrent clients, each client sends POST /generate (n=1, the same steps and
   guidance, its own prompt and seed) back to back; --requests per client (at least 16 in all).
   Latency p50 / p95 / p99 over all requests of a run and images/s = requests / wall time; each row is
   the median over --repeats runs.

Targets on this CPU: batching >= 1.5x the images/s of unbatched serving at 16 clients; HTTP, scoring and
batching overhead <= 10% over the direct call at batch 1 (served p50 at 1 client vs the direct median).
Usage: python benchmarks/serve.py [--steps 25] [--repeats 3]. Writes benchmarks/results/serve-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from simulate import machine  # noqa: E402

PROMPTS = ["Moderate left pleural effusion.", "No acute cardiopulmonary process.", "Large right pneumothorax.",
           "Cardiomegaly.", "Right upper lobe pneumonia.", "Mild pulmonary edema.", "Left lower lobe atelectasis.",
           "Endotracheal tube in place."]


def direct(steps: int, repeats: int) -> list[float]:
    import torch

    from training.generation import DEFAULT_MODEL, generate
    from training.model.checkpoint import load_pipeline

    pipe, _ = load_pipeline(DEFAULT_MODEL)
    generate(pipe, [PROMPTS[0]], 0, steps, 4.0, "", 1, 128)  # warm-up
    times = []
    for i in range(repeats * 3):
        t = time.perf_counter()
        generate(pipe, [PROMPTS[i % len(PROMPTS)]], i, steps, 4.0, "", 1, 128)
        times.append(time.perf_counter() - t)
    del pipe
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return times


def load(url: str, clients: int, per_client: int, steps: int) -> dict:
    import httpx

    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as h:
            for i in range(per_client):
                body = {"prompt": PROMPTS[(c + i) % len(PROMPTS)], "seed": 1000 * c + i, "steps": steps}
                t = time.perf_counter()
                r = h.post("/generate", json=body)
                dt = time.perf_counter() - t
                with lock:
                    (lat.append(dt) if r.status_code == 200 else errors.append(f"{r.status_code} {r.text[:100]}"))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests, e.g. {errors[0]}")
    q = statistics.quantiles(lat, n=100, method="inclusive")
    return {"p50": statistics.median(lat), "p95": q[94], "p99": q[98], "images_per_s": len(lat) / wall,
            "requests": len(lat)}


def serve(max_batch: int, steps: int, repeats: int, per_client: int, root: Path) -> dict:
    import httpx

    from service_support import free_port, wait_ready

    port = free_port()
    env = {**os.environ, "CXRGEN_DATA": str(root / f"var-{max_batch}"), "BENTOML_HOME": str(root / "bentoml"),
           "CXRGEN_MAX_BATCH": str(max_batch), "CXRGEN_WORKERS": "1", "BENTOML_DO_NOT_TRACK": "True",
           "CXRGEN_RATE_LIMITS": "off"}  # measure serving, not the per-client policy (all clients share 127.0.0.1)
    env.pop("CXRGEN_API_KEYS", None)
    proc = subprocess.Popen([str(Path(sys.executable).parent / "bentoml"), "serve", "service.service:CXRGen",
                             "--port", str(port)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=10) as h:
            wait_ready(h.get)
        load(url, 2, 2, steps)  # warm the HTTP path and the scorer
        rows = {}
        for clients in (1, 4, 16):
            n = max(per_client, -(-16 // clients))
            runs = [load(url, clients, n, steps) for _ in range(repeats)]
            rows[clients] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        return rows
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--requests", type=int, default=4, help="requests per client (at least 16 per run in all)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serve-cpu.json"))
    args = ap.parse_args()

    # The direct call is timed before and after the servers (this machine's speed drifts by tens of
    # percent over minutes); its median over both sets is the reference.
    before = direct(args.steps, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        batched = serve(8, args.steps, args.repeats, args.requests, Path(tmp))
        unbatched = serve(1, args.steps, args.repeats, args.requests, Path(tmp))
    after = direct(args.steps, args.repeats)
    t_direct = statistics.median(before + after)
    speedup = batched[16]["images_per_s"] / unbatched[16]["images_per_s"]
    overhead = batched[1]["p50"] / t_direct - 1
    result = {"benchmark": "serve", "device": machine(), "steps": args.steps, "size": 128, "repeats": args.repeats,
              "load_average_1min": os.getloadavg()[0], "direct_batch1_s": t_direct,
              "direct_batch1_s_before": statistics.median(before), "direct_batch1_s_after": statistics.median(after),
              "batched": batched, "unbatched": unbatched,
              "batching_speedup_at_16": speedup, "target_speedup": 1.5, "speedup_ok": speedup >= 1.5,
              "overhead_at_1": overhead, "target_overhead": 0.10, "overhead_ok": overhead <= 0.10}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"| mode | clients | p50 s | p95 s | p99 s | images/s |\n|---|---|---|---|---|---|")
    print(f"| direct pipeline call, batch 1 | 1 | {t_direct:.3f} | | | {1 / t_direct:.2f} |")
    for name, rows in (("served, batching on (8)", batched), ("served, batching off", unbatched)):
        for c, r in rows.items():
            print(f"| {name} | {c} | {r['p50']:.3f} | {r['p95']:.3f} | {r['p99']:.3f} | {r['images_per_s']:.2f} |")
    print(f"batching speedup at 16 clients: {speedup:.2f}x (target >= 1.5); overhead at 1 client: "
          f"{overhead * 100:+.1f}% (target <= 10%)")


if __name__ == "__main__":
    main()
