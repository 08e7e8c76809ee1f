"""Inference backends compared on this machine (issue 10, section 7).

Per backend and batch size (1, 4, 16), on the embedded model at its native 128 px, 4.0 guidance, DDIM:
  * U-Net step: one U-Net call on the guided batch (2 x batch latents), median of 3 x --repeats calls;
  * end to end: ``generate`` (text encoder, every step, VAE decode) seconds per image and images / s,
    median of --repeats timed runs after one warm-up run (which also pays torch.compile's compilation);
  * peak memory: the worker process's peak RSS (every (backend, batch) runs in its own process);
  * PSNR of the backend's images against torch eager's for the same seeds (bf16 is not bit-faithful).

Backends: ``torch`` (eager fp32), ``torch-bf16`` (CPU autocast to bf16: the CPU has AMX / AVX512-BF16),
``torch-compile`` (``torch.compile`` of the U-Net, inductor), ``torch-cl`` (the U-Net in channels-last
memory format), ``onnxruntime`` (``export/ort.py``: the
fused U-Net ``unet.fused.onnx``, graph optimisation level ALL, intra-op threads = cores, fp32),
``triton-http`` and ``triton-grpc`` (``export/triton_backend.py``: the repository of ``cxrgen export
triton``, python-backend models running onnxruntime, served by nvidia-pytriton's bundled tritonserver,
which this script starts on loopback ports for those rows
and stops at the end; the U-Net step is one request to the U-Net model, end to end one request per batch
to the pipeline model; peak memory adds the server's processes, ``server_peak_rss_mib``). The export (and
the repository) are made once into --workdir. The summary gives the Triton path's overhead over in-process
onnxruntime at batch 1 (``triton_overhead_batch1``: seconds per image and ratio, per protocol).

Resumable and cheap: each finished row is written to the results file at once, and a rerun skips the
rows already there for the same settings (--fresh starts over); --quick runs 5 steps, 1 timed repeat.
Usage: nice python benchmarks/backends.py [--quick] [--backends torch,onnxruntime] [--batches 1,4,16]
       [--redo onnxruntime] (measure those backends' rows again, keeping the others)
       python benchmarks/backends.py --paired [--against torch-cl] (torch eager vs one other, alternated)
Writes benchmarks/results/backends-cpu.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from simulate import machine  # noqa: E402  (same machine description as the other benchmarks)

BACKENDS = ("torch", "torch-bf16", "torch-compile", "torch-cl", "onnxruntime", "triton-http", "triton-grpc")
TRITON = ("triton-http", "triton-grpc")
PROMPT = "Moderate left pleural effusion."


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def bf16_forward(forward):
    """``forward`` under CPU bf16 autocast, its first output cast back to fp32 (the scheduler's dtype)."""
    import torch

    def run(*a, **kw):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = forward(*a, **kw)
        first = out[0] if isinstance(out, tuple) else out[list(out.keys())[0]]
        return (first.float(), *out[1:]) if isinstance(out, tuple) else type(out)(first.float())

    return run


def torch_backend(model: str, variant: str):
    """(generate(prompts, seed, steps) -> images, unet(sample, t, ehs)) for a torch variant."""
    import torch

    from training.generation import generate, set_scheduler
    from training.model.checkpoint import load_pipeline

    pipe, _ = load_pipeline(model)
    set_scheduler(pipe, "ddim")
    if variant == "torch-compile":
        pipe.unet = torch.compile(pipe.unet)
    if variant == "torch-cl":  # the U-Net's weights (and so its convolutions) in channels-last memory format
        pipe.unet.to(memory_format=torch.channels_last)
    if variant == "torch-bf16":  # the U-Net and text encoder in bf16 autocast; the VAE decodes in fp32
        for module in (pipe.unet, pipe.text_encoder):
            module.forward = bf16_forward(module.forward)

    def gen(prompts, seed, steps):
        with torch.inference_mode():
            return generate(pipe, prompts, seed, steps, 4.0, "", len(prompts), 128)

    def unet(sample, t, ehs):
        with torch.inference_mode():
            return pipe.unet(torch.from_numpy(sample), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(ehs))

    return gen, unet


def ort_backend(export_dir: str):
    from export.ort import load

    pipe = load(export_dir)
    pipe.set_scheduler("ddim")

    def gen(prompts, seed, steps):
        return pipe.generate(prompts, seed, steps, 4.0, "", len(prompts), 128)

    def unet(sample, t, ehs):
        return pipe.runner.run("unet", {"sample": sample, "timestep": t, "encoder_hidden_states": ehs})

    return gen, unet


def triton_backend(repo: str, url: str):
    from export.triton import to_wire
    from export.triton_backend import load

    pipe = load(repo, url=url)
    pipe.set_scheduler("ddim")
    entry = pipe.export.graph("unet")

    def gen(prompts, seed, steps):
        return pipe.generate(prompts, seed, steps, 4.0, "", len(prompts), 128)

    def unet(sample, t, ehs):
        feeds = to_wire({"sample": sample, "timestep": t, "encoder_hidden_states": ehs}, entry)
        return pipe.client.infer("cxrgen_unet", feeds, ["noise_pred"])

    return gen, unet


def server_peak_rss_mib(pid: int) -> float:
    """Peak RSS (VmHWM) summed over the Triton server's process group: the server and its python stubs."""
    total = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.getpgid(int(proc.name)) != pid:
                continue
            for line in (proc / "status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except (OSError, ValueError):
            continue
    return total / 1024


def worker(args: argparse.Namespace) -> None:
    """One (backend, batch) row, printed as JSON on the last line; images saved for the PSNR."""
    if args.worker in TRITON:
        gen, unet = triton_backend(args.repo, args.url)
    elif args.worker == "onnxruntime":
        gen, unet = ort_backend(args.export)
    else:
        gen, unet = torch_backend(args.model, args.worker)
    b = args.batch
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2 * b, 4, 16, 16)).astype(np.float32)
    ehs = rng.standard_normal((2 * b, 64, 128)).astype(np.float32)
    t = np.full(2 * b, 500.0, dtype=np.float32)
    step = median_time(lambda: unet(sample, t, ehs), 3 * args.repeats)
    images = []
    e2e = median_time(lambda: images.append(gen([PROMPT] * b, 0, args.steps)), args.repeats)
    np.save(args.images, images[-1].astype(np.float32))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
    print(json.dumps({"unet_step_s": step, "s_per_image": e2e / b, "images_per_s": b / e2e, "peak_rss_mib": rss}))


