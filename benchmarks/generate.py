"""Generation and training speed (issue 3, section 6).

Measures, on whatever device this runs on:
  * seconds per image at 25 DDIM steps for batch 1 and 8 (CPU) or images per second at
    batch 1-64 (GPU), at the model's resolution and at 256x256;
  * training steps per second of the U-Net + text encoder stage;
  * on a GPU, model FLOPs utilisation: FLOPs per image (counted with torch's FLOP counter
    over one U-Net call, times steps and the CFG batch doubling, plus VAE decode) / time /
    the device's peak dense bf16/fp16 FLOP/s (given with --peak-tflops).

Each number is the median of ``--repeats`` timed runs after one warm-up.
Usage: python benchmarks/generate.py [--model models/default] [--device cpu] [--repeats 3]
Writes benchmarks/results/generate-<device>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from simulate import machine  # noqa: E402  (same machine description as the simulator benchmark)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, kernels, lazy imports
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def generation_seconds(pipe, batch: int, size: int, steps: int, repeats: int) -> float:
    prompts = ["Moderate left pleural effusion."] * batch
    gens = [torch.Generator(pipe.device).manual_seed(i) for i in range(batch)]
    return timed(lambda: pipe(prompts, num_inference_steps=steps, guidance_scale=4.0, height=size, width=size,
                              generator=gens, output_type="pt"), repeats)


def unet_flops(pipe, size: int) -> float:
    """FLOPs of one U-Net call on one latent (torch's FLOP counter; 2 FLOPs per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    lat = size // pipe.vae_scale_factor
    z = torch.randn(1, pipe.unet.config.in_channels, lat, lat, device=pipe.device, dtype=pipe.unet.dtype)
    h = torch.randn(1, pipe.tokenizer.model_max_length, pipe.unet.config.cross_attention_dim,
                    device=pipe.device, dtype=pipe.unet.dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        pipe.unet(z, torch.tensor([500], device=pipe.device), h)
    return float(fc.get_total_flops())


def train_steps_per_s(model: str, data: str, device: str, repeats: int) -> float | None:
    """Optimiser steps per second of the U-Net + text encoder stage (batch 32), or None without data."""
    if not data or not Path(data).is_dir():
        return None
    import tempfile

    from training.train.config import FinetuneConfig
    from training.train.loop import train

    with tempfile.TemporaryDirectory() as d:
        cfg = FinetuneConfig(data=data, out=d, model=model, train=("unet", "text_encoder"), steps=repeats + 1,
                             batch_size=32, num_workers=2, sample_every=0, checkpoint_every=0, ema=False)
        train(cfg, progress=False)
        rows = [json.loads(x) for x in (Path(d) / "log.jsonl").read_text().splitlines()]
    dts = [b["s"] - a["s"] for a, b in zip(rows, rows[1:])]
    return 1.0 / statistics.median(dts)


def load_model(model: str, device: str, dtype):
    """A checkpoint folder, or "tiny-init": the default architecture with fresh weights (speed
    does not depend on the weights, so this times the default model before one is trained)."""
    from training.model.checkpoint import load_pipeline

    if model != "tiny-init":
        return load_pipeline(model, device=device, dtype=dtype)
    from training.data.reports import load_reports
    from training.model.components import TinyModelConfig, build_pipeline, train_tokenizer

    cfg = TinyModelConfig()
    tok = train_tokenizer([r.prompt for r in load_reports()], cfg.vocab_size, cfg.max_length)
    pipe = build_pipeline(cfg, tok).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe, None


def model_folder(pipe, model: str) -> str:
    """A folder holding the model (the fresh tiny-init one is saved to a temporary folder)."""
    if model != "tiny-init":
        return model
    import tempfile

    from training.model.checkpoint import Manifest, save_checkpoint

    folder = Path(tempfile.mkdtemp()) / "tiny-init"
    save_checkpoint(pipe.to("cpu", torch.float32), folder, Manifest(version="tiny-init", stage="init"))
    return str(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/default")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", default="", help="MIMIC-layout folder for the training-speed number (optional)")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="device peak dense TFLOP/s for MFU")
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    dtype = torch.float16 if args.device.startswith("cuda") else None
    pipe, manifest = load_model(args.model, args.device, dtype)
    native = pipe.vae.config.sample_size
    gpu = args.device.startswith("cuda")
    batches = (1, 8, 16, 32, 64) if gpu else (1, 8)
    rows = []
    for size in sorted({native, 256}):
        for b in batches:
            sec = generation_seconds(pipe, b, size, args.steps, args.repeats)
            row = {"size": size, "batch": b, "s_per_image": sec / b, "images_per_s": b / sec}
            if gpu and args.peak_tflops:
                # CFG doubles the U-Net batch; the VAE decode is small next to 25 U-Net calls.
                flops = 2 * args.steps * unet_flops(pipe, size)
                row["mfu"] = flops * b / sec / (args.peak_tflops * 1e12)
            rows.append(row)
    result = {"benchmark": "generate", "device": torch.cuda.get_device_name() if gpu else machine(),
              "model": manifest.version if manifest else args.model, "steps": args.steps, "repeats": args.repeats,
              "torch_threads": torch.get_num_threads(), "rows": rows,
              "train_steps_per_s": train_steps_per_s(model_folder(pipe, args.model), args.data, args.device,
                                                     args.repeats)}
    out = Path(args.out or Path(__file__).parent / "results" / f"generate-{'gpu' if gpu else 'cpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['device']}, model {result['model']}, {args.steps} DDIM steps, median of {args.repeats}")
    print("| size | batch | s / image | images / s |" + (" MFU |" if gpu and args.peak_tflops else ""))
    print("|---|---|---|---|" + ("---|" if gpu and args.peak_tflops else ""))
    for r in rows:
        mfu = f" {100 * r['mfu']:.1f} % |" if "mfu" in r else ""
        print(f"| {r['size']} | {r['batch']} | {r['s_per_image']:.3f} | {r['images_per_s']:.2f} |{mfu}")
    if result["train_steps_per_s"]:
        print(f"training (U-Net + text encoder, batch 32): {result['train_steps_per_s']:.2f} steps/s")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
