"""Which findings survive the generator's softness (issue 8: why support devices do not move).

The generated images are softer than the real films (fewer fine details: see the README's grids). A finding
drawn in fine detail (a 1-2 px catheter, a granuloma) can be lost to that softness even when the VAE keeps it
(the judge's AUROC on VAE round trips). This diagnostic measures it without the generator's conditioning:

1. the radially averaged power spectrum of the generated images of an evaluation (its cached
   OUT/generated/heldout.pt, the test prompts' images) against the real test films they were prompted from;
2. the real test films blurred by a Gaussian of each --sigmas (px at the generator's resolution): the fraction
   of their fine-scale power (above --band cycles / px) that remains, and the evaluation judge's AUROC per
   finding on them;
3. the real films filtered to the generated images' spectrum (each frequency's amplitude scaled by
   sqrt(generated power / real power), capped at 1: softened, never sharpened): the judge's AUROC per finding
   on real films as soft as the generated ones, beside its AUROC on the generated images. The Gaussian whose
   fine-scale power matches the generated images' is reported too (interpolated between sigmas).

A finding whose real AUROC falls to near 0.5 at the generated images' softness cannot be carried by images
that soft, whatever the conditioning; one that holds is the generator's to draw.

Usage: python benchmarks/sharpness.py --eval runs/eval-bal-default [--judge runs/judge-bal]
                                      [--data runs/sim256-judge] [--out FILE]
Writes benchmarks/results/sharpness-cpu.json (or --out) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from simulate import machine  # noqa: E402


def radial_power(images):
    """Mean radially averaged power spectrum of (N, 1, H, W) images (each image's mean removed, then a Hann
    window: without it the jump between opposite edges puts power at every frequency, blur or not):
    (freqs, power), frequency in cycles / px, one bin per integer radius up to H / 2."""
    import torch

    x = images[:, 0].double()
    x = x - x.mean(dim=(1, 2), keepdim=True)
    h, w = x.shape[-2:]
    x = x * torch.outer(torch.hann_window(h, periodic=False, dtype=x.dtype), torch.hann_window(w, periodic=False, dtype=x.dtype))
    p = torch.fft.fftshift(torch.fft.fft2(x).abs() ** 2, dim=(-2, -1)).mean(0)
    h, w = p.shape
    yy, xx = torch.meshgrid(torch.arange(h) - h // 2, torch.arange(w) - w // 2, indexing="ij")
    r = torch.sqrt(yy.double() ** 2 + xx.double() ** 2).round().long()
    n = min(h, w) // 2
    power = torch.stack([p[r == k].mean() for k in range(n + 1)])
    return torch.arange(n + 1).double() / min(h, w), power


def band_power(images, band: float, spectrum=None) -> float:
    """Power above ``band`` cycles / px (the fine scale); ``spectrum``: ``radial_power(images)`` when known."""
    f, p = spectrum or radial_power(images)
    return float(p[f >= band].sum())


def blur(images, sigma: float):
    import torchvision.transforms.functional as TF

    if sigma <= 0:
        return images
    k = 2 * int(3 * sigma + 0.5) + 1
    return TF.gaussian_blur(images, [k, k], [sigma, sigma])


def soften(images, freqs, gain):
    """``images`` filtered by a radial transfer function: ``gain`` (per frequency of ``freqs``, cycles / px,
    linear in between, 0 beyond the last) on each frequency's amplitude. Reflect-padded by a quarter side so
    the filter does not wrap one edge into the other."""
    import numpy as np
    import torch

    n, _, h, w = images.shape
    pad = h // 4
    x = torch.nn.functional.pad(images.double(), (pad, pad, pad, pad), mode="reflect")[:, 0]
    fy = torch.fft.fftfreq(x.shape[-2], dtype=torch.double)[:, None]
    fx = torch.fft.fftfreq(x.shape[-1], dtype=torch.double)[None, :]
    r = torch.sqrt(fy ** 2 + fx ** 2).numpy()
    h2d = torch.from_numpy(np.interp(r, freqs.numpy(), gain.numpy(), right=0.0))
    y = torch.fft.ifft2(torch.fft.fft2(x) * h2d).real
    return y[:, None, pad:pad + h, pad:pad + w].to(images.dtype)


def matching_sigma(sigmas: list[float], fractions: list[float], target: float) -> float | None:
    """The blur (linear between measured sigmas) whose remaining fine-scale power fraction equals ``target``;
    None when the target lies outside the measured range."""
    for (s0, f0), (s1, f1) in zip(zip(sigmas, fractions), zip(sigmas[1:], fractions[1:])):
        if min(f0, f1) <= target <= max(f0, f1):
            return s0 + (s1 - s0) * ((target - f0) / (f1 - f0) if f1 != f0 else 0.0)
    return None


def main() -> int:
    import torch

    from training.evaluate.config import EvalConfig
    from training.evaluate.harness import dataset, judge_aurocs, load_generated, take
    from training.evaluate.judge import load_judge

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--eval", required=True, help="an evaluation folder (cxrgen evaluate --out) with generated/heldout.pt")
    p.add_argument("--judge", default="runs/judge-bal")
    p.add_argument("--data", default="runs/sim256-judge", help="the evaluation's --data (its test split)")
    p.add_argument("--sigmas", default="0,0.5,0.75,1,1.25,1.5,2", help="Gaussian blurs of the real films, px")
    p.add_argument("--band", type=float, default=0.25, help="fine scale: power above this many cycles / px")
    p.add_argument("--out", default="benchmarks/results/sharpness-cpu.json")
    a = p.parse_args()
    ev = REPO / a.eval
    metrics, cache = ev / "metrics.json", ev / "generated" / "heldout.pt"
    if not metrics.is_file() or not cache.is_file():
        p.error(f"--eval {a.eval}: needs metrics.json and generated/heldout.pt (a finished cxrgen evaluate)")
    try:
        sigmas = sorted(float(s) for s in a.sigmas.split(","))
    except ValueError:
        p.error(f"--sigmas {a.sigmas!r}: comma-separated numbers, e.g. 0,0.5,1")
    if sigmas[0] != 0:
        sigmas = [0.0] + sigmas
    m = json.loads(metrics.read_text())
    n = int(m["n_prompts"])
    gen = load_generated(ev)[:n]
    size = gen.shape[-1]
    real, labels, _ = take(dataset(EvalConfig(out="/dev/null", data=str(REPO / a.data)), "test", size), n)
    judge = load_judge(REPO / a.judge)
    aurocs = lambda images: judge_aurocs(judge, images, labels)  # noqa: E731
    f, pr = real_spectrum = radial_power(real)
    _, pg = gen_spectrum = radial_power(gen)
    real_band = band_power(real, a.band, real_spectrum)
    gen_fraction = band_power(gen, a.band, gen_spectrum) / real_band
    rows = []
    for s in sigmas:
        b = blur(real, s)
        rows.append({"sigma": s, "fine_power_fraction": band_power(b, a.band) / real_band, "judge_auroc": aurocs(b)})
        print(f"sigma {s}: fine power {rows[-1]['fine_power_fraction']:.3f}", flush=True)
    fractions = [r["fine_power_fraction"] for r in rows]
    s_match = matching_sigma(sigmas, fractions, gen_fraction)
    gain = (pg / pr).clamp(max=1.0).sqrt()
    softened = soften(real, f, gain)
    matched = aurocs(softened)
    matched_fraction = band_power(softened, a.band) / real_band
    gen_auroc = aurocs(gen)
    result = {"benchmark": "sharpness", "device": machine(), "eval": a.eval, "model_version": m.get("model_version"),
              "judge": a.judge, "data": a.data, "n": n, "size": size, "band_cycles_per_px": a.band,
              "generated_fine_power_fraction": gen_fraction, "matching_sigma": s_match,
              "softened_fine_power_fraction": matched_fraction,
              "spectrum": {"cycles_per_px": f.tolist(), "generated_over_real": (pg / pr).tolist()},
              "blurred_real": rows, "judge_auroc_real_matched": matched, "judge_auroc_generated": gen_auroc}
    out = REPO / a.out
    out.write_text(json.dumps(result, indent=1) + "\n")
    names = list(rows[0]["judge_auroc"])
    cols = [f"real, sigma {r['sigma']:g} ({r['fine_power_fraction']:.2f})" for r in rows]
    match_col = f"real, generated spectrum ({matched_fraction:.2f})"
    sig = f"a Gaussian of sigma {s_match:.2f} px matches" if s_match is not None else "no Gaussian of --sigmas matches"
    print(f"\nGenerated images keep {gen_fraction:.3f} of the real films' power above {a.band} cycles/px ({sig}).\n")
    print("| finding | " + " | ".join(cols) + f" | {match_col} | generated |")
    print("|---" * (len(cols) + 3) + "|")
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    for k in names:
        print(f"| {k} | " + " | ".join(fmt(r["judge_auroc"].get(k)) for r in rows)
              + f" | {fmt((matched or {}).get(k))} | {fmt(gen_auroc.get(k))} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