def run_row(backend: str, batch: int, args: argparse.Namespace, images: Path, server=None) -> dict:
    cmd = [sys.executable, __file__, "--worker", backend, "--batch", str(batch), "--steps", str(args.steps),
           "--repeats", str(args.repeats), "--model", args.model, "--export", str(args.workdir / "onnx"),
           "--images", str(images)]
    if server is not None:
        url = server.grpc_url if backend == "triton-grpc" else server.http_url
        cmd += ["--repo", str(args.workdir / "triton-repo"), "--url", url]
    load_before = os.getloadavg()[0]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"{backend} batch {batch} failed:\n{done.stderr[-3000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    if server is not None:  # cumulative over the server's life: the largest batch so far
        row["server_peak_rss_mib"] = server_peak_rss_mib(server.proc.pid)
    return {"backend": backend, "batch": batch, "steps": args.steps, **row,
            "load_avg_1min_before": round(load_before, 2)}


def psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    """PSNR in dB of images in [0, 1]; None for identical images (infinite, and not valid JSON)."""
    from export.testing import psnr as measure

    db = measure(a, b)
    return None if db == float("inf") else round(db, 1)


def ensure_export(model: str, workdir: Path) -> None:
    from export.folder import ExportConfig
    from export.onnx_export import export_onnx

    cfg = ExportConfig(checkpoint=model, out=str(workdir / "onnx"), rewards=False)
    doc = workdir / "onnx" / "export.json"
    # exported again when missing or written with other settings (e.g. by a cxrgen without the fused U-Net)
    if not doc.is_file() or json.loads(doc.read_text()).get("config") != dataclasses.asdict(cfg):
        export_onnx(cfg, force=True)


