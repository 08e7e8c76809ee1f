"""Reward score distributions for real, generated and corrupted images (issue 7, section 5).

Scores three groups with every trained reward (``models/rewards`` unless --reward-dir):
real simulated images of a held-out split, the default model's images of the same
prompts (``cxrgen generate --prompts-from DATA --split test`` output), and the real
images corrupted by each reward-hacking kind (noise, blank, inverted, saturated).
Writes a JSON summary (mean / median / 10th-90th percentiles per group and reward)
and a plot of the distributions.

    python benchmarks/rewards.py --data runs/sim-reward --generated runs/gen-test \
        --out benchmarks/results/rewards-cpu.json --plot docs/reward_distributions.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from simulate import machine  # noqa: E402  (same machine description as the other benchmarks)


def real_images(data: str, split: str, n: int, size: int):
    """The first n images of a split with their prompts and true findings."""
    from training.data.mimic import MimicCXRDataset
    from training.findings import Finding

    ds = MimicCXRDataset(root=data, split=split, size=size, normalize="unit", return_ground_truth=True)
    items = [ds[i] for i in range(min(n, len(ds)))]
    findings = [[Finding.from_record(f) for f in it["ground_truth"]["findings"]] for it in items]
    return torch.stack([it["image"] for it in items]), [it["prompt"] for it in items], findings


def generated_images(folder: str, n: int, size: int):
    """Images of a ``cxrgen generate`` folder with the prompts and findings of their records."""
    from training.data.images import read_image
    from training.findings import Finding
    from training.generation import read_generation_log

    rows = list(read_generation_log(folder).values())[:n]
    return (torch.stack([read_image(Path(folder) / r["file"], size) for r in rows]), [r["prompt"] for r in rows],
            [[Finding.from_record(f) for f in r.get("findings", [])] for r in rows])


def summary(scores: torch.Tensor) -> dict:
    s = scores.double().numpy()
    return {"mean": float(s.mean()), "median": float(np.median(s)), "p10": float(np.percentile(s, 10)),
            "p90": float(np.percentile(s, 90)), "n": int(s.size)}


def plot(groups: dict[str, dict[str, torch.Tensor]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The four hack kinds overlap exactly (all near 0): one "corrupted" curve, one colour per group.
    shown = {g: s for g, s in groups.items() if g in ("real", "generated")}
    hacks = [s for g, s in groups.items() if g not in shown]
    if hacks:
        shown["corrupted (noise, blank, inverted, saturated)"] = {k: torch.cat([h[k] for h in hacks]) for k in hacks[0]}
    names = list(next(iter(groups.values())))
    fig, axes = plt.subplots(2, (len(names) + 1) // 2, figsize=(10, 5.6))
    for ax, name in zip(axes.flat, names):
        for (group, scores), colour in zip(shown.items(), ("tab:blue", "tab:orange", "tab:red")):
            ax.hist(scores[name].numpy(), bins=np.linspace(0, 1, 26), histtype="step", lw=1.6, label=group,
                    color=colour, weights=np.full(len(scores[name]), 1 / len(scores[name])))
        ax.set_title(name, fontsize=10), ax.set_xlabel("score", fontsize=8), ax.tick_params(labelsize=7)
        ax.set_ylabel("share of images", fontsize=8)
    axes.flat[0].legend(fontsize=7, loc="upper center")
    fig.tight_layout(), fig.savefig(path, dpi=110), plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="simulated data set (held-out split read)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--generated", required=True, help="cxrgen generate output folder")
    ap.add_argument("--n", type=int, default=200, help="images per group")
    ap.add_argument("--size", type=int, default=128, help="image side the groups are read at (the generator's)")
    ap.add_argument("--reward-dir", default=None, help="trained rewards (default models/rewards)")
    ap.add_argument("--out", default="benchmarks/results/rewards-cpu.json")
    ap.add_argument("--plot", default="docs/reward_distributions.png")
    args = ap.parse_args()
    from training.reward.base import score_all
    from training.reward.corrupt import GUARDED, corrupt

    torch.manual_seed(0)
    gen = generated_images(args.generated, args.n, args.size)
    real = real_images(args.data, args.split, args.n, args.size)
    inputs = {"real": real, "generated": gen}
    for kind in GUARDED:
        inputs[kind] = (corrupt(real[0], kind, torch.Generator().manual_seed(1)), real[1], real[2])
    with torch.no_grad():
        groups = {g: score_all(x, p, f, model_dir=args.reward_dir) for g, (x, p, f) in inputs.items()}
    result = {"machine": machine(),
              "data": args.data, "split": args.split, "generated": args.generated,
              "scores": {g: {k: summary(v) for k, v in s.items()} for g, s in groups.items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    plot(groups, Path(args.plot))
    for g, s in result["scores"].items():
        print(f"{g:10s} " + "  ".join(f"{k} {v['mean']:.3f}" for k, v in s.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
