"""Corrupted images: the reward-hacking guard's negatives (issue 7, section 3).

A generator optimised against a reward drifts to whatever the reward likes most,
including images no radiologist would accept (the classic reward hacks: noise,
blank frames, saturated or inverted films). Every reward network therefore has a
*validity* head trained to tell real / generated radiographs from these
corruptions, and its reward is ``sigmoid(validity) x base reward``
(``training.reward.base.Reward``), so a corrupted image scores low whatever the
base head makes of it.

All functions take and return float (N, 1, H, W) tensors in [-1, 1] and draw
their randomness from an explicit ``torch.Generator`` (same seed, same images).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

Corruption = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _u(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    """(n, 1, 1, 1) uniform draws in [lo, hi)."""
    return lo + (hi - lo) * torch.rand((n, 1, 1, 1), generator=g)


def noise(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Pure noise, no anatomy: uniform or Gaussian, at a random level and contrast."""
    n = x.shape[0]
    gauss = torch.randn(x.shape, generator=g) * _u(g, n, 0.2, 1.0) + _u(g, n, -0.5, 0.5)
    uniform = torch.rand(x.shape, generator=g) * 2 - 1
    pick = torch.rand((n, 1, 1, 1), generator=g) < 0.5
    return torch.where(pick, gauss, uniform).clamp(-1, 1)


def blank(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A constant frame (black, white or any grey), with a trace of noise half of the time."""
    n = x.shape[0]
    level = _u(g, n, -1.0, 1.0).expand_as(x)
    faint = torch.randn(x.shape, generator=g) * 0.02 * (torch.rand((n, 1, 1, 1), generator=g) < 0.5)
    return (level + faint).clamp(-1, 1)


def inverted(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Negative film: bones and heart dark, lungs bright."""
    return -x


def saturated(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Contrast blown up around a random level and clipped: most pixels pure black or white."""
    n = x.shape[0]
    return ((x - _u(g, n, -0.3, 0.3)) * _u(g, n, 4.0, 20.0)).clamp(-1, 1)


def blur(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Heavy blur (sigma 6-10% of the side): a grey smear with no ribs, vessels or edges."""
    n, _, h, w = x.shape
    out = torch.empty_like(x)
    for i in range(n):  # one sigma per image; N is small
        sigma = float(_u(g, 1, 0.06, 0.10)) * min(h, w)
        radius = max(1, int(3 * sigma))
        t = torch.arange(-radius, radius + 1, dtype=x.dtype)
        k = torch.exp(-0.5 * (t / sigma) ** 2)
        k = k / k.sum()
        y = F.pad(x[i:i + 1], (radius, radius, radius, radius), mode="replicate")
        y = F.conv2d(y, k.view(1, 1, 1, -1))
        out[i:i + 1] = F.conv2d(y, k.view(1, 1, -1, 1))
    return out


def patch_shuffle(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The image cut into a 4 x 4 grid of tiles, shuffled: every local texture, no anatomy."""
    n, c, h, w = x.shape
    k = 4
    th, tw = h // k, w // k
    out = x.clone()
    for i in range(n):
        tiles = x[i, :, :th * k, :tw * k].reshape(c, k, th, k, tw).permute(1, 3, 0, 2, 4).reshape(k * k, c, th, tw)
        tiles = tiles[torch.randperm(k * k, generator=g)]
        out[i, :, :th * k, :tw * k] = tiles.reshape(k, k, c, th, tw).permute(2, 0, 3, 1, 4).reshape(c, th * k, tw * k)
    return out


def checkerboard(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A checkerboard (period 2-16 px) blended over the image: a typical decoder artefact, exaggerated."""
    n, _, h, w = x.shape
    out = torch.empty_like(x)
    for i in range(n):
        p = int(torch.randint(1, 9, (1,), generator=g))
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        board = (((yy // p) + (xx // p)) % 2).to(x.dtype) * 2 - 1
        a = float(_u(g, 1, 0.5, 0.9))
        out[i, 0] = ((1 - a) * x[i, 0] + a * board).clamp(-1, 1)
    return out


def stripes(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Hard horizontal or vertical bands over half the frame (a torn or clipped read-out)."""
    n, _, h, w = x.shape
    out = x.clone()
    for i in range(n):
        period = int(torch.randint(4, 17, (1,), generator=g))
        level = float(_u(g, 1, -1.0, 1.0))
        if float(torch.rand(1, generator=g)) < 0.5:
            out[i, :, (torch.arange(h) // period) % 2 == 0, :] = level
        else:
            out[i, :, :, (torch.arange(w) // period) % 2 == 0] = level
    return out


CORRUPTIONS: dict[str, Corruption] = {
    "noise": noise, "blank": blank, "inverted": inverted, "saturated": saturated, "blur": blur,
    "patch_shuffle": patch_shuffle, "checkerboard": checkerboard, "stripes": stripes,
}
# The four the issue names: every reward must score them low (tested).
GUARDED: tuple[str, ...] = ("noise", "blank", "inverted", "saturated")


def corrupt(x: torch.Tensor, kind: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply corruption ``kind`` (a key of CORRUPTIONS) to every image of ``x``."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; known: {sorted(CORRUPTIONS)}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    return CORRUPTIONS[kind](x.detach().float().cpu(), g).to(x.device)


def random_corruptions(x: torch.Tensor, generator: torch.Generator,
                       kinds: tuple[str, ...] | None = None) -> tuple[torch.Tensor, list[str]]:
    """Each image of ``x`` corrupted by one kind drawn uniformly from ``kinds`` (default: all)."""
    kinds = tuple(kinds or CORRUPTIONS)
    picks = torch.randint(0, len(kinds), (x.shape[0],), generator=generator).tolist()
    src = x.detach().float().cpu()
    out = torch.empty_like(src)
    for j, kind in enumerate(kinds):
        rows = [i for i, p in enumerate(picks) if p == j]
        if rows:
            out[rows] = CORRUPTIONS[kind](src[rows], generator)
    return out.to(x.device), [kinds[p] for p in picks]
