"""The stochastic DDIM step as a policy: its sample and its log-probability (DDPO, Black et al. 2023; CXRL).

DDPO treats each denoising step x_t -> x_{t-1} as an action drawn from a Gaussian whose mean is the
DDIM update and whose standard deviation is eta * sigma_t (Song et al. 2021, eq. 16). This module
computes that mean and std from diffusers' ``DDIMScheduler`` state (its alphas and its timestep
spacing), draws the next sample and returns the log-probability of a given next sample under the
current model, averaged over latent dimensions as ddpo-pytorch does (its PPO clip range of 1e-4 assumes
that scale). Written from the formulas; tests/test_align.py checks it against ``DDIMScheduler.step``
and ``torch.distributions.Normal``.
"""

from __future__ import annotations

import math

import torch


def _alphas(scheduler, timestep: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_bar_t and alpha_bar_{t-1} for a (batched) timestep, broadcast to ``like``."""
    t = timestep.reshape(-1).long().cpu()
    prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    ac = scheduler.alphas_cumprod
    a_t = ac[t]
    a_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], torch.as_tensor(scheduler.final_alpha_cumprod))
    shape = (-1,) + (1,) * (like.ndim - 1)
    return a_t.to(like.device, like.dtype).reshape(shape), a_prev.to(like.device, like.dtype).reshape(shape)


def ddim_step_with_logprob(scheduler, model_output: torch.Tensor, timestep: torch.Tensor | int, sample: torch.Tensor,
                           eta: float = 1.0, prev_sample: torch.Tensor | None = None,
                           generator: torch.Generator | list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_{t-1}, log p(x_{t-1} | x_t)) for epsilon-prediction models; ``eta`` > 0 makes the step stochastic.

    With ``prev_sample`` given, that sample is scored instead of drawing one (the PPO update re-scores the
    trajectory sampled before). The log-probability is per batch element, averaged over dimensions.
    """
    if scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"ddim_step_with_logprob: epsilon prediction only, got {scheduler.config.prediction_type!r}")
    if eta <= 0:
        raise ValueError("eta must be > 0: a deterministic step has no log-probability")
    timestep = torch.as_tensor(timestep, device=sample.device)
    if timestep.ndim == 0:
        timestep = timestep.expand(sample.shape[0])
    a_t, a_prev = _alphas(scheduler, timestep, sample)
    eps = model_output.to(sample.dtype)
    x0 = (sample - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    if scheduler.config.clip_sample:  # as DDIMScheduler.step: x0 clipped, the direction keeps the model's eps
        r = scheduler.config.clip_sample_range
        x0 = x0.clamp(-r, r)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance.sqrt()
    if (std <= 0).any():
        raise ValueError(f"timestep {timestep.tolist()}: this step is deterministic (zero variance: a schedule "
                         "without steps_offset ends at t = 0); it has no log-probability")
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
    if prev_sample is None:
        noise = _noise(sample, generator)
        prev_sample = mean + std * noise
    log_prob = (-((prev_sample.detach() - mean) ** 2) / (2 * std**2) - std.log() - math.log(math.sqrt(2 * math.pi)))
    return prev_sample.to(sample.dtype), log_prob.mean(dim=tuple(range(1, sample.ndim)))


def _noise(like: torch.Tensor, generator) -> torch.Tensor:
    if isinstance(generator, list):
        return torch.cat([torch.randn(like.shape[1:], generator=g, dtype=like.dtype).unsqueeze(0)
                          for g in generator]).to(like.device)
    return torch.randn(like.shape, generator=generator, dtype=like.dtype, device="cpu").to(like.device)
