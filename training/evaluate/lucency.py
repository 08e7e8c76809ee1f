"""Is a pneumothorax drawn as a lucent space without lung markings, or as an opacity? (issue 8)

A pneumothorax is air between lung and chest wall: darker than lung (lucent) and without the vessel
markings that give lung its texture. The simulator draws it that way (``insert_pneumothorax``: the lung
collapses towards the hilum, the freed space is air). The measurement:

1. **Where**: for each side, the region a pneumothorax darkens in *real* films: the mean real image of
   that side's pneumothoraces minus the mean real image with no finding (validation split); the
   ``share`` most-darkened pixels are the region. Data, not a hand-drawn box, define it.
2. **How lucent**: mean intensity in the region, prompted side minus normal prompts (negative: lucent).
3. **How smooth**: texture energy in the region's interior (mean squared high-pass residual: the image
   minus its Gaussian blur, i.e. the fine detail of lung markings; the region eroded by the filter's
   reach so the pleural line at its border is not counted), prompted side over normal prompts (below 1:
   fewer markings).

The same numbers on real test films are the reference; a generator that draws an opacity instead has
a positive intensity difference and a texture ratio at or above 1.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

SIDES = ("left", "right")


def _side(row: dict) -> str | None:
    """The side of a row's pneumothorax (None: none, or both sides)."""
    sides = {f.get("side") for f in row.get("findings", []) if f.get("kind") == "pneumothorax"}
    return sides.pop() if len(sides) == 1 else None


def _normal(row: dict) -> bool:
    return not row.get("findings")


SIGMA = 1.0  # high-pass scale (px): lung markings are a few pixels wide at 128 px
RADIUS = int(math.ceil(3 * SIGMA))


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-x**2 / (2 * sigma**2))
    k = k / k.sum()
    pad = F.pad(images.float(), (r, r, r, r), mode="reflect")
    return F.conv2d(F.conv2d(pad, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))


def highpass(images: torch.Tensor, sigma: float = SIGMA) -> torch.Tensor:
    """images (N, 1, H, W) minus their Gaussian blur: the fine texture."""
    return images.float() - blur(images, sigma)


def interior(mask: torch.Tensor, r: int = RADIUS) -> torch.Tensor:
    """The mask eroded by ``r`` px (the high-pass filter's reach), so the region's own border (the pleural
    line) is not counted as texture; the mask itself if nothing would remain."""
    inner = -F.max_pool2d(-mask[None, None].float(), 2 * r + 1, stride=1, padding=r)[0, 0] > 0.5
    return inner if inner.any() else mask


def regions(images: torch.Tensor, rows: list[dict], share: float = 0.025) -> dict[str, torch.Tensor]:
    """Side -> boolean (H, W) mask: the ``share`` of pixels real pneumothoraces of that side darken most,
    inside that side's half of the film (the patient's left is the image's right, as on a PA or AP film)."""
    normal = [i for i, r in enumerate(rows) if _normal(r)]
    if not normal:
        raise ValueError("no normal films to define the pneumothorax region against")
    base = images[normal, 0].float().mean(0)
    out = {}
    for s in SIDES:
        idx = [i for i, r in enumerate(rows) if _side(r) == s]
        if not idx:
            continue
        diff = blur((images[idx, 0].float().mean(0) - base)[None, None], 2.0)[0, 0]  # a region, not speckle
        half = diff.shape[1] // 2
        if s == "left":
            diff[:, :half] = math.inf
        else:
            diff[:, half:] = math.inf
        k = max(1, int(share * diff.numel()))
        thr = diff.flatten().kthvalue(k).values
        out[s] = diff <= thr
    return out


def measure(images: torch.Tensor, rows: list[dict], masks: dict[str, torch.Tensor]) -> dict:
    """Intensity difference and texture ratio in the region, per side and pooled over sides."""
    tex = highpass(images)[:, 0] ** 2
    normal = [i for i, r in enumerate(rows) if _normal(r)]
    out: dict = {"n_normal": len(normal)}
    deltas, ratios, n = [], [], 0
    for s, m in masks.items():
        idx = [i for i, r in enumerate(rows) if _side(r) == s]
        if not idx or not normal:
            continue
        inten = float(images[idx, 0][:, m].mean() - images[normal, 0][:, m].mean())
        inner = interior(m)
        ratio = float(tex[idx][:, inner].mean() / tex[normal][:, inner].mean().clamp_min(1e-12))
        out[s] = {"n": len(idx), "delta_intensity": inten, "texture_ratio": ratio}
        deltas.append(inten * len(idx))
        ratios.append(ratio * len(idx))
        n += len(idx)
    out["delta_intensity"] = sum(deltas) / n if n else math.nan
    out["texture_ratio"] = sum(ratios) / n if n else math.nan
    out["n_pneumothorax"] = n
    return out


def pneumothorax_lucency(ref_imgs, ref_rows, test_imgs, test_rows, gen_imgs, gen_rows, share: float = 0.025) -> dict:
    """Region from ``ref`` (real validation films); the measurement on real test films and on the images
    generated for the same test prompts. Images (N, 1, H, W) in [-1, 1]."""
    masks = regions(ref_imgs, ref_rows, share)
    return {"region_share": share, "region_pixels": {s: int(m.sum()) for s, m in masks.items()},
            "real": measure(test_imgs, test_rows, masks), "generated": measure(gen_imgs, gen_rows, masks),
            "_masks": masks}


def plot(result: dict, ref_imgs, ref_rows, gen_imgs, gen_rows, path) -> None:
    """Mean (pneumothorax - normal) difference per side, real reference vs generated, region outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(6, 6.2))
    for col, s in enumerate(SIDES):
        for row, (name, imgs, rws) in enumerate((("real", ref_imgs, ref_rows), ("generated", gen_imgs, gen_rows))):
            ax = axes[row, col]
            normal = [i for i, r in enumerate(rws) if _normal(r)]
            idx = [i for i, r in enumerate(rws) if _side(r) == s]
            ax.set_xticks([]), ax.set_yticks([])
            if not idx or not normal:
                ax.set_title(f"{name}, {s}: none", fontsize=8)
                continue
            diff = (imgs[idx, 0].float().mean(0) - imgs[normal, 0].float().mean(0)).numpy()
            ax.imshow(diff, cmap="RdBu_r", vmin=-0.5, vmax=0.5)
            if s in result["_masks"]:
                ax.contour(result["_masks"][s].numpy(), levels=[0.5], colors="k", linewidths=0.6)
            m = result["real" if name == "real" else "generated"].get(s, {})
            ax.set_title(f"{name}, {s} pneumothorax (n={len(idx)})\nd-intensity {m.get('delta_intensity', np.nan):+.3f}"
                         f", texture x{m.get('texture_ratio', np.nan):.2f}", fontsize=7)
    fig.suptitle("mean(pneumothorax) - mean(normal); blue = darker (lucent)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
