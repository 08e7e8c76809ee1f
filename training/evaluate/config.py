"""``EvalConfig``: the evaluation harness's settings, in a module without torch so that the CLI (which
builds its flags from these fields) starts fast; ``harness.py`` runs it."""

from __future__ import annotations

import dataclasses

ARCHS: tuple[str, ...] = ("densenet121", "resnet18")  # judge backbones (training.evaluate.judge)
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")  # judge training precisions
# How the judge's findings head pools the backbone's last feature map: "avg" (global average, as torchvision's
# classifiers) or "avgmax" (global average and global max side by side, so a few bright pixels, a 1-3 px
# granuloma, are not averaged away). The FID features and the posture head always use the average.
POOLINGS: tuple[str, ...] = ("avg", "avgmax")


@dataclasses.dataclass
class EvalConfig:
    out: str = ""  # report folder: metrics.json, report.md, samples.png, auroc.png
    model: str = ""  # generator checkpoint folder
    data: str = ""  # simulated MIMIC-layout data set: train trains judges, validate / test are held out
    judge: str | None = None  # trained judge folder (judge.json); default: train one into OUT/judge
    judge_arch: str = "densenet121"  # judge backbone when one is trained here
    judge_epochs: int = 8  # judge training epochs
    judge_size: int = 128  # judge input side
    n_prompts: int = 200  # held-out test prompts, one image each (conditioning, FID, posture)
    prompts_file: str | None = None  # more held-out prompts (.jsonl with findings / .txt), generated-only: conditioning, panel
    panel: str | None = None  # simulated expert panel for the plausibility rate (default: models/panel; "none": skip)
    diversity_prompts: int = 25  # prompts with 4 samples each for MS-SSIM
    augment_real: int = 200  # N real training images in the augmentation experiment (0: skip the experiment)
    augment_synthetic: int = 200  # M synthetic images added to them
    augment_epochs: int = 6  # epochs of each augmentation classifier
    augment_arch: str = "resnet18"  # backbone of the augmentation classifiers
    steps: int = 25  # sampling steps
    guidance: float = 4.0  # classifier-free guidance
    scheduler: str = "ddim"  # sampler, one of training.generation.SCHEDULERS (as cxrgen generate --scheduler)
    batch_size: int = 16  # generation batch
    seed: int = 0  # generation and training seed
    # sample and keep the held-out and diversity images (OUT/generated/) and stop: no judge, no metrics; a later
    # evaluation into the same OUT (with a judge) scores them without sampling again
    generate_only: bool = False
    device: str = "cpu"  # "cpu" or "cuda"
    train_split: str = "train"  # split that trains the judge and the augmentation classifiers
    val_split: str = "validate"  # held-out split: effusion threshold, FID floor
    test_split: str = "test"  # held-out split: prompts and real reference images

    def validate(self) -> None:
        for name in ("out", "model", "data"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required")
        from ..generation import SCHEDULERS

        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown --scheduler {self.scheduler!r}; known: {sorted(SCHEDULERS)}")
        if self.n_prompts < 8:
            raise ValueError(f"--n-prompts must be >= 8 (AUROC needs both classes), got {self.n_prompts}")