def start_triton(workdir: Path):
    """The repository (rewritten from the export every run: it is quick) served by the bundled tritonserver."""
    from export.triton import write_repository
    from export.triton_server import start

    repo = write_repository(workdir / "onnx", workdir / "triton-repo", max_batch=16, force=True)
    return start(repo, workdir / "triton-server.log")


def summarise(rows: list[dict]) -> list[dict]:
    """Speed-up of every backend over torch eager, end to end, per batch."""
    eager = {r["batch"]: r["s_per_image"] for r in rows if r["backend"] == "torch"}
    for r in rows:
        if r["batch"] in eager:
            r["speedup_vs_torch"] = round(eager[r["batch"]] / r["s_per_image"], 2)
    return rows


def triton_overhead(rows: list[dict]) -> dict:
    """Seconds per image that the Triton path adds over in-process onnxruntime at batch 1, and the ratio."""
    ort = next((r["s_per_image"] for r in rows if r["backend"] == "onnxruntime" and r["batch"] == 1), None)
    out = {}
    for r in rows:
        if r["backend"] in TRITON and r["batch"] == 1 and ort:
            out[r["backend"].split("-")[1]] = {"s_per_image": round(r["s_per_image"] - ort, 4),
                                               "ratio": round(r["s_per_image"] / ort, 3)}
    return out


def paired(args: argparse.Namespace) -> dict:
    """torch eager and --against (onnxruntime, or a torch variant) in one process, their end-to-end runs
    alternated (A, B, A, B, ...): on a shared machine both see the same background load, so the per-pair ratio
    is the robust speed-up. Per batch: median seconds per image of each and the median of the pairs' ratios."""
    import torch

    other = args.against
    if other == "onnxruntime":
        ensure_export(args.model, args.workdir)
        challenger = ort_backend(str(args.workdir / "onnx"))[0]
    elif other.startswith("torch-"):
        challenger = torch_backend(args.model, other)[0]
    else:
        raise SystemExit(f"--against: onnxruntime or a torch variant ({', '.join(BACKENDS[1:4])}), got {other!r}")
    runners = {"torch": torch_backend(args.model, "torch")[0], other: challenger}
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        for run in runners.values():  # warm-up (and first-shape planning) outside the timing
            run([PROMPT] * b, 0, args.steps)
        times = {k: [] for k in runners}
        for _ in range(args.repeats):
            for name, run in runners.items():
                t = time.perf_counter()
                run([PROMPT] * b, 0, args.steps)
                times[name].append((time.perf_counter() - t) / b)
        ratios = [a / o for a, o in zip(times["torch"], times[other])]
        rows.append({"batch": b, "torch_s_per_image": statistics.median(times["torch"]),
                     f"{other}_s_per_image": statistics.median(times[other]),
                     "speedup_median_of_pairs": round(statistics.median(ratios), 3),
                     "speedup_min": round(min(ratios), 3), "speedup_max": round(max(ratios), 3), "pairs": len(ratios),
                     "load_avg_1min_after": round(os.getloadavg()[0], 2)})
        print(f"batch {b}: {other} {rows[-1]['speedup_median_of_pairs']:.2f}x torch eager "
              f"(pairs {rows[-1]['speedup_min']:.2f}-{rows[-1]['speedup_max']:.2f})", file=sys.stderr)
    return {"benchmark": "backends-paired", "against": other, "device": machine(), "steps": args.steps,
            "repeats": args.repeats, "torch_threads": torch.get_num_threads(), "note": args.note, "rows": rows}


