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
        if f.name in ("out", "model", "data", "judge", "generate_only"):
            continue
        kind = str if f.default is None else type(f.default)  # `str | None` fields (--prompts-file, --panel)
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None, dest=f.name)
    p.add_argument("--generate-only", action="store_true", default=None, dest="generate_only",
                   help="sample and keep the held-out and diversity images (OUT/generated/) and stop, with no judge: "
                        "the same command without it later scores them without sampling again (sample where the "
                        "generator runs fast, judge later)")
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
    if cfg.generate_only:
        print(json.dumps(metrics))
        return 0
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


def register_judge(sub: argparse._SubParsersAction) -> None:
    """``cxrgen judge train``: an evaluation judge on its own (``cxrgen evaluate`` trains one only as a side
    effect, with the harness's few settings)."""
    from .config import ARCHS, POOLINGS, PRECISIONS

    p = sub.add_parser("judge", help="the evaluation judge: train one on simulator (or real) data")
    jsub = p.add_subparsers(dest="judge_command", required=True)
    t = jsub.add_parser(
        "train", help="train a judge (findings + posture heads) on --data's train split",
        description=(
            "Train an evaluation judge from scratch on the train split of --data, validated on its validate split "
            "after each epoch (OUT/log.jsonl). Resumable: run the same command again after an interruption and it "
            "continues after the last finished epoch. The judge grades generated images and is never a reward."))
    t.add_argument("--data", required=True, help="MIMIC-layout data set (simulated data adds poses and kinds)")
    t.add_argument("--out", required=True, help="judge folder: judge.json, weights, log.jsonl")
    t.add_argument("--read-size", type=int, default=128,
                   help="side the films are read at: the generator's resolution, which is what the judge grades "
                        "(default 128); the network resizes them to --image-size itself")
    t.add_argument("--arch", choices=ARCHS, default=None)
    t.add_argument("--image-size", type=int, default=None, dest="image_size")
    for name in ("epochs", "batch_size", "seed", "num_workers"):
        t.add_argument("--" + name.replace("_", "-"), type=int, default=None, dest=name)
    for name in ("lr", "weight_decay", "jitter", "posture_weight"):
        t.add_argument("--" + name.replace("_", "-"), type=float, default=None, dest=name)
    t.add_argument("--lr-schedule", choices=("cosine", "constant"), default=None, dest="lr_schedule")
    t.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="bf16: the training forward under bfloat16 autocast (~2.5x faster on AVX512-BF16 CPUs)")
    t.add_argument("--pooling", choices=POOLINGS, default=None,
                   help="findings head pooling: avg (default) or avgmax, the global max beside the average so a "
                        "few bright pixels (a small calcified nodule) are not averaged away")
    t.add_argument("--no-posture", action="store_false", dest="posture", default=None,
                   help="no posture head training (real data has no ground-truth poses)")
    t.add_argument("--oversample", metavar="NAME=K,...",
                   help="training images that show a simulator kind or CheXpert label appear K times per epoch, "
                        "e.g. 'nodule=4,mass=4'")
    t.add_argument("--spot-kinds", metavar="KIND,...", default=None,
                   help="simulator kinds a spot head learns to find cell by cell (16 px cells), from the data's "
                        "finding masks (cxrgen simulate ... --finding-masks); its most confident cell feeds the "
                        "findings head, e.g. 'calcified_granuloma,nodule,mass'")
    t.add_argument("--spot-weight", type=float, default=None, dest="spot_weight",
                   help="weight of the spot head's loss (default 1)")
    t.add_argument("--spot-masks", default=None, dest="spot_masks",
                   help="finding_masks.npz to learn from (default: DATA/finding_masks.npz)")
    t.add_argument("--device", choices=("cpu", "cuda", "auto"), default=None)
    t.set_defaults(func=run_judge_train)


def run_judge_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..train.command import parse_oversample
    from .config import EvalConfig
    from .judge import JudgeConfig, train_judge

    if not Path(args.data).is_dir():
        raise FileNotFoundError(f"--data {args.data}: no such folder")
    if args.read_size < 32:
        raise ValueError(f"--read-size must be at least 32, got {args.read_size}")
    fields = {f.name for f in dataclasses.fields(JudgeConfig)}
    kw = {k: v for k, v in vars(args).items() if k in fields and v is not None and k not in ("oversample",
                                                                                            "spot_kinds")}
    if args.spot_kinds is not None:
        kw["spot_kinds"] = [k.strip() for k in args.spot_kinds.split(",") if k.strip()]
        if not kw["spot_kinds"]:
            raise ValueError("--spot-kinds: no kind given")
    if args.oversample:
        kw["oversample"] = parse_oversample(args.oversample, "NAME=K, e.g. 'nodule=4'")
    cfg = JudgeConfig(**kw)
    from .harness import dataset

    ec = EvalConfig(out=args.out, data=args.data)
    train, val = dataset(ec, "train", args.read_size, gt=cfg.posture or bool(cfg.oversample) or bool(cfg.spot_kinds)), \
        dataset(ec, "validate", args.read_size, gt=cfg.posture)
    if len(train) == 0:
        raise ValueError(f"{args.data} has no train split images")
    print("judge config:", json.dumps({**dataclasses.asdict(cfg), "read_size": args.read_size, "data": args.data}))
    judge = train_judge(train, val if len(val) else None, cfg, args.out)
    m = judge.meta.get("metrics", {})
    print(json.dumps({"out": args.out, "val_mean_auroc": m.get("val_mean_auroc"), "val_auroc": m.get("val_auroc")}))
    return 0
