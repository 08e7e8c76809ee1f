"""Sampling for alignment: DDPO trajectories with per-step log-probabilities, and DRaFT-K's truncated
backpropagation (issue 8). Both run diffusers' DDIM scheduler loop by hand on a StableDiffusionPipeline's
components, with classifier-free guidance, and encode prompts through ``pipe.encode_prompt`` so ACE
tokens (``ace.attach``) take part."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from .ddim import ddim_step_with_logprob


@dataclasses.dataclass
class Trajectory:
    latents: torch.Tensor  # (B, T + 1, C, h, w): x_T ... x_0
    log_probs: torch.Tensor  # (B, T): log p(x_{t-1} | x_t) under the sampling model
    timesteps: torch.Tensor  # (T,)
    embeds: torch.Tensor  # (2B, L, D) unconditional then conditional prompt embeddings
    prompts: list  # the prompts (to re-encode with gradients when ACE tokens are trained)


def encode(pipe, prompts: Sequence[str], guidance: float) -> torch.Tensor:
    """Prompt embeddings for CFG: (2B, L, D), unconditional first (diffusers' order)."""
    cond, uncond = pipe.encode_prompt(list(prompts), pipe.device, 1, guidance > 1.0, None)
    return torch.cat([uncond, cond]) if guidance > 1.0 else cond


def initial_latents(pipe, generators: Sequence[torch.Generator], size: int) -> torch.Tensor:
    """x_T from one CPU generator per image (as ``training.generation.generate`` draws them)."""
    ch = pipe.unet.config.in_channels
    f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    x = torch.stack([torch.randn((ch, size // f, size // f), generator=g) for g in generators])
    return (x * pipe.scheduler.init_noise_sigma).to(pipe.device, pipe.unet.dtype)


def eps(pipe, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, guidance: float) -> torch.Tensor:
    """The guided noise prediction at x_t."""
    if guidance <= 1.0:
        return pipe.unet(x, t, encoder_hidden_states=embeds).sample
    out = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=embeds).sample
    uncond, cond = out.chunk(2)
    return uncond + guidance * (cond - uncond)


def _start(pipe, prompts, generators, steps: int, guidance: float, size: int | None):
    """Timesteps set, prompt embeddings and x_T: what both samplers begin with."""
    pipe.scheduler.set_timesteps(steps, device=pipe.device)
    with torch.no_grad():
        return encode(pipe, prompts, guidance), initial_latents(pipe, generators, size or pipe.vae.config.sample_size)


def sample_with_logprob(pipe, prompts: Sequence[str], generators: Sequence[torch.Generator], steps: int,
                        guidance: float, eta: float = 1.0, size: int | None = None) -> Trajectory:
    """A stochastic DDIM trajectory per prompt with each step's log-probability (no gradients)."""
    sched = pipe.scheduler
    embeds, x = _start(pipe, prompts, generators, steps, guidance, size)
    with torch.no_grad():
        lat, lps = [x], []
        noise_gen = generators[0] if len(generators) == 1 else list(generators)
        for t in sched.timesteps:
            e = eps(pipe, x, t, embeds, guidance)
            x, lp = ddim_step_with_logprob(sched, e, t, x, eta=eta, generator=noise_gen)
            lat.append(x)
            lps.append(lp)
    return Trajectory(torch.stack(lat, 1), torch.stack(lps, 1), sched.timesteps.clone(), embeds, list(prompts))


def _train_embeds(pipe, prompts, embeds: torch.Tensor, guidance: float) -> torch.Tensor:
    """With trainable ACE tokens the embeddings are recomputed with gradients; else the sampled ones serve."""
    ace = getattr(pipe, "ace", None)
    if ace is None or not ace.tokens.requires_grad:
        return embeds
    return encode(pipe, prompts, guidance)


def step_logprob(pipe, traj: Trajectory, j: int, guidance: float, eta: float = 1.0) -> torch.Tensor:
    """log p(x_{j+1} | x_j) of a recorded trajectory under the *current* model, with gradients (PPO)."""
    t = traj.timesteps[j]
    e = eps(pipe, traj.latents[:, j], t, _train_embeds(pipe, traj.prompts, traj.embeds, guidance), guidance)
    _, lp = ddim_step_with_logprob(pipe.scheduler, e, t, traj.latents[:, j], eta=eta,
                                   prev_sample=traj.latents[:, j + 1])
    return lp


def sample_draft(pipe, prompts: Sequence[str], generators: Sequence[torch.Generator], steps: int, guidance: float,
                 k: int, size: int | None = None) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) whose last ``k`` steps keep gradients (DRaFT-K, Clark et al. 2023;
    AlignProp): x_0 latents that back-propagate into the U-Net through those steps only. ``k = 0``:
    plain deterministic sampling (RLCF's anchor images)."""
    if not 0 <= k <= steps:
        raise ValueError(f"k must be in [0, steps={steps}], got {k}")
    sched = pipe.scheduler
    embeds, x = _start(pipe, prompts, generators, steps, guidance, size)
    if k > 0:
        embeds = _train_embeds(pipe, prompts, embeds, guidance)
    for i, t in enumerate(sched.timesteps):
        with torch.set_grad_enabled(i >= steps - k):
            x = sched.step(eps(pipe, x, t, embeds, guidance), t, x, eta=0.0).prev_sample
    return x


def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> grey images (N, 1, H, W) in [-1, 1] (the rewards' input), differentiable."""
    from training.model.components import to_grey

    x = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample
    return to_grey(x.clamp(-1, 1))
