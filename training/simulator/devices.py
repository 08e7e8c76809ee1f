"""Support devices drawn into the CT along the anatomy that carries them.

Endotracheal tube: a plastic tube (its lumen stays air) with a radio-opaque stripe,
following the trachea's centreline, tip 3-7 cm above the carina (where a correctly
placed tube sits). Central venous catheter: a thin radio-opaque line from the internal
jugular / subclavian vein through the brachiocephalic vein into the superior vena cava,
tip near the cavoatrial junction.

Tube geometry depends only on the anatomy and a few parameters, so its voxel weights
are memoised: a device costs its footprint once per process.
"""

from __future__ import annotations

import functools
import random

import torch

from .anatomy import LABELS, Anatomy
from .pathology import Scene, voxel_mm


def _centerline(anat: Anatomy, label: int) -> list[tuple[float, float, float]]:
    """Per-slice (z, y, x) centroids of a labelled structure, top to bottom."""
    m = anat.labels == label
    pts = []
    for d in range(anat.shape[0]):
        idx = m[d].nonzero()
        if len(idx):
            h, w = idx.float().mean(0).tolist()
            n, s = anat.shape, anat.spacing
            pts.append((-(d + 0.5 - n[0] / 2) * s[0], (h + 0.5 - n[1] / 2) * s[1], (w + 0.5 - n[2] / 2) * s[2]))
    return pts


def _polyline_box(anat: Anatomy, p: torch.Tensor, pad: float) -> tuple:
    """Voxel box (clipped) around a polyline's points, padded by ``pad`` mm."""
    lo, hi = p.min(0).values - pad, p.max(0).values + pad
    box = []
    for ax in range(3):
        n, s = anat.shape[ax], anat.spacing[ax]
        a, b = float(lo[ax]), float(hi[ax])
        if ax == 0:  # D runs downward in z
            a, b = -b, -a
        box.append(slice(max(0, int(a / s + n / 2)), min(n, int(b / s + n / 2) + 2)))
    return tuple(box)


def _polyline_weight(anat: Anatomy, pts: list, radius: float, pad: float = 6.0) -> tuple[tuple, torch.Tensor]:
    """Partial-volume weight (box, w in [0, 1]) of a tube of ``radius`` mm around a polyline."""
    p = torch.tensor(pts)
    box = _polyline_box(anat, p, pad)
    z, y, x = voxel_mm(anat, box)
    q = torch.stack(torch.broadcast_tensors(z, y, x), -1)  # (d, h, w, 3)
    best = torch.full(q.shape[:3], 1e9)
    for a, b in zip(p[:-1], p[1:]):
        ab = b - a
        t = ((q - a) @ ab / (ab @ ab).clamp(min=1e-6)).clamp(0, 1)
        best = torch.minimum(best, (q - a - t[..., None] * ab).norm(dim=-1))
    w = (radius - best + 0.7).clamp(0, 1.4) / 1.4
    return box, w


@functools.lru_cache(maxsize=64)
def _ett_weights(anat: Anatomy, tip_above_carina_mm: int):
    line = _centerline(anat, LABELS["trachea"])
    carina = line[-1][0]
    top = line[0]
    path = [(anat.extent[0] / 2 + 20, top[1], top[2])] + [p for p in line if p[0] >= carina + tip_above_carina_mm]
    path = path[::3] + [path[-1]]
    box, outer = _polyline_weight(anat, path, 4.5)
    _, inner = _polyline_weight(anat, path, 3.2)  # same pad, same box
    stripe_path = [(z, y, x + 3.8) for z, y, x in path]
    sbox, stripe = _polyline_weight(anat, stripe_path, 1.2)
    return box, (outer - inner).clamp(0, 1), sbox, stripe, carina


def insert_endotracheal_tube(scene: Scene, rng: random.Random) -> dict:
    tip = rng.choice(range(30, 75, 5))
    box, wall, sbox, stripe, _ = _ett_weights(scene.anat, tip)
    scene.edit(box, scene.hu[box] * (1 - wall) + 900.0 * wall)  # PVC: chlorine makes it dense
    scene.edit(sbox, scene.hu[sbox] * (1 - stripe) + 3000.0 * stripe)
    return {"tip_above_carina_mm": tip}


@functools.lru_cache(maxsize=64)
def _line_weights(anat: Anatomy, side: str, tip_offset_mm: int):
    svc = _centerline(anat, LABELS["superior_vena_cava"])
    bcv = _centerline(anat, LABELS[f"brachiocephalic_vein_{side}"])
    if side == "right":
        # Right internal jugular: straight down the neck into the right brachiocephalic vein.
        entry = (anat.extent[0] / 2 + 20, bcv[0][1], bcv[0][2] + 5)
        venous = bcv + [p for p in svc if p[0] < bcv[-1][0]]
    else:
        # Left subclavian: the left brachiocephalic vein crosses the mediastinum to the SVC.
        lateral = max(bcv, key=lambda p: p[2])
        entry = (lateral[0] + 25, lateral[1] - 10, lateral[2] + 60)
        venous = sorted(bcv, key=lambda p: -p[2])[::4] + [p for p in svc if p[0] < min(q[0] for q in bcv)]
    tip_z = svc[-1][0] + tip_offset_mm
    path = [entry] + [p for p in venous if p[0] >= tip_z]
    path = [path[0]] + path[1:-1:3] + [path[-1]]
    return _polyline_weight(anat, path, 1.4)


def insert_central_line(scene: Scene, side: str | None, rng: random.Random) -> dict:
    side = side.value if hasattr(side, "value") else side
    side = side if side in ("left", "right") else rng.choice(["right", "right", "left"])
    offset = rng.choice(range(-5, 30, 5))  # tip at or a little above the cavoatrial junction
    box, w = _line_weights(scene.anat, side, offset)
    scene.edit(box, scene.hu[box] * (1 - w) + 3000.0 * w)
    return {"side": side, "tip_above_cavoatrial_junction_mm": offset}
