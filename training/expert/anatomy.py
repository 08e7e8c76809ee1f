"""Anatomy checks: a dozen interpretable, cheap measurements of a frontal film's layout.

A radiologist glancing at a film checks that the lung fields are dark on both sides of a
brighter mediastinum, that the heart sits left of the spine with a plausible width, that two
diaphragm domes close the lungs from below, that the rib cage is roughly symmetric and that the
film as a whole looks like a chest. Each measurement here is one of those glances, computed on
the film at 64 px with intensities in [0, 1] (bright = dense). Patient's right is image left
(a PA / AP film as displayed).

Each feature's acceptable band is a pair of percentiles of real simulated films (stored in
panel.json), so real films pass by construction; a film's anatomy evidence is how far its worst
feature lies outside its band, in band widths (0 inside every band).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SIZE = 64  # side the features are measured at
MEAN_FILM_SIZE = 32  # side of the stored mean real film

# name -> what a reader would call it in a comment. Measured (see ``features``): mean brightness of
# the mediastinum minus each lung field (rows 20-50 %); left minus right lung field; width and
# offset (towards patient left) of the bright cardiac shadow at rows 45-65 %; height (fraction from
# the top) of the strongest dark-to-bright step down each lung's column band, and the weaker step's
# size; correlation with the film's mirror image and with the mean real film (32 px); mean and
# standard deviation of brightness; share of 8 x 8 blocks without texture. Contrasts and the step
# are divided by the film's standard deviation, so that windowing does not change them.
FEATURES: dict[str, str] = {
    "mediastinum_vs_right_lung": "mediastinum / right lung contrast",
    "mediastinum_vs_left_lung": "mediastinum / left lung contrast",
    "lung_balance": "left-right lung balance",
    "heart_width": "cardiac shadow width",
    "heart_offset": "cardiac shadow position",
    "diaphragm_right": "right hemidiaphragm height",
    "diaphragm_left": "left hemidiaphragm height",
    "diaphragm_step": "diaphragm contour",
    "mirror_symmetry": "rib cage symmetry",
    "mean_film_correlation": "overall chest layout",
    "brightness": "overall brightness",
    "contrast": "overall contrast",
    "flat_fraction": "blank regions",
}
FEATURE_NAMES: tuple[str, ...] = tuple(FEATURES)


def prepare(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) in [-1, 1] -> (N, 64, 64) in [0, 1]."""
    from .nets import resize

    return ((resize(images.float(), SIZE) + 1.0) / 2.0).clamp(0, 1)[:, 0]


def _cols(a: float, b: float) -> slice:
    return slice(int(a * SIZE), int(b * SIZE))


def _corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation per row of two (N, D) tensors (0 where either is constant)."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    den = (a.norm(dim=1) * b.norm(dim=1)).clamp(min=1e-8)
    return (a * b).sum(1) / den


