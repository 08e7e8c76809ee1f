"""``plausibility`` (Sun et al. 2023): P(an expert calls this image plausible for its declared findings).

Sun et al. train a reward model on pathologists' binary plausible / implausible
ratings of generated images: a CNN on the image with the declared class as a
second input, real images as weak positives. Here:

1. Data: the feedback store's ratings, read through its public API only
   (``training.reward.data.read_snapshot``). One sample per rated generation,
   labelled with the panel majority (ties 0.5) or, with ``label_mode="soft"``,
   the fraction of raters who called it plausible (= every rating as a sample).
   Real simulated images of --data (runs/sim-reward) with their true findings join
   as positives at ``weak_positive_weight`` (never rated, hence weak).
2. Split by prompt (``prompt_split``): validation and test prompts are never seen
   in training, so the metrics measure generalisation to new prompts.
3. Network: the reward trunk + ``ConditionalHead`` (image features x an embedding
   of the declared findings: Sun et al.'s class-conditional reward).
4. Platt scaling on the validation prompts: a temperature and a bias minimising the NLL (the
   bias undoes the base-rate shift the weak positives bring; a temperature alone cannot).
5. Held-out metrics on the test prompts: AUROC against the panel majority and
   ECE (15 bins), on the final score (validity gate included), ties left out.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from training.evaluate.judge import binary_auroc

from .base import Reward, RewardNet, save_reward
from .config import RewardConfig
from .data import StoreSnapshot, load_sim, open_store, prompt_split, read_snapshot, record_findings, store_images
from .metrics import binary_nll, expected_calibration_error, fit_platt
from .nets import ConditionalHead, encode_findings
from .train import features, fit, guard_report, matched_vs_shuffled, score_u8, setup, trunk_with_validity


class PlausibilityNet(RewardNet):
    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.head = ConditionalHead(self.trunk.features)
        self.register_buffer("temperature", torch.ones(()))
        self.register_buffer("bias", torch.zeros(()))  # Platt scaling: sigmoid(logit / T + b)

    def logit(self, h: torch.Tensor, findings) -> torch.Tensor:
        """Uncalibrated logit of P(plausible)."""
        return self.head(h, encode_findings(findings))


class PlausibilityReward(Reward):
    name = "plausibility"
    Net = PlausibilityNet

    def base(self, h, prompts, findings):
        return torch.sigmoid(self.net.logit(h, findings) / self.net.temperature + self.net.bias)


@dataclasses.dataclass
class Samples:
    """Images with targets: rated generations, then weak positives."""

    images: torch.Tensor  # (N, 1, S, S) uint8
    prompts: list[str]
    findings: list
    target: torch.Tensor  # (N,) in [0, 1]
    weight: torch.Tensor  # (N,)
    split: list[str]  # train / val / test
    majority: torch.Tensor  # (N,) panel majority 1 / 0, NaN for ties and weak positives
    weak: torch.Tensor  # (N,) bool: a real image (weak positive), not a rated generation

    def take(self, split: str) -> "Samples":
        return self.subset([i for i, s in enumerate(self.split) if s == split])

    def subset(self, idx: list[int]) -> "Samples":
        t = torch.tensor(idx, dtype=torch.long)
        return Samples(self.images[t], [self.prompts[i] for i in idx], [self.findings[i] for i in idx],
                       self.target[t], self.weight[t], [self.split[i] for i in idx], self.majority[t], self.weak[t])

    def __len__(self) -> int:
        return len(self.prompts)


def rated(snap: StoreSnapshot, store, cfg: RewardConfig) -> Samples:
    """One sample per rated generation (see the module docstring, step 1)."""
    gids, target, weight, majority = [], [], [], []
    for gid, rs in sorted(snap.ratings_by_generation().items()):
        if gid not in snap.generations:
            continue  # a rating always follows its generation in the feed; be safe anyway
        frac = float(np.mean([bool(r.plausible) for r in rs]))
        maj = 1.0 if frac > 0.5 else 0.0 if frac < 0.5 else float("nan")
        gids.append(gid)
        majority.append(maj)
        target.append(frac if cfg.label_mode == "soft" else (0.5 if np.isnan(maj) else maj))
        weight.append(float(len(rs)) if cfg.label_mode == "soft" else 1.0)
    recs = [snap.generations[g] for g in gids]
    return Samples(store_images(store, gids, cfg.image_size), [r.prompt for r in recs],
                   [record_findings(r) for r in recs], torch.tensor(target), torch.tensor(weight),
                   [prompt_split(r.prompt, cfg.seed, cfg.val_fraction, cfg.test_fraction) for r in recs],
                   torch.tensor(majority), torch.zeros(len(gids), dtype=torch.bool))


def weak_positives(cfg: RewardConfig) -> Samples | None:
    """Real simulated images of --data's train split as positives of weight ``weak_positive_weight``."""
    if not cfg.data or cfg.max_weak_positives == 0 or cfg.weak_positive_weight == 0:
        return None
    sim = load_sim(cfg.data, cfg.image_size, cfg.max_weak_positives, cfg.seed).split("train")
    n = len(sim)
    return Samples(sim.images, sim.prompts, sim.findings, torch.ones(n), torch.full((n,), cfg.weak_positive_weight),
                   ["train"] * n, torch.full((n,), float("nan")), torch.ones(n, dtype=torch.bool))


