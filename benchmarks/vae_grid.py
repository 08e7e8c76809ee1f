"""What each autoencoder keeps of a finding (issue 8: the latent grid the U-Net draws on).

For simulated exams with a finding of kind K, the same exam rendered with (x+) and without it (x-) (as
``conditioning_gap.py`` draws them). For each VAE, per kind:

* ``recon_mse_x1e3``: the round trip's pixel MSE on x+ (films in [-1, 1]);
* ``finding_kept``: the share of the finding that survives the round trip, the projection
  <r(x+) - r(x-), x+ - x-> / ||x+ - x-||^2 (1 = kept exactly, 0 = erased);
* ``latent_energy_x1e3``: ||z+ - z-||^2 / var(z), the share of the latent the finding occupies (posterior means):
  a finding far below the rest is a sub-cell perturbation the U-Net barely sees.

With ``--judge``, also the evaluation judge's AUROC per finding on the first ``--eval-n`` real test films of
``--eval-data`` and on each VAE's round trips of them (what ``cxrgen evaluate`` reports as ``judge_auroc_vae``):
can the judge still see the finding after the autoencoder?

Writes a results JSON and a figure (per VAE: films, round trips, the round trip's finding x4).

Usage: python benchmarks/vae_grid.py NAME=MODEL [NAME=MODEL ...] [--data runs/sim-panel] [--n 40] [--size PX]
                                     [--judge runs/judge-bal --eval-data runs/sim256-judge --eval-n 600]
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

from conditioning_gap import exam_pairs, latent_energy_x1e3  # noqa: E402
from simulate import machine, named_models  # noqa: E402

KINDS = ("central_line", "endotracheal_tube", "nodule", "calcified_granuloma", "mass", "pleural_effusion",
         "pneumothorax")


def kept(rp, rm, xp, xm) -> float:
    """The share of the finding x+ - x- that the round trip's difference r(x+) - r(x-) keeps."""
    d = xp - xm
    return float(((rp - rm) * d).sum() / (d * d).sum().clamp_min(1e-12))


def measure(vae, pairs: dict) -> dict:
    import torch

    from training.model.components import to_model_channels, vae_roundtrip

    def z(x):
        return torch.cat([vae.encode(to_model_channels(c, vae.config.in_channels)).latent_dist.mode()
                          for c in x.split(32)])

    out = {}
    with torch.no_grad():
        for kind, (xp, xm, _) in pairs.items():
            rp, rm = vae_roundtrip(vae, xp), vae_roundtrip(vae, xm)
            zp, zm = z(xp), z(xm)
            out[kind] = {"n": len(xp), "recon_mse_x1e3": float(((rp - xp) ** 2).mean() * 1e3),
                         "finding_kept": kept(rp, rm, xp, xm),
                         "latent_energy_x1e3": latent_energy_x1e3(zp, zm),
                         "latent_grid": list(zp.shape[-2:])}
    return out


def figure(vaes: dict, xp, xm, path: Path, k: int = 4) -> None:
    """Rows: films with the finding, then per VAE its round trips and their finding (x4, mid-grey = 0)."""
    import torch
    from PIL import Image, ImageDraw

    from training.model.components import vae_roundtrip

    rows, labels = [xp[:k]], ["film"]
    for name, vae in vaes.items():
        with torch.no_grad():
            rp, rm = vae_roundtrip(vae, xp[:k]), vae_roundtrip(vae, xm[:k])
        rows += [rp, (rp - rm) * 4]
        labels += [f"{name} round trip", f"{name} finding x4"]
    grid = torch.cat([torch.cat(list(r[:, 0].clamp(-1, 1)), 1) for r in rows], 0)
    img = Image.fromarray(((grid + 1) * 127.5).round().byte().numpy())
    draw = ImageDraw.Draw(img)
    side = xp.shape[-1]
    for i, label in enumerate(labels):
        draw.text((3, i * side + 2), label, fill=255)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def judged(judge, vaes: dict, data: str, n: int, size: int) -> dict:
    """The judge's AUROC per finding on real test films and on each VAE's round trips of them."""
    from training.evaluate.config import EvalConfig
    from training.evaluate.harness import dataset, judge_aurocs, take
    from training.model.components import vae_roundtrip

    images, labels, _ = take(dataset(EvalConfig(out="/dev/null", data=data), "test", size), n)
    out = {"n": len(images), "real": judge_aurocs(judge, images, labels)}
    for name, vae in vaes.items():
        out[name] = judge_aurocs(judge, vae_roundtrip(vae, images), labels)
    return out


