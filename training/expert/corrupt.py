"""Artefacts a radiologist rejects a film for (issue 7, section 2): noise, smears, duplicated
structures, blank regions. The critic learns them as "not a real radiograph" next to generated
images, and its held-out AUROC real-vs-corrupted is reported in panel.json.

Every function takes (N, 1, H, W) images in [-1, 1] and a ``torch.Generator``, and is a pure
function of both, so a seed fixes the corrupted set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CORRUPTIONS: tuple[str, ...] = ("noise", "smear", "duplicate", "blank")


def _u(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _i(g: torch.Generator, lo: int, hi: int) -> int:
    """An int in [lo, hi] (inclusive)."""
    return int(torch.randint(lo, hi + 1, (), generator=g))


def noise(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Gaussian noise, fine-grained or in blotches (noise drawn at 1/4 - 1/8 resolution, upsampled)."""
    h = x.shape[-1]
    sigma = _u(g, 0.12, 0.4)
    if float(torch.rand((), generator=g)) < 0.5:
        n = torch.randn(x.shape, generator=g)
    else:
        coarse = max(4, h // _i(g, 4, 8))
        n = torch.randn((x.shape[0], 1, coarse, coarse), generator=g)
        n = F.interpolate(n, size=x.shape[-2:], mode="bilinear", align_corners=False) * 1.5
    return (x + sigma * n).clamp(-1, 1)


def _box_rows(y: torch.Tensor, k: int) -> torch.Tensor:
    """Box filter of odd length ``k`` along the last axis (edge-replicated), by cumulative sums."""
    c = F.pad(y, (k // 2, k // 2, 0, 0), mode="replicate").cumsum(-1)
    c = F.pad(c, (1, 0, 0, 0))  # a leading 0: c[i + k] - c[i] is the sum of k padded values from i
    return (c[..., k:] - c[..., :-k]) / k


def smear(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A band of the film motion-blurred along its length, as if dragged (a streak)."""
    h = x.shape[-1]
    k = max(3, int(h * _u(g, 0.15, 0.4)) | 1)  # odd kernel length
    vertical = float(torch.rand((), generator=g)) < 0.5
    y = x.transpose(-1, -2) if vertical else x
    blurred = _box_rows(y, k)
    width = max(2, int(h * _u(g, 0.1, 0.3)))
    start = _i(g, 0, h - width)
    mask = torch.zeros(h, 1)
    mask[start:start + width] = 1.0
    out = y * (1 - mask) + blurred * mask  # rows of y are bands across its width
    return (out.transpose(-1, -2) if vertical else out).contiguous()


def duplicate(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A square region pasted elsewhere: a second heart, a repeated rib segment, a copied dome."""
    h = x.shape[-1]
    s = max(4, int(h * _u(g, 0.2, 0.4)))
    y1, x1 = _i(g, 0, h - s), _i(g, 0, h - s)
    for _ in range(20):  # a target far enough from the source that the copy is a second structure
        y2, x2 = _i(g, 0, h - s), _i(g, 0, h - s)
        if abs(y2 - y1) + abs(x2 - x1) >= s // 2:
            break
    out = x.clone()
    out[..., y2:y2 + s, x2:x2 + s] = x[..., y1:y1 + s, x1:x1 + s]
    return out


def blank(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A rectangle of constant value: black, white, or the film's own mean (a dropout / mask)."""
    h = x.shape[-1]
    bh, bw = max(3, int(h * _u(g, 0.15, 0.45))), max(3, int(h * _u(g, 0.15, 0.45)))
    y, x0 = _i(g, 0, h - bh), _i(g, 0, h - bw)
    out = x.clone()
    mode = _i(g, 0, 2)
    value = (-1.0, 1.0)[mode] if mode < 2 else None
    for i in range(out.shape[0]):
        out[i, :, y:y + bh, x0:x0 + bw] = float(x[i].mean()) if value is None else value
    return out


def corrupt(x: torch.Tensor, g: torch.Generator,
            kinds: tuple[str, ...] = CORRUPTIONS) -> tuple[torch.Tensor, list[str]]:
    """Each image gets one corruption drawn from ``kinds``; returns the images and the kinds used."""
    unknown = [k for k in kinds if k not in CORRUPTIONS]
    if unknown or not kinds:
        raise ValueError(f"unknown corruption(s) {unknown or kinds}; known: {list(CORRUPTIONS)}")
    fns = {"noise": noise, "smear": smear, "duplicate": duplicate, "blank": blank}
    out, used = [], []
    for i in range(x.shape[0]):
        kind = kinds[_i(g, 0, len(kinds) - 1)]
        out.append(fns[kind](x[i:i + 1], g))
        used.append(kind)
    return (torch.cat(out) if out else x.clone()), used


def blur(x: torch.Tensor, sigma) -> torch.Tensor:
    """Separable Gaussian blur of (N, 1, H, W) images; ``sigma`` (pixels) is one number or one per image.

    One grouped convolution for the whole batch (a per-image loop of tiny convolutions is slow on
    CPU). A sigma below 0.05 leaves its image unchanged (a delta kernel).
    """
    n = x.shape[0]
    sig = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1).expand(n) if n else torch.zeros(0)
    if n == 0 or float(sig.max()) <= 0.05:
        return x
    r = max(1, int(3 * float(sig.max())))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-t[None] ** 2 / (2 * sig.clamp(min=0.05)[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)
    y = x.transpose(0, 1)  # (1, N, H, W): images as channels
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="replicate"), k.view(n, 1, 1, -1), groups=n)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.view(n, 1, -1, 1), groups=n)
    return y.transpose(0, 1).contiguous()
