"""The alignment objectives, each a small pure function (issue 8, section 1); tests/test_align.py checks them.

* ``PerPromptStats`` / ``advantages``: DDPO's per-prompt reward normalisation (ddpo-pytorch keeps a
  buffer of the last 16 rewards per prompt, falls back to the batch's statistics until a prompt has
  ``min_count`` of them, and clips advantages to +-5).
* ``ppo_loss``: PPO's clipped surrogate on per-step importance ratios (Schulman et al. 2017; DDPO).
* ``relative_rewards``: CXRL's comparative feedback (RLCF): a reward judged against a frozen anchor
  model's image for the same prompt and the same initial noise.
* ``rwl_loss``: reward-weighted likelihood (Sun et al. 2023): beta * L(real) + mean(r * L(generated)).
* ``dpo_loss``: Diffusion-DPO (Wallace et al. 2023, eq. 14): preferring the winner lowers the loss.
"""

from __future__ import annotations

import collections
from typing import Sequence

import torch
import torch.nn.functional as F


class PerPromptStats:
    """Running reward statistics per prompt: a buffer of the last ``buffer_size`` rewards each."""

    def __init__(self, buffer_size: int = 16, min_count: int = 16) -> None:
        if buffer_size < 1 or min_count < 1:
            raise ValueError("buffer_size and min_count must be >= 1")
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict[str, collections.deque] = {}

    def update(self, prompts: Sequence[str], rewards: torch.Tensor) -> torch.Tensor:
        """Advantages (reward - mean) / (std + 1e-6) per element, after adding the batch to the buffers."""
        rewards = rewards.detach().float().cpu()
        out = torch.empty_like(rewards)
        for p in set(prompts):
            idx = [i for i, q in enumerate(prompts) if q == p]
            buf = self.buffers.setdefault(p, collections.deque(maxlen=self.buffer_size))
            buf.extend(rewards[idx].tolist())
            ref = torch.tensor(list(buf)) if len(buf) >= self.min_count else rewards
            out[idx] = (rewards[idx] - ref.mean()) / (ref.std(unbiased=False) + 1e-6)
        return out


def advantages(prompts: Sequence[str], rewards: torch.Tensor, stats: PerPromptStats | None = None,
               clip: float = 5.0) -> torch.Tensor:
    """Per-prompt normalised advantages, clipped to +-``clip``."""
    stats = stats or PerPromptStats(min_count=1)
    return stats.update(prompts, rewards).clamp(-clip, clip)


def ppo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, adv: torch.Tensor,
             clip_range: float = 1e-4) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate loss (to minimise) and diagnostics (approx KL, clip fraction)."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    info = {"approx_kl": 0.5 * ((log_prob - old_log_prob) ** 2).mean().item(),
            "clipfrac": ((ratio - 1).abs() > clip_range).float().mean().item()}
    return loss, info


def relative_rewards(policy: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """RLCF: the policy image's reward minus the anchor image's (same prompt, same initial noise)."""
    if policy.shape != anchor.shape:
        raise ValueError(f"policy and anchor rewards differ in shape: {tuple(policy.shape)} vs {tuple(anchor.shape)}")
    return policy - anchor


def rwl_loss(real_loss: torch.Tensor, generated_loss: torch.Tensor, rewards: torch.Tensor,
             beta: float = 0.3) -> torch.Tensor:
    """beta * mean L(real) + mean(r_i * L_i(generated)): likelihood of generated images weighted by their
    reward (plausibility, or the stored rating), anchored by real data. Per-sample losses in, a scalar out."""
    if generated_loss.shape != rewards.shape:
        raise ValueError(f"one reward per generated image: {tuple(rewards.shape)} vs {tuple(generated_loss.shape)}")
    return beta * real_loss.mean() + (rewards.detach() * generated_loss).mean()


def dpo_loss(model_w: torch.Tensor, model_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
             beta: float = 2000.0, positive: float = 0.0) -> torch.Tensor:
    """Diffusion-DPO on per-sample denoising errors ||eps - eps_theta(x_t, t)||^2 of the preferred (w) and
    the other (l) image at the same t and noise, for the model and the frozen reference:
    -log sigmoid(-beta / 2 * ((model_w - ref_w) - (model_l - ref_l))), averaged over pairs.

    ``positive`` (DPO-Positive, Pal et al. 2024): plus ``positive * max(0, model_w - ref_w)`` inside the
    bracket, so the margin cannot be won by denoising the preferred image worse than the reference does (only
    less worse than the other): plain DPO often lowers both images' likelihood, and the images with them."""
    inside = -0.5 * beta * ((model_w - ref_w) - (model_l - ref_l) + positive * (model_w - ref_w).clamp(min=0))
    return -F.logsigmoid(inside).mean()
