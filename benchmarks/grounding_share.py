"""Where a model's words for a lesion look: the share of their cross-attention that falls on the lesion.

For the test films of a simulated data set that hold a kind (the simulator's finding masks) and whose report
names it, each film is encoded, noised at timestep t (fixed seeds) and denoised once under its own report; the
U-Net's cross-attention of the kind's words (train/ground.py) is read per layer, and the share of it on the
cells the lesion touches is averaged over films and layers. Beside it, the share a word spreading its attention
evenly would get (the mask's area on that grid): a share near that one means the word is not tied to the
lesion, which is what token grounding (`cxrgen train --ground`) trains.

Usage: python benchmarks/grounding_share.py --model M [--model M2 ...] --data DATA [--kinds mass,nodule]
    [--n 64] [--t 200,500,800] [--out benchmarks/results/grounding-share-cpu.json]
    [--figure PNG --evals EVAL1,EVAL2]   the first test films of each kind, each real film above the images the
                                         evaluations (cxrgen evaluate, --generate-only will do) made for its report
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

from simulate import machine  # noqa: E402


def films_with_words(data: str, kinds: tuple[str, ...], n: int, size: int, tokenizer):
    """Up to ``n`` test films per kind that hold it and whose report names it within the tokenizer's length:
    [(kind, dicom_id, prompt, image)]."""
    from training.data.mimic import MimicCXRDataset
    from training.simulator.masks import load_masks
    from training.train.ground import word_positions

    ds = MimicCXRDataset(root=data, split="test", size=size, normalize="unit")
    out = []
    for kind in kinds:
        table, _ = load_masks(data, (kind,))
        found = 0
        for i, r in enumerate(ds.frame.itertuples()):
            d = str(r.dicom_id)
            if found >= n or d not in table or not table[d].any():
                continue
            prompt = ds.prompt(r.subject_id, r.study_id)
            if word_positions(tokenizer, [prompt], (kind,)).sum() == 0:
                continue
            out.append((kind, d, prompt, ds[i]["image"]))
            found += 1
    return out


def measure(model: str, data: str, kinds: tuple[str, ...], n: int, timesteps: list[int], seed: int = 0) -> dict:
    import torch
    import torch.nn.functional as F

    from training.model.checkpoint import Manifest, load_pipeline
    from training.simulator.masks import grid_masks
    from training.train.ground import Grounding, grounding_loss, install, uninstall, word_positions
    from training.train.loop import encode_text, to_model_channels

    pipe, _ = load_pipeline(model)
    size = pipe.vae.config.sample_size
    films = films_with_words(data, kinds, n, size, pipe.tokenizer)
    g = Grounding()
    before = install(pipe.unet, g)
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    grid = (size // factor, size // factor)
    rows = {k: {"films": 0, "share": {}, "even": {}} for k in kinds}
    try:
        for kind in kinds:
            sel = [f for f in films if f[0] == kind]
            rows[kind]["films"] = len(sel)
            if not sel:
                continue
            masks = grid_masks(data, [f[1] for f in sel], (kind,), grid)  # (N, 1, h, w)
            prompts = [f[2] for f in sel]
            with torch.no_grad():
                x = to_model_channels(torch.stack([f[3] for f in sel]), pipe.vae.config.in_channels)
                lat = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
                text = encode_text(pipe, prompts)
                pos = word_positions(pipe.tokenizer, prompts, (kind,))
                for t in timesteps:
                    gen = torch.Generator().manual_seed(seed + t)
                    noise = torch.randn(lat.shape, generator=gen)
                    tt = torch.full((len(sel),), t, dtype=torch.long)
                    g.start(pos)
                    pipe.unet(pipe.scheduler.add_noise(lat, noise, tt), tt, text)
                    maps = g.stop()
                    _, share = grounding_loss(maps, masks, torch.ones(1), pos)  # the training term's own share
                    evens = []  # what an evenly spread word gets: the lesion's area on each layer's grid
                    for a in maps:
                        side = int(round(a.shape[-1] ** 0.5))
                        evens.append(F.adaptive_max_pool2d(masks.float(), (side, side)).mean().item())
                    rows[kind]["share"][str(t)] = round(share, 4)
                    rows[kind]["even"][str(t)] = round(sum(evens) / len(evens), 4)
    finally:
        uninstall(pipe.unet, before)
    return {"model": model, "version": Manifest.read(Path(model)).version, "size": size, "kinds": rows}


def look_figure(data: str, evals: list[str], kinds: tuple[str, ...], path: Path, per_kind=(7, 4, 3)) -> int:
    """A PNG: for the first test films of each kind, the real film above each evaluation's image of its report
    (the evaluations' cached held-out images, first prompts = the test split's). Returns the columns drawn."""
    from judge_findings import stack_figure
    from training.evaluate.harness import EvalConfig, dataset, load_generated

    gens = [load_generated(e) for e in evals]
    size = gens[0].shape[-1]
    n = min(len(g) for g in gens)
    ds = dataset(EvalConfig(out="", model="", data=data), "test", size)
    rows = [ds.ground_truth[d] for d in ds.frame["dicom_id"][:n]]  # the films are read only where drawn
    return stack_figure(rows, kinds, per_kind, lambda i: [ds[i]["image"][0], *(g[i, 0] for g in gens)], path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", action="append", required=True, help="a pipeline folder (repeatable)")
    p.add_argument("--data", required=True, help="a simulated data set with finding masks")
    p.add_argument("--kinds", default="mass,nodule,calcified_granuloma")
    p.add_argument("--n", type=int, default=64, help="test films per kind")
    p.add_argument("--t", default="200,500,800", help="timesteps, comma list")
    p.add_argument("--out", help="JSON results file")
    p.add_argument("--figure", help="with --evals: a PNG of real films above the evaluations' images")
    p.add_argument("--evals", help="comma list of cxrgen evaluate folders of --data (their generated/heldout.pt)")
    a = p.parse_args()
    if bool(a.figure) != bool(a.evals):
        p.error("--figure and --evals go together")
    if a.evals:
        missing = [e for e in a.evals.split(",") if not (Path(e) / "generated" / "heldout.pt").is_file()]
        if missing:
            p.error(f"--evals: no generated/heldout.pt in {missing} (run cxrgen evaluate, --generate-only will do)")
    from training.simulator.masks import MASKS_FILE, load_masks
    from training.train.ground import KIND_WORDS

    kinds = tuple(k.strip() for k in a.kinds.split(",") if k.strip())
    bad = [k for k in kinds if k not in KIND_WORDS]
    if bad:
        p.error(f"--kinds: no report words are known for {bad}; known: {sorted(KIND_WORDS)}")
    if not (Path(a.data) / MASKS_FILE).is_file():
        p.error(f"{a.data} has no {MASKS_FILE}: make them with `cxrgen simulate --out {a.data} ... --finding-masks`")
    try:
        load_masks(a.data, kinds)
        timesteps = [int(x) for x in a.t.split(",") if x.strip()]
    except ValueError as e:
        p.error(str(e))
    t0 = time.perf_counter()
    results = [measure(m, a.data, kinds, a.n, timesteps) for m in a.model]
    doc = {"benchmark": "grounding_share", "machine": machine(), "data": a.data, "n_per_kind": a.n,
           "timesteps": timesteps, "seconds": round(time.perf_counter() - t0, 1), "models": results}
    for r in results:
        for kind, row in r["kinds"].items():
            cells = " ".join(f"t={t}: {row['share'][t]:.3f} (even {row['even'][t]:.3f})" for t in row["share"])
            print(f"{r['version']:24s} {kind:20s} films {row['films']:3d}  {cells}")
    if a.out:
        Path(a.out).write_text(json.dumps(doc, indent=2) + "\n")
    if a.figure:
        drawn = look_figure(a.data, a.evals.split(","), kinds, Path(a.figure))
        print(f"{a.figure}: {drawn} films, real above {a.evals}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