def _diaphragm(x: torch.Tensor, cols: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """Row (fraction) and size of the strongest dark-to-bright step going down a lung column band."""
    prof = x[:, :, cols].mean(2)  # (N, H)
    prof = F.avg_pool1d(prof[:, None], 5, stride=1, padding=2, count_include_pad=False)[:, 0]
    lo = int(0.35 * SIZE)
    step = prof[:, lo + 4:] - prof[:, lo:-4]  # brightening over 4 rows (~2 cm)
    value, where = step.max(1)
    return (where + lo + 2).float() / SIZE, value


def _heart(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Width and offset of the bright central shadow at heart level (rows 45-65 %).

    The threshold is half way between the darkest lung column and the midline: the shadow is
    the run of columns above it that contains the midline.
    """
    prof = x[:, int(0.45 * SIZE):int(0.65 * SIZE), :].mean(1)  # (N, W)
    mid = prof[:, _cols(0.47, 0.53)].mean(1)
    lung = torch.minimum(prof[:, _cols(0.1, 0.4)].min(1).values, prof[:, _cols(0.6, 0.9)].min(1).values)
    above = prof > ((mid + lung) / 2)[:, None]
    c = SIZE // 2
    width, offset = torch.zeros(x.shape[0]), torch.zeros(x.shape[0])
    for i in range(x.shape[0]):  # run-length around the midline; N is a batch, W is 64
        row = above[i].tolist()
        lo = hi = c
        while lo > 0 and row[lo - 1]:
            lo -= 1
        while hi < SIZE - 1 and row[hi + 1]:
            hi += 1
        width[i] = (hi - lo + 1) / SIZE
        offset[i] = ((lo + hi) / 2 - (SIZE - 1) / 2) / SIZE
    return width, offset


def features(images: torch.Tensor, mean_film: torch.Tensor | None = None) -> torch.Tensor:
    """(N, len(FEATURE_NAMES)) anatomy features of (N, 1, H, W) films in [-1, 1].

    ``mean_film`` (32, 32) in [0, 1] is the mean real film; without it the correlation is NaN
    (it is the statistic being computed when the panel is calibrated).
    """
    x = prepare(images)
    n = x.shape[0]
    rows = slice(int(0.2 * SIZE), int(0.5 * SIZE))
    right_lung = x[:, rows, _cols(0.15, 0.35)].mean((1, 2))
    left_lung = x[:, rows, _cols(0.65, 0.85)].mean((1, 2))
    mediastinum = x[:, rows, _cols(0.45, 0.55)].mean((1, 2))
    width, offset = _heart(x)
    d_right, s_right = _diaphragm(x, _cols(0.15, 0.35))
    d_left, s_left = _diaphragm(x, _cols(0.65, 0.85))
    small = F.interpolate(x[:, None], size=(MEAN_FILM_SIZE, MEAN_FILM_SIZE), mode="bilinear", antialias=True,
                          align_corners=False)[:, 0].reshape(n, -1)
    mirror = _corr(small, small.view(n, MEAN_FILM_SIZE, MEAN_FILM_SIZE).flip(-1).reshape(n, -1))
    mean_corr = (_corr(small, mean_film.reshape(1, -1).expand(n, -1).to(small)) if mean_film is not None
                 else torch.full((n,), float("nan")))
    blocks = x.unfold(1, 8, 8).unfold(2, 8, 8).reshape(n, -1, 64).std(-1)
    flat = (blocks < 0.004).float().mean(1)
    # Contrasts in units of the film's own spread: window-invariant, as a reader adjusts the window.
    spread = x.std((1, 2)).clamp(min=1e-3)
    cols = [(mediastinum - right_lung) / spread, (mediastinum - left_lung) / spread, (left_lung - right_lung) / spread,
            width, offset, d_right, d_left, torch.minimum(s_right, s_left) / spread, mirror, mean_corr,
            x.mean((1, 2)), spread, flat]
    return torch.stack(cols, 1)


def mean_film(images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """The mean of real films at 32 px, in [0, 1] (the reference layout of a chest film)."""
    total = torch.zeros(MEAN_FILM_SIZE, MEAN_FILM_SIZE)
    for i in range(0, images.shape[0], batch):
        x = prepare(images[i:i + batch])
        total += F.interpolate(x[:, None], size=(MEAN_FILM_SIZE, MEAN_FILM_SIZE), mode="bilinear",
                               antialias=True, align_corners=False)[:, 0].sum(0)
    return total / max(1, images.shape[0])


def bands(values: np.ndarray, percentiles: tuple[float, float]) -> dict[str, list[float]]:
    """{feature: [lo, hi]}: the percentiles of real films' features (NaN rows ignored)."""
    lo, hi = percentiles
    return {name: [float(np.nanpercentile(values[:, j], lo)), float(np.nanpercentile(values[:, j], hi))]
            for j, name in enumerate(FEATURE_NAMES)}


def excess(values: np.ndarray, band: dict[str, list[float]]) -> np.ndarray:
    """(N, F) distance of each feature outside its band, in band widths (0 inside)."""
    lo = np.array([band[k][0] for k in FEATURE_NAMES])
    hi = np.array([band[k][1] for k in FEATURE_NAMES])
    width = np.maximum(hi - lo, 1e-6)
    out = np.maximum(lo - values, 0) + np.maximum(values - hi, 0)
    return np.nan_to_num(out / width, nan=0.0)
