"""How much each finding's words help the U-Net denoise, per noise level (issue 8: why support devices do not move).

For simulated exams with a finding of kind K, the simulator renders the exam twice (``render_case(...,
without={K})``: every other random draw kept): with the finding (x+) and without it (x-). Both films are
denoised under the exam's report p (which names K) and under the empty prompt, with the same noise and
timestep. The text's preference for the finding is

    gap = [err(x-, p) - err(x+, p)] - [err(x-, "") - err(x+, "")]

(per image; err is the denoising MSE of the model's epsilon). It is the diffusion-classifier margin (Li et al.
2023, "Your diffusion model is secretly a zero-shot classifier"): how much more the report favours the film
with the finding than the model does without words. gap > 0 means the words carry the finding at that noise
level; the fraction of exams with gap > 0 is that classifier's accuracy on the pair. Reported per timestep
band, with

* the finding's size: its pixel MSE (x+ against x-, films in [-1, 1]) and its latent energy
  (||z+ - z-||^2 / var(z), the share of the latent it occupies), and
* the share of the training loss each band gets under min-SNR weighting (gamma --snr-gamma) against the plain
  epsilon MSE: a finding whose words matter only in low-noise bands is learned from a sliver of the loss.

Usage: python benchmarks/conditioning_gap.py NAME=MODEL [NAME=MODEL ...] [--data runs/sim-panel] [--n 40]
Writes benchmarks/results/conditioning-gap-cpu.json (or --out) and prints a markdown table per model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from simulate import machine, named_models  # noqa: E402

KINDS = ("central_line", "endotracheal_tube", "nodule", "calcified_granuloma", "mass", "atelectasis",
         "pleural_effusion", "consolidation", "pneumothorax", "cardiomegaly")
BANDS = ((0, 25), (25, 100), (100, 300), (300, 600), (600, 1000))


def exam_pairs(data: Path, kinds, n: int, size: int) -> dict:
    """{kind: (x+, x-, prompts)} for up to ``n`` exams of ``data`` (a simulated folder) per kind, test and
    validate exams first; films (N, 1, size, size) in [-1, 1]."""
    from training.simulator.dataset import render_again

    rows = [json.loads(line) for line in (data / "ground_truth.jsonl").read_text().splitlines() if line.strip()]
    rows.sort(key=lambda r: r["split"] == "train")
    out = {}
    for kind in kinds:
        chosen = [r for r in rows if kind in {f["kind"] for f in r["findings"]}][:n]
        if chosen:
            plus, minus = render_again(data, chosen, [frozenset({kind})] * len(chosen), size)
            out[kind] = (plus, minus, [r["prompt"] for r in chosen])
    return out


def band_weights(sched, gamma: float) -> dict:
    """Share of the training loss per band: min-SNR (gamma) against plain MSE (uniform over timesteps)."""
    import torch

    from training.train.loop import min_snr_weight

    t = torch.arange(sched.config.num_train_timesteps)
    w = min_snr_weight(sched, t, gamma)
    return {f"{lo}-{hi}": {"min_snr": float(w[lo:hi].sum() / w.sum()), "plain": (hi - lo) / len(t)}
            for lo, hi in BANDS}


def latent_energy_x1e3(zp, zm) -> float:
    """||z+ - z-||^2 / var(z+) x 1e3: the share of the latent a finding occupies (scale-free, so latents of any
    scaling factor or grid compare)."""
    return float(((zp - zm) ** 2).mean() / zp.var() * 1e3)


def gaps(pipe, pairs: dict, draws: int, seed: int) -> dict:
    import torch

    from training.align.offline import embed, errors, latents_of

    res = {}
    with torch.no_grad():
        for kind, (xp, xm, prompts) in pairs.items():
            zp, zm = latents_of(pipe, xp), latents_of(pipe, xm)
            cond, uncond = embed(pipe, prompts), embed(pipe, [""] * len(prompts))
            gen = torch.Generator().manual_seed(seed)
            bands = {}
            for lo, hi in BANDS:
                d = torch.zeros(len(prompts))
                for _ in range(draws):
                    noise = torch.randn(zp.shape, generator=gen)
                    t = torch.randint(lo, hi, (zp.shape[0],), generator=gen)
                    e = lambda z, c: errors(pipe.unet, pipe.scheduler, z, c, t, noise)  # noqa: E731
                    d += (e(zm, cond) - e(zp, cond)) - (e(zm, uncond) - e(zp, uncond))
                d /= draws
                bands[f"{lo}-{hi}"] = {"gap_x1e3": float(d.mean() * 1e3),
                                       "gap_se_x1e3": float(d.std() / len(d) ** 0.5 * 1e3),
                                       "accuracy": float((d > 0).float().mean())}
            res[kind] = {"n": len(prompts), "pixel_mse_x1e3": float(((xp - xm) ** 2).mean() * 1e3),
                         "latent_energy_x1e3": latent_energy_x1e3(zp, zm), "bands": bands}
    return res


def main() -> int:
    import torch

    from training.model.checkpoint import load_pipeline

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", metavar="NAME=MODEL", help="pipeline folders to measure")
    p.add_argument("--data", default="runs/sim-panel", help="a simulated folder (cxrgen simulate --out)")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--n", type=int, default=40, help="exams per kind")
    p.add_argument("--draws", type=int, default=4, help="noise draws per exam and band")
    p.add_argument("--snr-gamma", type=float, default=5.0, help="the min-SNR gamma the models trained with")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/conditioning-gap-cpu.json")
    a = p.parse_args()
    data = REPO / a.data
    if not (data / "ground_truth.jsonl").is_file() or not (data / "simulate_config.json").is_file():
        p.error(f"--data {a.data}: needs ground_truth.jsonl and simulate_config.json (a cxrgen simulate folder)")
    models = named_models(p, a.models, REPO)
    kinds = [k.strip() for k in a.kinds.split(",") if k.strip()]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        p.error(f"--kinds: unknown {sorted(unknown)}; known: {', '.join(KINDS)}")
    torch.manual_seed(a.seed)
    first = load_pipeline(REPO / models[0][1])
    size = first[0].vae.config.sample_size
    t0 = time.time()
    pairs = exam_pairs(data, kinds, a.n, size)
    print(f"rendered {sum(len(v[2]) for v in pairs.values())} exam pairs in {time.time() - t0:.0f} s", flush=True)
    result = {"benchmark": "conditioning_gap", "device": machine(), "data": a.data, "size": size, "n_per_kind": a.n,
              "draws": a.draws, "seed": a.seed, "loss_share": band_weights(first[0].scheduler, a.snr_gamma),
              "snr_gamma": a.snr_gamma, "models": {}}
    for i, (name, folder) in enumerate(models):
        pipe, manifest = first if i == 0 else load_pipeline(REPO / folder)
        result["models"][name] = {"model": folder, "version": (manifest.version if manifest else None),
                                  "kinds": gaps(pipe, pairs, a.draws, a.seed)}
        print(f"\n{name} ({folder}): gap x1e3 (accuracy) per timestep band\n")
        print("| kind | n | pixel MSE x1e3 | latent energy x1e3 | " + " | ".join(f"t {b[0]}-{b[1]}" for b in BANDS) + " |")
        print("|---" * (4 + len(BANDS)) + "|")
        for kind, r in result["models"][name]["kinds"].items():
            cells = " | ".join(f"{v['gap_x1e3']:.3f} ({v['accuracy']:.2f})" for v in r["bands"].values())
            print(f"| {kind} | {r['n']} | {r['pixel_mse_x1e3']:.3f} | {r['latent_energy_x1e3']:.3f} | {cells} |")
    print("\nloss share per band, min-SNR (gamma %g) / plain MSE: " % a.snr_gamma
          + ", ".join(f"{k}: {v['min_snr']:.3f} / {v['plain']:.3f}" for k, v in result["loss_share"].items()))
    (REPO / a.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
