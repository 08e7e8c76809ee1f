"""Held-out verdicts on an aligned generator (issue 8): what alignment is watched and gated by.

Three separate eyes, never mixed up: the *reward models* (trained on the panel's ratings) are what
alignment optimises; the *simulated expert panel* rates plausibility; the *evaluation judge* grades
conditioning and posture. ``probe`` samples a fixed set of held-out prompts with fixed seeds
(deterministic DDIM, so two probes differ only by the weights) and returns all three:

* ``reward``: the run's weighted reward on held-out prompts (what early stopping selects on: the
  training objective on prompts it never trained on);
* ``panel_plausible_rate``: the panel's majority verdict rate (a guard: a drop past tolerance stops
  the run; it is never a training signal);
* ``judge_auroc_mean`` / ``judge_agreement``: the evaluation judge on the same images (a guard).

``EarlyStop`` turns a series of probes into keep-the-best / stop decisions.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch

from training.findings import OBSERVATIONS, Finding, labels as finding_labels


@dataclasses.dataclass
class HeldoutSet:
    """Held-out prompts with their true findings and CheXpert labels (N, 14)."""

    prompts: list[str]
    findings: list[list[Finding]]

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([[finding_labels(fs)[o] for o in OBSERVATIONS] for fs in self.findings])

    def __len__(self) -> int:
        return len(self.prompts)

    @classmethod
    def load(cls, data: str | None = None, split: str = "validate", limit: int = 32,
             prompts_file: str | None = None) -> "HeldoutSet":
        """``limit`` studies of ``split`` of a simulated data set, plus every prompt of ``prompts_file``."""
        from training.generation import read_data_prompts, read_prompts_file

        pairs = list(read_data_prompts(data, split, limit)) if data and limit > 0 else []
        if prompts_file:
            pairs += read_prompts_file(prompts_file)
        if not pairs:
            raise ValueError("held-out set is empty: give a data set split and/or a prompts file")
        return cls([p for p, _ in pairs], [list(f) for _, f in pairs])


def sample(pipe, held: HeldoutSet, seed: int, steps: int, guidance: float, batch_size: int = 16,
           size: int | None = None) -> torch.Tensor:
    """One image per held-out prompt, (N, 1, H, W) in [-1, 1]; image i from ``seed + i`` (as ``generate``)."""
    from diffusers import DDIMScheduler
    from diffusers.utils import logging as diffusers_logging

    from training.generation import generate

    diffusers_logging.set_verbosity_error()  # not a warning quoting the cut-off words of every long report
    sched = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(sched.config)  # eta = 0 in the pipeline: deterministic
    try:
        imgs = generate(pipe, held.prompts, seed, steps, guidance, "", batch_size, size or pipe.vae.config.sample_size)
    finally:
        pipe.scheduler = sched
    return torch.from_numpy(imgs)[:, None] * 2 - 1


def panel_verdicts(panel, raters, images: torch.Tensor, findings, seed: int = 0, tag: str = "heldout") -> dict:
    """The panel's plausibility rates for images (N, 1, H, W) in [-1, 1] against their prompted findings."""
    from training.expert.raters import rate
    from training.expert.report import summarise

    assessed = panel.assess(images.float(), [[f.to_dict() if isinstance(f, Finding) else f for f in fs]
                                             for fs in findings])
    votes, failed = {}, []
    for i, a in enumerate(assessed):
        ratings = [rate(r, a, seed, f"{tag}:{i}") for r in raters]
        votes[i] = {v.rater_id: v.plausible for v in ratings}
        failed += [v.failed for v in ratings]
    s = summarise(votes, failed, [r.id for r in raters])
    return {"panel_plausible_rate": s["plausible_rate_majority"], "panel_plausible_ratings": s["plausible_rate_ratings"]}


