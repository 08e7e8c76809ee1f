"""Pathology inserted into the CT volume in Hounsfield units, where anatomy puts it.

Each ``insert_*`` edits a working copy of the HU volume inside one bounding box
(``Scene.edit``), so the radiograph is rendered from changed physics, not painted on
the image, and a lesion costs only its own footprint. Each returns the parameters it
used (ground truth). Values: fluid ~10 HU, soft tissue / consolidated lung 20-45 HU,
aerated lung about -850 HU, air -1000 HU, calcification 600+ HU.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random

import torch
import torch.nn.functional as F

from ..findings import Finding
from .anatomy import LABELS, LOBE_LABELS, Anatomy

Box = tuple[slice, slice, slice]
SEVERITY_INDEX = {"small": 0, "moderate": 1, "large": 2}


@dataclasses.dataclass(frozen=True)
class Region:
    """Precomputed anatomy facts the inserters need (built once per process)."""

    box: Box  # bounding box of the mask
    centroid: tuple[float, float, float]  # (z, y, x) mm
    zmin: float  # lowest point, mm
    zmax: float


def voxel_mm(anat: Anatomy, box: Box):
    """Broadcastable (z, y, x) mm coordinates of a box's voxel centres, shapes (d,1,1), (1,h,1), (1,1,w)."""
    out = []
    for ax, (sl, n, s) in enumerate(zip(box, anat.shape, anat.spacing)):
        start, stop, _ = sl.indices(n)
        c = (torch.arange(start, stop, dtype=torch.float32) + 0.5 - n / 2) * s
        shape = [1, 1, 1]
        shape[ax] = -1
        out.append(c.view(shape))
    z, y, x = out
    return -z, y, x


def sample_grid(anat: Anatomy, z, y, x) -> torch.Tensor:
    """grid_sample coordinates (..., 3) of the CT at mm points (z, y, x), broadcast together."""
    ext_d, ext_h, ext_w = anat.extent
    z, y, x = torch.broadcast_tensors(z, y, x)
    return torch.stack([x / (ext_w / 2), y / (ext_h / 2), -z / (ext_d / 2)], -1)


def mm_to_index(anat: Anatomy, z: float, y: float, x: float) -> tuple[int, int, int]:
    n, s = anat.shape, anat.spacing
    return (int(-z / s[0] + n[0] / 2), int(y / s[1] + n[1] / 2), int(x / s[2] + n[2] / 2))


def box_around(anat: Anatomy, center, radius_mm) -> Box:
    """Box (clipped to the volume) of half-size ``radius_mm`` (scalar or (z, y, x)) around a mm point."""
    r = radius_mm if isinstance(radius_mm, tuple) else (radius_mm,) * 3
    idx = mm_to_index(anat, *center)
    out = []
    for i, rr, n, s in zip(idx, r, anat.shape, anat.spacing):
        k = int(math.ceil(rr / s)) + 1
        out.append(slice(max(0, i - k), min(n, i + k + 1)))
    return tuple(out)


def _region(anat: Anatomy, mask: torch.Tensor, pad: int = 0) -> Region:
    idx = mask.nonzero()
    if len(idx) == 0:
        raise ValueError("empty anatomical mask")
    lo, hi = idx.min(0).values, idx.max(0).values
    box = tuple(slice(max(0, int(a) - pad), min(n, int(b) + 1 + pad)) for a, b, n in zip(lo, hi, anat.shape))
    z, y, x = voxel_mm(anat, box)
    m = mask[box].float()
    tot = m.sum()
    c = tuple(float((m * v).sum() / tot) for v in (z, y, x))
    zz = (z.expand_as(m))[m > 0]
    return Region(box, c, float(zz.min()), float(zz.max()))


@functools.lru_cache(maxsize=2)
def regions(anat: Anatomy) -> dict[str, Region]:
    lab = anat.labels
    out = {name: _region(anat, lab == i, pad=2) for name, i in LOBE_LABELS.items()}
    out["right_lung"] = _region(anat, anat.mask(*lung_side("right")), pad=4)
    out["left_lung"] = _region(anat, anat.mask(*lung_side("left")), pad=4)
    out["heart"] = _region(anat, lab == LABELS["heart"], pad=2)
    out["trachea"] = _region(anat, lab == LABELS["trachea"], pad=2)
    return out


@functools.lru_cache(maxsize=2)
def _workspace(anat: Anatomy) -> torch.Tensor:
    return anat.hu.clone()


