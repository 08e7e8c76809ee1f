"""Does a model's preference for a device sentence read the film or only the words? (issue 8, the prompt contrast)

The prompt contrast (``cxrgen train --contrast``) trains a margin: the denoising error of a report without its
device sentences minus that of the report, on the same noisy latent. Two measurements of that margin on films
the model did not train on, per model:

* ``text_or_film``: simulated exams with a device (kind K), rendered with it (x+) and, every other draw kept,
  without it (x-), as ``conditioning_gap.py`` draws them. The margin on x- is what the words earn whatever the
  film shows; x+ minus x- is the part that reads the film (a model that draws the device where the words say:
  large and positive; a model that only knows which texts go with devices: about zero).
* ``inserted``: test films without a device, AP and PA apart: the margin of the report with a device sentence
  (from the data's positive reports) prepended over the report itself (a view confound shows as AP != PA).

Margins are min-SNR (gamma 5) weighted per-image MSE differences, averaged over t = 50, 200, 400, 700 (one
noise draw each, seeded), on posterior-mean latents; reported x1e-5 with standard errors over exams.

Usage: python benchmarks/contrast_margins.py NAME=MODEL [NAME=MODEL ...] [--exams runs/sim-panel]
                                             [--films runs/sim128] [--n 40] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from conditioning_gap import exam_pairs  # noqa: E402
from simulate import machine, named_models  # noqa: E402

TIMESTEPS = (50, 200, 400, 700)
KINDS = ("central_line", "endotracheal_tube")


def margins(pipe, sched, images, prompts, others, gamma: float = 5.0):
    """Per image: mean over TIMESTEPS of w(t) * [err(others) - err(prompts)] (images (N, 1, H, W) in [-1, 1])."""
    import torch

    from training.model.components import to_model_channels
    from training.train.loop import Parts, encode_text, min_snr_weight

    parts = Parts(pipe, {})
    with torch.no_grad():
        x = to_model_channels(images, pipe.vae.config.in_channels)
        z = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
        out = []
        for t0 in TIMESTEPS:
            noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(t0))
            t = torch.full((len(z),), t0)
            noisy = sched.add_noise(z, noise, t)

            def err(texts):
                return ((pipe.unet(noisy, t, encode_text(parts, texts)).sample - noise) ** 2).mean((1, 2, 3))

            out.append((err(others) - err(prompts)) * min_snr_weight(sched, t, gamma))
    return torch.stack(out).mean(0)


def summary(m) -> dict:
    n = len(m)
    return {"n": n, "margin_x1e5": float(m.mean()) * 1e5,
            "se_x1e5": float(m.std() / n ** 0.5) * 1e5 if n > 1 else None, "positive": float((m > 0).float().mean())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", metavar="NAME=MODEL")
    p.add_argument("--exams", default="runs/sim-panel", help="simulated folder for the with / without renders")
    p.add_argument("--films", default="runs/sim128", help="MIMIC-layout folder: test films and positive reports")
    p.add_argument("--n", type=int, default=40, help="exams per kind, and films per view")
    p.add_argument("--out", default="benchmarks/results/contrast-margins-cpu.json")
    a = p.parse_args()
    models = named_models(p, a.models, REPO)
    for flag, folder in (("--exams", a.exams), ("--films", a.films)):
        if not (REPO / folder / "ground_truth.jsonl").is_file():
            p.error(f"{flag} {folder}: not a cxrgen simulate folder (no ground_truth.jsonl)")
    import torch
    from diffusers import DDPMScheduler

    from training.data.mimic import MimicCXRDataset
    from training.data.reports import mention_sentences, strip_mentions
    from training.findings import OBSERVATIONS
    from training.model.checkpoint import load_pipeline
    from training.train.contrast import contrast_labels, label_kinds

    kinds = label_kinds("Support Devices")
    first = load_pipeline(REPO / models[0][1])
    size = first[0].vae.config.sample_size
    pairs = exam_pairs(REPO / a.exams, KINDS, a.n, size)
    train = MimicCXRDataset(root=REPO / a.films, views=("PA", "AP"), split="train", size=size, normalize="unit")
    test = MimicCXRDataset(root=REPO / a.films, views=("PA", "AP"), split="test", size=size, normalize="unit")
    col = OBSERVATIONS.index("Support Devices")
    rows = train.frame.reset_index(drop=True)
    reports = [train.prompt(r.subject_id, r.study_id) for r in rows.itertuples()]
    (spec,) = contrast_labels({"Support Devices": 1.0}, reports, train.labels)  # the sentences training inserts
    trows = test.frame.reset_index(drop=True)
    films = {v: [i for i in range(len(test)) if test.labels[i][col] == 0 and trows.view[i] == v][:a.n]
             for v in ("AP", "PA")}
    result = {"benchmark": "contrast_margins", "device": machine(), "exams": a.exams, "films": a.films, "n": a.n,
              "timesteps": list(TIMESTEPS), "models": {}}
    for i, (name, folder) in enumerate(models):
        pipe, _ = first if i == 0 else load_pipeline(REPO / folder)
        sched = DDPMScheduler.from_config(pipe.scheduler.config)
        row = {"model": folder, "text_or_film": {}, "inserted": {}}
        for kind, (xp, xm, prompts) in pairs.items():
            keep = [j for j, q in enumerate(prompts) if mention_sentences(q, kinds)]
            full = [prompts[j] for j in keep]
            stripped = [strip_mentions(q, kinds) for q in full]
            mp, mm = margins(pipe, sched, xp[keep], full, stripped), margins(pipe, sched, xm[keep], full, stripped)
            row["text_or_film"][kind] = {"with": summary(mp), "without": summary(mm), "film_part": summary(mp - mm)}
        for view, idx in films.items():
            items = [test[j] for j in idx]
            own = [it["prompt"] for it in items]
            rng = random.Random(1)
            inserted = [f"{rng.choice(spec.sentences)} {q}" for q in own]
            row["inserted"][view] = summary(margins(pipe, sched, torch.stack([it["image"] for it in items]),
                                                    own, inserted))
        result["models"][name] = row
        for kind, r in row["text_or_film"].items():
            print(f"{name} {kind}: margin x1e5 with the device {r['with']['margin_x1e5']:.2f}, without "
                  f"{r['without']['margin_x1e5']:.2f}, film part {r['film_part']['margin_x1e5']:.2f} "
                  f"(SE {r['film_part']['se_x1e5']:.2f}, positive {r['film_part']['positive']:.2f})")
        print(f"{name} inserted device sentence, films without a device: " + ", ".join(
            f"{v} {r['margin_x1e5']:.1f} (SE {r['se_x1e5']:.1f})" for v, r in row["inserted"].items()), flush=True)
    (REPO / a.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