def concat(a: Samples, b: Samples | None) -> Samples:
    if b is None or len(b) == 0:
        return a
    return Samples(torch.cat([a.images, b.images]), a.prompts + b.prompts, a.findings + b.findings,
                   torch.cat([a.target, b.target]), torch.cat([a.weight, b.weight]), a.split + b.split,
                   torch.cat([a.majority, b.majority]), torch.cat([a.weak, b.weak]))


@torch.no_grad()
def logits_of(net: PlausibilityNet, s: Samples) -> tuple[torch.Tensor, torch.Tensor]:
    """(uncalibrated logits, validity probabilities) of every sample."""
    h = features(net, s.images).to(net.temperature.device)
    return net.logit(h, s.findings).cpu(), torch.sigmoid(net.validity_logit(h)).cpu()


def held_out(net: PlausibilityNet, s: Samples, prefix: str) -> dict:
    """AUROC against the panel majority and ECE (15 bins) of the final score; NLL before / after T."""
    keep = ~torch.isnan(s.majority)
    if keep.sum() < 2:
        return {f"{prefix}n": int(keep.sum())}
    logit, validity = logits_of(net, s)
    logit, validity, y = logit[keep], validity[keep], s.majority[keep]
    t, b = float(net.temperature), float(net.bias)
    p = validity * torch.sigmoid(logit / t + b)
    return {f"{prefix}auroc": binary_auroc(p, y), f"{prefix}ece": expected_calibration_error(p, y, 15),
            f"{prefix}nll_uncalibrated": binary_nll(logit, y), f"{prefix}nll": binary_nll(logit + b * t, y, t),
            f"{prefix}n": int(keep.sum()), f"{prefix}positive_rate": float(y.mean()),
            f"{prefix}mean_score": float(p.mean())}


def train(cfg: RewardConfig, store=None) -> Path:
    """Train on the store's ratings (+ weak positives); calibrate on validation prompts; metrics on test prompts."""
    device, g = setup(cfg)
    store = store if store is not None else open_store(cfg.store, cfg.blobs)
    snap = read_snapshot(store, cfg.store)
    gen = rated(snap, store, cfg)
    if len(gen) == 0:
        raise ValueError(f"the store ({snap.url}) holds no ratings up to cursor {snap.cursor}: "
                         f"rate images first (cxrgen expert, or the service's feedback page)")
    tr, va, te = concat(gen.take("train"), weak_positives(cfg)), gen.take("val"), gen.take("test")
    if cfg.max_train and len(tr) > cfg.max_train:
        tr = tr.subset(sorted(np.random.default_rng(cfg.seed).choice(len(tr), cfg.max_train, replace=False).tolist()))
    net = PlausibilityNet(**cfg.net).to(device)

    def step(idx, g):
        h, vloss = trunk_with_validity(net, tr.images[idx], cfg, g)
        logit = net.logit(h, [tr.findings[i] for i in idx.tolist()])
        w = tr.weight[idx].to(device)
        bce = (F.binary_cross_entropy_with_logits(logit, tr.target[idx].to(device), reduction="none") * w).sum() \
            / w.sum().clamp(min=1e-12)
        return bce + vloss, {"bce": float(bce.detach()), "validity": float(vloss.detach())}

    fit(net, len(tr), step, cfg, g, lambda: {k: v for k, v in held_out(net, va, "val_").items()
                                             if k in ("val_auroc", "val_nll")})
    calibrate(net, va)
    return save(net, cfg, snap, tr, va, te, gen)


def calibrate(net: PlausibilityNet, va: Samples) -> None:
    """Platt scaling (temperature + bias) on the validation prompts (T = 1, b = 0 when there are none)."""
    if len(va) == 0:
        return
    logit, _ = logits_of(net, va)
    t, b = fit_platt(logit, va.target)
    net.temperature.fill_(t)
    net.bias.fill_(b)


def save(net, cfg, snap, tr, va, te, gen) -> Path:
    reward = PlausibilityReward(net)
    metrics = {**held_out(net, va, "val_"), **held_out(net, te, "test_"), "temperature": float(net.temperature), "bias": float(net.bias),
               "guard": guard_report(reward, te.images, te.prompts, te.findings),
               "conditioning": matched_vs_shuffled(reward, te.images, te.prompts, te.findings, cfg.seed)}
    real = tr.weak
    if real.any():
        idx = real.nonzero().flatten()[:256].tolist()
        metrics["weak_positive_mean_score"] = float(score_u8(reward, tr.images[idx], [tr.prompts[i] for i in idx],
                                                             [tr.findings[i] for i in idx]).mean())
    data = {"store_url": snap.url, "store_cursor": snap.cursor, "sim_data": cfg.data or None,
            "rated_generations": len(gen), "ratings": len(snap.ratings), "n_train": len(tr), "n_val": len(va),
            "n_test": len(te), "n_weak_positives": int(real.sum())}
    return save_reward(reward, cfg.out, config=cfg, metrics=metrics, data=data)


REWARD = PlausibilityReward  # the plug-in this module registers under its name