class Scene:
    """A working copy of the HU volume plus the attenuation changes made to it.

    The copy is one per process and anatomy; ``restore`` undoes the edits box by box,
    so a case costs its lesions' boxes, not a 35 MB copy of the CT. Use as a context
    manager (not thread-safe; the simulator runs one case per process at a time).
    """

    def __init__(self, anat: Anatomy):
        self.anat = anat
        self.hu = _workspace(anat)
        self.edits: list[tuple[Box, torch.Tensor, torch.Tensor]] = []  # (box, old HU, new HU)

    def edit(self, box: Box, new_hu: torch.Tensor) -> None:
        old = self.hu[box].clone()
        self.hu[box] = new_hu
        self.edits.append((box, old, new_hu))

    def restore(self) -> None:
        for box, old, _ in reversed(self.edits):
            self.hu[box] = old

    def __enter__(self) -> "Scene":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def lung_side(side: str) -> tuple[int, ...]:
    return (12, 13, 14) if side == "right" else (10, 11)


def _in_labels(anat: Anatomy, box: Box, ids) -> torch.Tensor:
    return torch.isin(anat.labels[box], torch.tensor(ids, dtype=anat.labels.dtype))


def smooth_noise(shape, rng: random.Random, scale_vox: int = 6) -> torch.Tensor:
    """Smooth random field in [0, 1] (patchy opacities, lobulated masses)."""
    g = torch.Generator().manual_seed(rng.getrandbits(31))
    coarse = [max(2, n // scale_vox) for n in shape]
    f = F.interpolate(torch.rand(1, 1, *coarse, generator=g), size=tuple(shape), mode="trilinear", align_corners=True)
    f = f[0, 0]
    return (f - f.min()) / (f.max() - f.min() + 1e-6)


@functools.lru_cache(maxsize=4)
def wall_distance(anat: Anatomy, side: str) -> torch.Tensor:
    """Distance (mm) from each voxel of one lung to that lung's surface (pleura), in its box."""
    from scipy import ndimage

    reg = regions(anat)[f"{side}_lung"]
    lung = _in_labels(anat, reg.box, lung_side(side)).numpy()
    return torch.from_numpy(ndimage.distance_transform_edt(lung, sampling=anat.spacing).astype("float32"))


def insert_effusion(scene: Scene, side: str, severity: str, rng: random.Random, supine: bool) -> dict:
    """Pleural fluid in the dependent pleural space, replacing lung from the pleura inwards.

    Fluid fills the pleural space around the lung base in a layer that thickens with
    depth below the fluid level, so it first fills and blunts the costophrenic angle
    and climbs the chest wall as a meniscus. Supine / semi-erect (AP films): part of
    the fluid layers posteriorly, a veil over the lower hemithorax.
    """
    if side == "bilateral":
        return {s: insert_effusion(scene, s, severity, rng, supine) for s in ("left", "right")}
    anat, reg = scene.anat, regions(scene.anat)[f"{side}_lung"]
    z, y, x = voxel_mm(anat, reg.box)
    lung = _in_labels(anat, reg.box, lung_side(side))
    dist = wall_distance(anat, side)
    height = reg.zmax - reg.zmin
    frac = (0.12, 0.3, 0.55)[SEVERITY_INDEX[severity]] * rng.uniform(0.85, 1.15)
    level = reg.zmin + frac * height
    depth = (level - z).clamp(min=0)  # how far below the fluid level
    fluid = lung & (depth > 0) & (dist < 1.0 + rng.uniform(0.5, 0.9) * depth)
    if supine:
        back = y - reg.centroid[1] > 40 - (0.3, 0.5, 0.8)[SEVERITY_INDEX[severity]] * 60
        layer = (level + 0.5 * height - z).clamp(min=0)
        fluid = fluid | (lung & back & (layer > 0) & (dist < 1.0 + 0.25 * layer))
    new = torch.where(fluid, torch.tensor(10.0), scene.hu[reg.box])
    scene.edit(reg.box, new)
    return {"level_mm_above_base": round(frac * height, 1), "supine_layering": supine}


def insert_cardiomegaly(scene: Scene, severity: str | None, rng: random.Random) -> dict:
    """Enlarge the heart about its centroid; the enlarged heart displaces lung and fat."""
    anat, reg = scene.anat, regions(scene.anat)["heart"]
    scale = (1.22, 1.38, 1.55)[SEVERITY_INDEX[severity or "moderate"]] * rng.uniform(0.97, 1.03)
    cz, cy, cx = reg.centroid
    cz = reg.zmax - 0.3 * (reg.zmax - reg.zmin)  # grow from the base of the heart: ventricles enlarge down and out
    half = [(s.stop - s.start) * sp * scale / 2 + 6 for s, sp in zip(reg.box, anat.spacing)]
    box = box_around(anat, reg.centroid, tuple(half))
    z, y, x = voxel_mm(anat, box)
    # Inverse-map each voxel into the original heart; transverse growth dominates (ventricles).
    sz = 1 + (scale - 1) * 0.5
    grid = sample_grid(anat, cz + (z - cz) / sz, cy + (y - cy) / scale, cx + (x - cx) / scale)
    heart = (anat.labels == LABELS["heart"]).float()[None, None]
    inside = F.grid_sample(heart, grid[None], mode="bilinear", align_corners=False)[0, 0] > 0.5
    # Keep bone (spine, sternum) in place; the heart pushes lung and fat aside.
    grown = inside & (scene.hu[box] < 150)
    new = torch.where(grown, torch.tensor(40.0) + (scene.hu[box] - 40).clamp(-20, 20), scene.hu[box])
    scene.edit(box, new)
    return {"heart_scale": round(scale, 3)}


def insert_pneumothorax(scene: Scene, side: str, severity: str, rng: random.Random) -> dict:
    """Collapse the lung towards its hilum; the freed pleural space is air with no markings.

    Collapsed lung keeps its mass, so it gets denser (HU rises as volume falls).
    """
    if side == "bilateral":
        return {s: insert_pneumothorax(scene, s, severity, rng) for s in ("left", "right")}
    anat, reg = scene.anat, regions(scene.anat)[f"{side}_lung"]
    c = (0.88, 0.72, 0.55)[SEVERITY_INDEX[severity]] * rng.uniform(0.96, 1.04)
    z, y, x = voxel_mm(anat, reg.box)
    lung = _in_labels(anat, reg.box, lung_side(side))
    hz, hy, hx = reg.centroid
    hz = hz - 0.1 * (reg.zmax - reg.zmin)  # hilum sits below the lung's mid-height
    grid = sample_grid(anat, hz + (z - hz) / c, hy + (y - hy) / c, hx + (x - hx) / c)[None]
    hu = scene.hu[None, None]
    lung_f = torch.isin(anat.labels, torch.tensor(lung_side(side), dtype=anat.labels.dtype)).float()[None, None]
    inside = F.grid_sample(lung_f, grid, align_corners=False)[0, 0] > 0.5
    moved = F.grid_sample(hu, grid, align_corners=False)[0, 0]
    dense = (-1000 + (moved + 1000) / c**3).clamp(max=60)
    new = torch.where(lung & inside, dense, torch.where(lung, torch.tensor(-1000.0), scene.hu[reg.box]))
    scene.edit(reg.box, new)
    return {"lung_scale": round(c, 3)}


@functools.lru_cache(maxsize=16)
def lobe_depth(anat: Anatomy, lobe: str):
    """Distance (mm) from each voxel of a lobe to the lobe's edge, in the lobe's box."""
    from scipy import ndimage

    m = (anat.labels[regions(anat)[lobe].box] == LOBE_LABELS[lobe]).numpy()
    return ndimage.distance_transform_edt(m, sampling=anat.spacing)


def sample_in_lobe(anat: Anatomy, lobe: str, rng: random.Random, margin_mm: float) -> tuple[float, float, float]:
    """A random point inside ``lobe`` at least ``margin_mm`` from its edge (as far as possible)."""
    reg = regions(anat)[lobe]
    dist = lobe_depth(anat, lobe)
    ok = (dist >= min(margin_mm, 0.6 * dist.max())).nonzero()
    i = rng.randrange(len(ok[0]))
    idx = [int(a[i]) + s.start for a, s in zip(ok, reg.box)]
    n, s = anat.shape, anat.spacing
    return (-(idx[0] + 0.5 - n[0] / 2) * s[0], (idx[1] + 0.5 - n[1] / 2) * s[1], (idx[2] + 0.5 - n[2] / 2) * s[2])


def insert_ball(scene: Scene, center, radius_mm: float, hu: float, rng: random.Random, lobulated: bool) -> None:
    """A soft-edged sphere (optionally lobulated) of ``hu`` blended into the volume."""
    anat = scene.anat
    box = box_around(anat, center, radius_mm * 1.5 + 3)
    z, y, x = voxel_mm(anat, box)
    r = torch.sqrt((z - center[0]) ** 2 + (y - center[1]) ** 2 + (x - center[2]) ** 2)
    if lobulated:
        r = r / (0.8 + 0.4 * smooth_noise(r.shape, rng, scale_vox=4))
    # Partial volume over ~1 mm keeps small lesions from aliasing on 1.4 mm voxels.
    w = (radius_mm - r + 0.7).clamp(0, 1.4) / 1.4
    scene.edit(box, scene.hu[box] * (1 - w) + hu * w)


def insert_lesion(scene: Scene, f: Finding, rng: random.Random) -> dict:
    """Nodule (< 3 cm), mass (> 3 cm) or calcified granuloma (2-6 mm, very dense)."""
    lobe = f.lobe or rng.choice(sorted(LOBE_LABELS))
    if f.kind == "calcified_granuloma":
        radius, hu = rng.uniform(1.5, 4.0), rng.uniform(1500, 2500)
    elif f.kind == "nodule":
        radius, hu = rng.uniform(5.0, 14.0), rng.uniform(30, 60)
    else:
        radius, hu = rng.uniform(17.0, 30.0), rng.uniform(35, 60)
    center = sample_in_lobe(scene.anat, lobe, rng, margin_mm=radius)
    insert_ball(scene, center, radius, hu, rng, lobulated=f.kind == "mass")
    return {"lobe": lobe, "center_mm": [round(c, 1) for c in center], "diameter_mm": round(2 * radius, 1)}


def insert_airspace(scene: Scene, f: Finding, rng: random.Random) -> dict:
    """Consolidation / pneumonia: alveoli fill (20-45 HU) inside a lobe; airways stay air.

    Bronchi already dark on the CT (< -975 HU) are kept, so air bronchograms appear
    wherever the consolidation surrounds them. Pneumonia is patchier than lobar
    consolidation.
    """
    anat = scene.anat
    lobe = f.lobe or rng.choice(sorted(LOBE_LABELS))
    reg = regions(anat)[lobe]
    lobe_mask = anat.labels[reg.box] == LOBE_LABELS[lobe]
    field = smooth_noise(lobe_mask.shape, rng, scale_vox=10 if f.kind == "pneumonia" else 18)
    extent = rng.uniform(0.5, 0.8) if f.kind == "pneumonia" else rng.uniform(0.75, 1.0)
    filled = lobe_mask & (field < extent) & (scene.hu[reg.box] > -975)
    new = torch.where(filled, torch.tensor(rng.uniform(20, 45)), scene.hu[reg.box])
    scene.edit(reg.box, new)
    return {"lobe": lobe, "fraction": round(extent, 2)}


def insert_atelectasis(scene: Scene, side: str, severity: str, rng: random.Random) -> dict:
    """Basal atelectasis: plate-like bands (small) to collapse of the posterior lower lobe (large)."""
    anat = scene.anat
    sides = ["left", "right"] if side == "bilateral" else [side]
    params = {}
    for s in sides:
        lobe = "LLL" if s == "left" else "RLL"
        reg = regions(anat)[lobe]
        z, y, x = voxel_mm(anat, reg.box)
        m = anat.labels[reg.box] == LOBE_LABELS[lobe]
        height = reg.zmax - reg.zmin
        if severity == "small":
            # Plate-like (discoid) atelectasis: a thin, slightly tilted band a few cm long near the base.
            zc = reg.zmin + rng.uniform(0.25, 0.45) * height
            x0 = reg.centroid[2] + rng.uniform(-15, 15)
            tilt = rng.uniform(-0.15, 0.15)
            plate = (z - zc - tilt * (x - x0)).abs() < rng.uniform(2.0, 3.5)
            band = m & plate & ((x - x0).abs() < rng.uniform(25, 40)) & ((y - reg.centroid[1]).abs() < 45)
        else:
            # Posterior-basal segments collapse first: a tilted, irregular front, no flat planes.
            score = (z - reg.zmin) / height - 0.35 * (y - reg.centroid[1]) / 60
            score = score + 0.15 * smooth_noise(m.shape, rng, scale_vox=8)
            band = m & (score < (0.3 if severity == "moderate" else 0.5))
        new = torch.where(band, torch.tensor(rng.uniform(-150, 0)), scene.hu[reg.box])
        scene.edit(reg.box, new)
        params[s] = {"lobe": lobe}
    return params


def insert_edema(scene: Scene, severity: str | None, rng: random.Random) -> dict:
    """Bilateral perihilar haze ('bat wing'): lung density rises towards the hila."""
    anat = scene.anat
    amp = (120.0, 220.0, 340.0)[SEVERITY_INDEX[severity or "moderate"]] * rng.uniform(0.9, 1.1)
    for side in ("left", "right"):
        reg = regions(anat)[f"{side}_lung"]
        z, y, x = voxel_mm(anat, reg.box)
        lung = _in_labels(anat, reg.box, lung_side(side))
        hz, hy, hx = reg.centroid
        hx = hx * 0.6  # hilum is medial to the lung's centroid
        d2 = ((z - hz) / 70) ** 2 + ((y - hy) / 90) ** 2 + ((x - hx) / 55) ** 2
        haze = amp * torch.exp(-d2) * (0.75 + 0.5 * smooth_noise(lung.shape, rng, scale_vox=8))
        scene.edit(reg.box, torch.where(lung, scene.hu[reg.box] + haze, scene.hu[reg.box]))
    return {"haze_hu": round(amp, 1)}
