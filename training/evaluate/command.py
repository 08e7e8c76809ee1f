"""``cxrgen evaluate``: metrics, plots and a sample grid for a generator checkpoint."""

from __future__ import annotations

import argparse
import dataclasses
import json

from .config import EvalConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="evaluate a generator: conditioning AUROC, effusion detection, FID/KID, MS-SSIM, posture, augmentation",
        description=(
            "Generate images for held-out test prompts of --data (a MIMIC-layout data set; simulated data adds "
            "ground truth) and measure them with a CXR judge (DenseNet-121 trained on --data's train split into "
            "OUT/judge unless --judge is given). Writes OUT/metrics.json, OUT/report.md, OUT/samples.png, "
            "OUT/auroc.png and the judge / augmentation classifiers' folders. --write-manifest also stores the "
            "metrics in the model's cxrgen_manifest.json."
        ),
    )
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=None, help="generator checkpoint (default: models/default)")
    p.add_argument("--data", required=True, help="MIMIC-layout data set with train / validate / test splits")
    p.add_argument("--judge", default=None, help="trained judge folder (judge.json)")
    for f in dataclasses.fields(EvalConfig):
        if f.name in ("out", "model", "data", "judge"):
            continue
        kind = str if f.default is None else type(f.default)  # `str | None` fields (--prompts-file, --panel)
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None, dest=f.name)
    p.add_argument("--write-manifest", action="store_true", help="store the metrics in the model's manifest")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..generation import DEFAULT_MODEL

    cfg = EvalConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EvalConfig)
                        if getattr(args, f.name, None) is not None})
    cfg.model = cfg.model or str(DEFAULT_MODEL)
    if not Path(cfg.model).exists():
        raise FileNotFoundError(f"no model at {cfg.model}; pass --model PATH")
    cfg.validate()
    print("evaluate config:", json.dumps(dataclasses.asdict(cfg)))
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from .harness import evaluate

    # Not a warning quoting the cut-off words of every long report (hundreds per evaluation).
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    metrics = evaluate(cfg)
    if args.write_manifest:
        from ..model.checkpoint import Manifest

        manifest = Manifest.read(Path(cfg.model))
        if manifest is None:
            raise ValueError(f"{cfg.model} has no cxrgen manifest to write metrics into")
        manifest.metrics.update(metrics)
        manifest.write(Path(cfg.model))
    keys = ("conditioning_auroc_mean", "effusion_detection_rate", "fid", "fid_floor", "ms_ssim_generated",
            "ms_ssim_real", "augmentation_auroc_real_only", "augmentation_auroc_real_plus_synthetic")
    print(json.dumps({k: metrics.get(k) for k in keys}))
    return 0
