"""One DDPO iteration (Black et al. 2023), with CXRL's comparative feedback (RLCF) as an option (issue 8).

The phases, each a function: 1. sample trajectories with log-probabilities (``sampling``); 2. score the
final images with the reward function (``reward_fn(images in [-1, 1], prompts, findings) -> (N,)``); with
an anchor model, score its image for the same prompt and initial noise too and keep the difference
(RLCF); 3. per-prompt advantages; 4. PPO updates over the trajectory's steps, gradients accumulated over
the steps and one optimiser step per inner epoch (as ddpo-pytorch does).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Callable, Sequence

import torch

from .objectives import PerPromptStats, advantages, ppo_loss, relative_rewards
from .sampling import Trajectory, decode, sample_draft, sample_with_logprob, step_logprob


@dataclasses.dataclass
class DDPOConfig:
    steps: int = 10  # sampling steps of each trajectory
    guidance: float = 4.0  # classifier-free guidance while sampling and re-scoring
    eta: float = 1.0  # DDIM stochasticity (the policy's noise); > 0
    clip_range: float = 1e-4  # PPO ratio clip (ddpo-pytorch's; log-probs are averaged over dimensions)
    adv_clip: float = 5.0  # advantages clipped to +-this
    buffer: int = 16  # per-prompt reward buffer for advantage statistics
    min_count: int = 16  # rewards a prompt needs before its own statistics are used
    inner_epochs: int = 1  # PPO passes over each batch of trajectories
    timestep_fraction: float = 1.0  # share of each trajectory's steps trained per pass
    max_grad_norm: float = 1.0  # gradient clipping


def collect(pipe, prompts: Sequence[str], seeds: Sequence[int], cfg: DDPOConfig) -> tuple[Trajectory, torch.Tensor]:
    """Trajectories and their decoded final images (no gradients)."""
    traj = sample_with_logprob(pipe, prompts, [torch.Generator().manual_seed(int(s)) for s in seeds], cfg.steps,
                               cfg.guidance, cfg.eta)
    with torch.no_grad():
        images = decode(pipe, traj.latents[:, -1])
    return traj, images


def anchor_images(anchor, prompts: Sequence[str], seeds: Sequence[int], cfg: DDPOConfig) -> torch.Tensor:
    """The frozen anchor's images for the same prompts and initial noise (deterministic DDIM)."""
    with torch.no_grad():
        x0 = sample_draft(anchor, prompts, [torch.Generator().manual_seed(int(s)) for s in seeds], cfg.steps,
                          cfg.guidance, k=0)
        return decode(anchor, x0)


def update(pipe, optimiser, traj: Trajectory, adv: torch.Tensor, cfg: DDPOConfig, rng: random.Random) -> dict:
    """PPO over the trajectory's steps (``optimiser``: ``optim.Optimiser``); returns mean loss, approx KL and
    clip fraction."""
    n_steps = traj.log_probs.shape[1]
    train = max(1, round(cfg.timestep_fraction * n_steps))
    logs = []
    adv = adv.to(traj.log_probs.device)
    for _ in range(cfg.inner_epochs):
        for j in sorted(rng.sample(range(n_steps), train)):
            with optimiser.autocast():
                lp = step_logprob(pipe, traj, j, cfg.guidance, cfg.eta)
            loss, info = ppo_loss(lp.float(), traj.log_probs[:, j], adv, cfg.clip_range)
            optimiser.backward(loss / train)
            logs.append({"loss": loss.item(), **info})
        optimiser.step()
    return {k: sum(d[k] for d in logs) / len(logs) for k in logs[0]}


def iteration(pipe, optimiser, prompts: Sequence[str], findings: Sequence, seeds: Sequence[int],
              reward_fn: Callable, stats: PerPromptStats, cfg: DDPOConfig, anchor=None,
              rng: random.Random | None = None) -> dict:
    """Sample, reward (relative to ``anchor`` when given: RLCF), normalise per prompt, PPO-update."""
    with optimiser.autocast():
        traj, images = collect(pipe, prompts, seeds, cfg)
    with torch.no_grad():
        rewards = reward_fn(images.float(), list(prompts), list(findings)).float().cpu()
        signal = rewards
        if anchor is not None:
            with optimiser.autocast():
                anchor_imgs = anchor_images(anchor, prompts, seeds, cfg)
            base = reward_fn(anchor_imgs.float(), list(prompts), list(findings)).float().cpu()
            signal = relative_rewards(rewards, base)
    adv = advantages(list(prompts), signal, stats, cfg.adv_clip)
    info = update(pipe, optimiser, traj, adv, cfg, rng or random.Random(0))
    out = {"reward": rewards.mean().item(), **info}
    if anchor is not None:
        out["anchor_reward"] = base.mean().item()
    return out