def judge_verdicts(judge, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """The evaluation judge on generated images: AUROC per finding against the prompts' labels (where both
    classes occur), their mean, and the agreement (share of (image, finding) calls matching the label)."""
    from training.evaluate import judge as J
    from training.evaluate.harness import ImageSet

    probs, lab, mask, _, _ = J.predict(judge, ImageSet(images, labels))
    aurocs = J.auroc_per_finding(probs, lab, mask)
    agree = ((probs > 0.5).float() == lab)[mask].float().mean().item() if mask.any() else math.nan
    return {"judge_auroc_mean": J.mean_auroc(aurocs), "judge_agreement": agree,
            "judge_auroc": {k: v for k, v in aurocs.items() if v is not None and not math.isnan(v)}}


@torch.no_grad()
def probe(pipe, held: HeldoutSet, reward_fn=None, panel=None, raters=None, judge=None, seed: int = 0,
          steps: int = 10, guidance: float = 4.0, size: int | None = None) -> dict:
    """Sample the held-out prompts and return every available verdict (keys absent for missing eyes)."""
    images = sample(pipe, held, seed, steps, guidance, size=size)
    out: dict = {"heldout_n": len(held)}
    if reward_fn is not None:
        out["reward"] = float(reward_fn(images, held.prompts, [[f.to_dict() for f in fs] for fs in held.findings])
                              .mean())
    if panel is not None:
        out.update(panel_verdicts(panel, raters, images, held.findings, seed))
    if judge is not None:
        out.update(judge_verdicts(judge, images, held.labels))
    return out


def load_eyes(panel_path: str | None, judge_path: str | None, raters: str | None = None, device: str = "cpu"):
    """(panel, raters, judge): the panel from ``panel_path`` (default models/panel when it exists) and the
    judge from ``judge_path`` (none by default: a judge is trained per data set by ``cxrgen evaluate``)."""
    from training.expert.panel import Panel
    from training.expert.raters import select_raters

    from training.evaluate.judge import load_judge

    panel = raters_ = judge = None
    path = Path(panel_path) if panel_path else Path(__file__).resolve().parents[2] / "models" / "panel"
    if panel_path or path.is_dir():
        panel = Panel.load(path, device=device)
        raters_ = select_raters([s.strip() for s in raters.split(",") if s.strip()] if raters else None)
    if judge_path:
        judge = load_judge(judge_path, device=device)
    return panel, raters_, judge


@dataclasses.dataclass
class EarlyStop:
    """Keep the probe with the best held-out reward; stop after ``patience`` probes without a better one
    (0: never), or at once when a guard (panel plausibility, judge AUROC) falls more than its tolerance below
    the first probe's value: the reward rising while the panel or judge falls is reward hacking."""

    patience: int = 0
    panel_tolerance: float = 0.05
    judge_tolerance: float = 0.03
    best: float = -math.inf
    best_iteration: int = 0
    since_best: int = 0
    first: dict = dataclasses.field(default_factory=dict)
    reason: str = ""

    def update(self, iteration: int, verdicts: dict) -> tuple[bool, bool]:
        """(this probe is the best so far, stop now)."""
        if not self.first:
            self.first = dict(verdicts)
        for key, tol in (("panel_plausible_rate", self.panel_tolerance), ("judge_auroc_mean", self.judge_tolerance)):
            a, b = self.first.get(key), verdicts.get(key)
            if a is not None and b is not None and not (math.isnan(a) or math.isnan(b)) and b < a - tol:
                self.reason = f"{key} fell from {a:.3f} to {b:.3f} (tolerance {tol}) at round {iteration}"
                return False, True
        r = verdicts.get("reward", math.nan)
        better = not math.isnan(r) and r > self.best
        if better:
            self.best, self.best_iteration, self.since_best = r, iteration, 0
        else:
            self.since_best += 1
        if self.patience and self.since_best >= self.patience:
            self.reason = f"no better held-out reward for {self.since_best} probes (best {self.best:.4f} at round " \
                          f"{self.best_iteration})"
            return better, True
        return better, False

    def state(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, d: dict) -> "EarlyStop":
        return cls(**d)


def summary(verdicts: dict) -> dict:
    """A verdict dict without the per-finding detail, for one log line."""
    return {k: (round(v, 5) if isinstance(v, float) and not np.isnan(v) else v) for k, v in verdicts.items()
            if not isinstance(v, dict)}