def table(result: dict) -> str:
    overhead = "; ".join(f"Triton {k} over onnxruntime at batch 1: +{v['s_per_image']:.3f} s / image "
                         f"({v['ratio']:.2f}x)" for k, v in result.get("triton_overhead_batch1", {}).items())
    lines = [f"{result['device']}, model {result['model']}, {result['steps']} DDIM steps, 128 px, guidance 4, "
             f"median of {result['repeats']}" + (f". {overhead}" if overhead else ""),
             "| backend | batch | U-Net step (s) | s / image | images / s | peak RSS (MiB; Triton: + server) | x torch "
             "| PSNR vs torch | load avg before |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['backend']} | {r['batch']} | {r['unet_step_s']:.4f} | {r['s_per_image']:.3f} | "
                     f"{r['images_per_s']:.2f} | {r['peak_rss_mib'] + r.get('server_peak_rss_mib', 0):.0f} | {r.get('speedup_vs_torch', float('nan')):.2f} "
                     f"| {'exact' if r.get('psnr_vs_torch', 0) is None else r.get('psnr_vs_torch', '')} "
                     f"| {r.get('load_avg_1min_before', '')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "default"))
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="5 steps, 1 timed repeat: minutes, not tens of minutes")
    ap.add_argument("--fresh", action="store_true", help="ignore rows already in the results file")
    ap.add_argument("--redo", default="", help="backends whose rows are measured again (e.g. after other load)")
    ap.add_argument("--paired", action="store_true",
                    help="torch eager vs --against alternated in one process (robust to background load); writes "
                         "benchmarks/results/backends-paired-cpu.json (onnxruntime) or backends-paired-B-cpu.json")
    ap.add_argument("--against", default="onnxruntime", help="--paired: onnxruntime or a torch variant (torch-cl, ...)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench-backends")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "backends-cpu.json"))
    ap.add_argument("--note", default="", help="e.g. other load on the machine while this ran")
    # internal: one (backend, batch) row in a process of its own
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--export", default="", help=argparse.SUPPRESS)
    ap.add_argument("--images", default="", help=argparse.SUPPRESS)
    ap.add_argument("--repo", default="", help=argparse.SUPPRESS)
    ap.add_argument("--url", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        args.steps, args.repeats = 5, 1
    if args.paired:
        result = paired(args)
        other = args.against
        name = "backends-paired-cpu.json" if other == "onnxruntime" else f"backends-paired-{other}-cpu.json"
        out = Path(__file__).parent / "results" / name
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"| batch | torch eager s / image | {other} s / image | {other} x torch (median of pairs; range) |")
        print("|---|---|---|---|")
        for r in result["rows"]:
            print(f"| {r['batch']} | {r['torch_s_per_image']:.3f} | {r[f'{other}_s_per_image']:.3f} | "
                  f"{r['speedup_median_of_pairs']:.2f} ({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) |")
        return
    backends = [b for b in args.backends.split(",") if b]
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        raise SystemExit(f"unknown backend(s) {sorted(unknown)}; known: {list(BACKENDS)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    ensure_export(args.model, args.workdir)
    out = Path(args.out)
    import torch

    model = Path(args.model).resolve()  # recorded relative to the repository: no machine's absolute path
    settings = {"steps": args.steps, "repeats": args.repeats,
                "model": str(model.relative_to(ROOT)) if model.is_relative_to(ROOT) else model.name}
    old = json.loads(out.read_text()) if out.is_file() and not args.fresh else {}
    redo = {b for b in args.redo.split(",") if b}
    rows = [r for r in old.get("rows", []) if old.get("settings") == settings and r["backend"] not in redo]
    batches = [int(b) for b in args.batches.split(",")]
    todo = [(b, n) for b in ["torch", *[b for b in backends if b != "torch"]]  # eager first: the PSNR reference
            for n in batches if not any(r["backend"] == b and r["batch"] == n for r in rows)]  # resumable
    server = start_triton(args.workdir) if any(b in TRITON for b, _ in todo) else None
    try:
        for backend, batch in todo:
            row = run_row(backend, batch, args, args.workdir / f"{backend}-{batch}.npy",
                          server if backend in TRITON else None)
            ref = args.workdir / f"torch-{batch}.npy"
            if ref.is_file():
                row["psnr_vs_torch"] = psnr(np.load(args.workdir / f"{backend}-{batch}.npy"), np.load(ref))
            rows.append(row)
            result = {"benchmark": "backends", "device": machine(), **settings,
                      "settings": settings, "torch_threads": torch.get_num_threads(), "note": args.note,
                      "rows": summarise(rows), "triton_overhead_batch1": triton_overhead(rows)}
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2) + "\n")
            print(f"{backend} batch {batch}: {row['s_per_image']:.3f} s/image", file=sys.stderr)
    finally:
        if server is not None:
            server.stop()
    print(table(json.loads(out.read_text())))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