def main() -> int:
    from training.model.checkpoint import load_pipeline

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", metavar="NAME=MODEL", help="pipeline folders whose VAEs to measure")
    p.add_argument("--data", default="runs/sim-panel", help="a simulated folder (cxrgen simulate --out)")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--n", type=int, default=40, help="exams per kind")
    p.add_argument("--size", type=int, help="film side in px (default: the first VAE's own); a VAE is "
                   "convolutional, so 256 measures a 128 px model's VAE on the films a 256 px generator would draw")
    p.add_argument("--figure-kind", default="central_line", help="the finding shown in the figure")
    p.add_argument("--figure", default="docs/vae_grid.png")
    p.add_argument("--judge", help="an evaluation judge folder: also its AUROC on real films and round trips")
    p.add_argument("--eval-data", default="runs/sim256-judge", help="with --judge: the folder whose test split it reads")
    p.add_argument("--eval-n", type=int, default=600, help="with --judge: test films (cxrgen evaluate's --n-prompts)")
    p.add_argument("--out", default="benchmarks/results/vae-grid-cpu.json")
    args = p.parse_args()
    models = named_models(p, args.models, REPO)
    if args.judge and not (REPO / args.judge).is_dir():
        p.error(f"--judge {args.judge}: no such folder")
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]

    vaes, versions, factors = {}, {}, {}
    for name, folder in models:
        pipe, manifest = load_pipeline(REPO / folder)
        vaes[name], versions[name] = pipe.vae.eval(), (manifest.version if manifest else None)
        factors[name] = pipe.vae_scale_factor
    size = args.size if args.size is not None else next(iter(vaes.values())).config.sample_size
    if size <= 0 or any(size % f for f in factors.values()):
        p.error(f"--size {size}: not a multiple of every VAE's downsampling factor ({factors})")
    t0 = time.time()
    pairs = exam_pairs(Path(args.data), kinds, args.n, size)
    res = {name: measure(vae, pairs) for name, vae in vaes.items()}
    if args.figure and args.figure_kind in pairs:
        xp, xm, _ = pairs[args.figure_kind]
        figure(vaes, xp, xm, REPO / args.figure)
    judge = None
    if args.judge:
        from training.evaluate.judge import load_judge

        judge = judged(load_judge(REPO / args.judge), vaes, str(REPO / args.eval_data), args.eval_n, size)
    out = {"benchmark": "vae_grid", "machine": machine(), "data": args.data, "n": args.n, "size": size,
           "models": {n: {"model": f, "version": versions[n]} for n, f in models},
           "seconds": round(time.time() - t0, 1), "results": res}
    if judge is not None:
        out["judge"] = {"judge": args.judge, "data": args.eval_data, **judge}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    from training.artifacts import jsonable

    Path(args.out).write_text(json.dumps(jsonable(out), indent=2) + "\n")
    print("| finding | " + " | ".join(f"{n}: recon MSE x1e-3 / kept / latent energy x1e-3" for n in res) + " |")
    print("|---|" + "---|" * len(res))
    for kind in pairs:
        print(f"| {kind} | " + " | ".join(
            f"{r[kind]['recon_mse_x1e3']:.2f} / {r[kind]['finding_kept']:.2f} / {r[kind]['latent_energy_x1e3']:.2f}"
            for r in res.values()) + " |")
    if judge is not None:
        print(f"\njudge AUROC on {judge['n']} test films: real / " + " / ".join(vaes) + " round trips")
        for k, v in judge["real"].items():
            print(f"| {k} | {v:.3f} | " + " | ".join(f"{judge[n][k]:.3f}" for n in vaes) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
