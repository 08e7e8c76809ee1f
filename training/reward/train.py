"""The training loop every reward kind shares, and the validity (reward-hacking guard) pieces.

A step takes a batch of valid images, augments them (intensity only: flips
would swap left and right, shifts would change the pose), corrupts a copy of the
un-augmented batch (``training.reward.corrupt``), runs the trunk once over both,
and adds ``validity_weight x BCE(valid = 1, corrupted = 0)`` to the kind's own
loss on the valid half.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from training.evaluate.judge import augment, binary_auroc, resolve_device

from .base import Reward, RewardNet
from .config import RewardConfig
from .corrupt import CORRUPTIONS, corrupt, random_corruptions
from .data import from_u8

log = logging.getLogger(__name__)
LOG_FILE = "log.jsonl"

# step(indices, generator) -> (loss, parts)
StepFn = Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, dict[str, float]]]


def setup(cfg: RewardConfig) -> tuple[torch.device, torch.Generator]:
    """Seed, threads and device; prints the config (STYLE.md: printed at start, saved in the manifest)."""
    import dataclasses

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    print(f"reward train config: {json.dumps(dataclasses.asdict(cfg))}", flush=True)
    return resolve_device(cfg.device), torch.Generator().manual_seed(cfg.seed + 1)


def trunk_with_validity(net: RewardNet, x_u8: torch.Tensor, cfg: RewardConfig,
                        g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of the augmented valid images, and the validity BCE over them and their corrupted copies."""
    device = next(net.parameters()).device
    x = from_u8(x_u8)
    valid = augment(x, cfg.jitter, g)
    if cfg.validity_weight <= 0:
        return net.trunk(valid.to(device)), torch.zeros((), device=device)
    bad, _ = random_corruptions(x, g)
    h = net.trunk(torch.cat([valid, bad]).to(device))
    n = x.shape[0]
    target = torch.cat([torch.ones(n), torch.zeros(n)]).to(device)
    vloss = F.binary_cross_entropy_with_logits(net.validity_logit(h), target)
    return h[:n], cfg.validity_weight * vloss


def fit(net: RewardNet, n_items: int, step: StepFn, cfg: RewardConfig, g: torch.Generator,
        evaluate: Callable[[], dict] | None = None) -> list[dict]:
    """``cfg.epochs`` passes over ``n_items`` in shuffled batches (AdamW, cosine to 0); log.jsonl per epoch."""
    if n_items == 0:
        raise ValueError("no training data")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / LOG_FILE).write_text("")
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(n_items / cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    history = []
    for epoch in range(1, cfg.epochs + 1):
        t0, parts = time.perf_counter(), []
        net.train()
        for idx in torch.randperm(n_items, generator=g).split(cfg.batch_size):
            if idx.numel() < 2 and n_items > 1:
                continue  # BatchNorm needs more than one sample
            loss, p = step(idx, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            parts.append({**p, "loss": float(loss.detach())})
        row = {"epoch": epoch, **{f"train_{k}": float(np.mean([p[k] for p in parts])) for k in parts[0]}}
        if evaluate is not None:
            net.eval()
            row.update(evaluate())
        row["seconds"] = round(time.perf_counter() - t0, 2)
        history.append(row)
        with (out / LOG_FILE).open("a") as f:
            f.write(json.dumps(_finite(row)) + "\n")
        print(f"reward {cfg.kind} epoch {epoch}/{cfg.epochs}: " +
              ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)), flush=True)
    net.eval()
    return history


def _finite(row: dict) -> dict:
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in row.items()}


@torch.no_grad()
def guard_report(reward: Reward, images_u8: torch.Tensor, prompts, findings, seed: int = 0,
                 limit: int = 256) -> dict:
    """Held-out reward-hacking check on the first ``limit`` images and every corruption of them.

    ``<kind>_mean``: mean final score of the corrupted images (``valid_mean``: of the
    originals). ``guard_auroc``: AUROC of the validity gate, valid vs corrupted (the
    final score would mix in the base reward: a valid but implausible image may
    rightly score near 0). ``below_valid_median``: fraction of corrupted images whose
    final score is below the valid images' median.
    """
    if images_u8.shape[0] == 0:
        return {}
    x, prompts, findings = from_u8(images_u8[:limit]), list(prompts)[:limit], list(findings)[:limit]
    was = reward.net.training
    reward.net.eval()
    valid = reward.forward(x, prompts, findings)
    out, bad_score, bad_gate = {"valid_mean": float(valid["score"].mean())}, [], []
    g = torch.Generator().manual_seed(seed)
    for kind in CORRUPTIONS:
        s = reward.forward(corrupt(x, kind, g), prompts, findings)
        out[f"{kind}_mean"] = float(s["score"].mean())
        bad_score.append(s["score"].cpu())
        bad_gate.append(s["validity"].cpu())
    reward.net.train(was)
    gate, bad = valid["validity"].cpu(), torch.cat(bad_gate)
    out["guard_auroc"] = binary_auroc(torch.cat([gate, bad]), torch.cat([torch.ones_like(gate), torch.zeros_like(bad)]))
    out["below_valid_median"] = float((torch.cat(bad_score) < valid["score"].cpu().median()).float().mean())
    return out


@torch.no_grad()
def features(net: RewardNet, images_u8: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Trunk features (N, F) of uint8 images, in eval mode, on the CPU."""
    device = next(net.parameters()).device
    was = net.training
    net.eval()
    parts = [net.trunk(from_u8(images_u8[i:i + batch_size]).to(device)).cpu()
             for i in range(0, images_u8.shape[0], batch_size)]
    net.train(was)
    return torch.cat(parts) if parts else torch.zeros((0, net.trunk.features))


def data_info(cfg: RewardConfig, **counts) -> dict:
    """The manifest's ``data`` block for a reward trained on simulator data only."""
    return {"sim_data": cfg.data or None, "store_url": None,
            "store_cursor": None, **counts}


@torch.no_grad()
def score_u8(reward: Reward, images_u8: torch.Tensor, prompts, findings, batch_size: int = 256) -> torch.Tensor:
    """``reward.score`` over uint8 images in batches."""
    parts = [reward.score(from_u8(images_u8[i:i + batch_size]), prompts[i:i + batch_size],
                          findings[i:i + batch_size]) for i in range(0, images_u8.shape[0], batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0)


@torch.no_grad()
def matched_vs_shuffled(reward: Reward, images_u8: torch.Tensor, prompts, findings, seed: int = 0) -> dict:
    """Scores with each image's own prompt vs another image's: a conditional reward must tell them apart.

    ``matched_vs_shuffled_auroc`` is the AUROC of matched (positive) against
    shuffled (negative) scores; shuffled prompts that happen to say the same thing
    (two normal studies) keep it below 1 even for a perfect reward.
    """
    n = images_u8.shape[0]
    if n < 2:
        return {}
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    other = perm[1:] + perm[:1]  # a cyclic shift of a random order: nobody keeps their own prompt
    shuffled = [0] * n
    for a, b in zip(perm, other):
        shuffled[a] = b
    matched = score_u8(reward, images_u8, prompts, findings)
    wrong = score_u8(reward, images_u8, [prompts[j] for j in shuffled], [findings[j] for j in shuffled])
    auc = binary_auroc(torch.cat([matched, wrong]), torch.cat([torch.ones(n), torch.zeros(n)]))
    return {"matched_mean": float(matched.mean()), "shuffled_mean": float(wrong.mean()),
            "matched_vs_shuffled_auroc": auc}
