"""Scoring cost vs generation cost (issue 7, section 4): scores on every image must stay cheap.

Generates a batch of --batch images (25 DDIM steps, CFG 4) with the generator, then scores the same batch
with all five reward models, the way ``cxrgen generate --score`` does. Each number is the median of
``--repeats`` timed runs after one warm-up, measured in one process so both share the machine's state.
Target: scoring time <= 20% of generation time at batch 8 on CPU.

Rewards come from --reward-dir (models/rewards); a kind with no trained folder there is timed with a fresh
network of the default RewardConfig (speed does not depend on the weights) and marked "untrained".
Usage: python benchmarks/score.py [--model models/default] [--reward-dir models/rewards] [--repeats 3]
Writes benchmarks/results/score-cpu.json (score-gpu.json on a GPU) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate import timed  # noqa: E402  (median of repeats after a warm-up, as the generation benchmark)
from simulate import machine  # noqa: E402  (same machine description as the other benchmarks)


def rewards(reward_dir: str | None, device: str, overrides: dict) -> dict:
    """name -> (Reward, "trained <version>" | "untrained")."""
    from training.reward import base as rb
    from training.reward.config import RewardConfig

    out = {}
    for name in rb.REWARD_NAMES:
        if name in rb.available(reward_dir) and not overrides:
            r = rb.load_reward(name, device, reward_dir)
            out[name] = (r, f"trained {r.version}")
            continue
        cfg = RewardConfig(kind=name, **overrides)
        cls = rb.reward_class(name)
        extra = {"embed_dim": cfg.embed_dim, "text_buckets": cfg.text_buckets} if name == "consistency" else {}
        out[name] = (cls(cls.Net(**cfg.net, **extra).to(device).eval()), "untrained")
    return out


def main() -> None:
    from training.findings import Finding
    from training.generation import findings_prompt
    from training.model.checkpoint import load_pipeline
    from training.model.components import to_grey

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/default")
    ap.add_argument("--reward-dir", default=None, help="default: models/rewards")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=None, help="time untrained rewards at this input size")
    ap.add_argument("--channels", default=None, help="time untrained rewards with these trunk widths, e.g. 8,16,32,64")
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    overrides = {}
    if args.image_size:
        overrides["image_size"] = args.image_size
    if args.channels:
        overrides["channels"] = tuple(int(c) for c in args.channels.split(","))
    pipe, manifest = load_pipeline(args.model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    found = [[Finding("pleural_effusion", "left", "moderate")], [], [Finding("cardiomegaly", severity="moderate")],
             [Finding("pneumothorax", "right", "small")]]
    findings = [found[i % len(found)] for i in range(args.batch)]
    prompts = [findings_prompt(f, i) for i, f in enumerate(findings)]
    gens = [torch.Generator(args.device).manual_seed(i) for i in range(args.batch)]
    images = []

    def generate():
        images[:] = [to_grey(pipe(prompts, num_inference_steps=args.steps, guidance_scale=4.0, generator=gens,
                          output_type="pt").images).clamp(0, 1) * 2 - 1]

    gen_s = timed(generate, args.repeats)
    x = images[0].float()
    models = rewards(args.reward_dir, args.device, overrides)
    per = {name: timed(lambda r=r: r.score(x, prompts, findings), args.repeats) for name, (r, _) in models.items()}
    all_s = timed(lambda: [r.score(x, prompts, findings) for r, _ in models.values()], args.repeats)
    gpu = args.device.startswith("cuda")
    result = {
        "benchmark": "score", "device": torch.cuda.get_device_name() if gpu else machine(),
        "model": manifest.version if manifest else args.model, "batch": args.batch, "steps": args.steps,
        "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        "generation_s_per_image": gen_s / args.batch, "scoring_s_per_image": all_s / args.batch,
        "overhead": all_s / gen_s, "target_overhead": 0.2, "within_target": all_s / gen_s <= 0.2,
        "per_reward_s_per_image": {k: v / args.batch for k, v in per.items()},
        "rewards": {k: v for k, (_, v) in models.items()}, "overrides": overrides,
    }
    out = Path(args.out or Path(__file__).parent / "results" / f"score-{'gpu' if gpu else 'cpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['device']}, generator {result['model']}, batch {args.batch}, {args.steps} steps, "
          f"median of {args.repeats} (load average {result['load_average_1min']:.1f})")
    print("| what | s / image |")
    print("|---|---|")
    print(f"| generation | {result['generation_s_per_image']:.4f} |")
    for k, v in result["per_reward_s_per_image"].items():
        print(f"| {k} ({result['rewards'][k]}) | {v:.4f} |")
    print(f"| all five rewards | {result['scoring_s_per_image']:.4f} |")
    print(f"scoring overhead: {100 * result['overhead']:.1f} % of generation (target <= 20 %)")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
