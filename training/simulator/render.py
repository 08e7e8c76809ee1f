"""From findings, pose and exposure to a radiograph: the simulator's physics in order.

1. Insert each finding into a working copy of the CT (pathology.py, devices.py).
2. Convert HU changes to attenuation changes and integrate them through the
   projector's slabs over their own boxes; add them to the anatomy's cached slab stack.
3. Warp the slabs onto the detector for this view and pose (projector.py).
4. Detector physics: transmission exp(-L), scatter, quantum noise, detector blur.
5. Display processing as a CXR workstation does: log image, unsharp masking, a
   sigmoid look-up table set by exposure and contrast, 8-bit output.

Attenuation is split in two material bases, mu = A(HU) + b * B(HU): A is water-like
(Compton) and B the extra attenuation of dense material (photoelectric, stronger at
low kVp). ``b`` varies per exam like tube voltage does, so bone conspicuity varies,
and both bases are linear, so the slab stacks stay additive.
"""

from __future__ import annotations

import dataclasses
import functools
import random

import torch
import torch.nn.functional as F

from ..findings import KINDS, LOBES, Finding, Laterality
from . import devices, pathology
from .anatomy import Anatomy
from .projector import Geometry, Pose, render_stack, slab_integrals, elastic_field

MU_WATER = 0.02  # 1/mm, water at ~60 keV effective energy (about 0.2 /cm)
N_SLABS = 24  # 15 mm slabs through a 36 cm CT (see projector.py for the error this makes)


def attenuation_bases(hu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a = MU_WATER * (1 + hu / 1000).clamp(min=0)
    b = MU_WATER * (hu / 1000).clamp(0, 2)
    return a, b


@dataclasses.dataclass(frozen=True)
class Imaging:
    """Exposure and detector settings of one exam (all ground truth)."""

    bone: float = 0.6  # dense-material weight b (higher = lower kVp, brighter bone)
    photons: float = 40000.0  # photons per pixel without the patient; fewer = noisier
    scatter: float = 0.15  # scatter-to-primary ratio (low-frequency veil)
    blur_mm: float = 0.8  # detector point-spread sigma
    unsharp: float = 1.2  # edge enhancement of the display processing
    exposure: float = 0.0  # window shift: positive = darker (over-exposed) film
    contrast: float = 1.0  # look-up-table steepness
    elastic_mm: float = 0.0  # amplitude of the smooth anatomical warp
    elastic_seed: int = 0


@dataclasses.dataclass(frozen=True)
class Case:
    findings: tuple[Finding, ...]
    geometry: Geometry
    pose: Pose
    imaging: Imaging
    seed: int  # drives every random choice inside the inserters


@functools.lru_cache(maxsize=2)
def anatomy_stacks(anat: Anatomy) -> tuple[torch.Tensor, torch.Tensor]:
    """Slab stacks of the normal anatomy (both bases), computed once per process."""
    a, b = attenuation_bases(anat.hu)
    dy = anat.spacing[1]
    return slab_integrals(a, dy, N_SLABS), slab_integrals(b, dy, N_SLABS)


@functools.lru_cache(maxsize=4)
def display_window(anat: Anatomy, view: str) -> tuple[float, float]:
    """Reference line-integral window (lungs .. spine) from the canonical normal film."""
    sa, sb = anatomy_stacks(anat)
    L = render_stack(sa + 0.6 * sb, anat.extent, Geometry(view=view), Pose(inspiration=1.3), 128)
    body = L[L > 0.5]
    return float(body.quantile(0.02)), float(body.quantile(0.98))


INSERTERS = {
    "pleural_effusion": lambda s, f, r, c: pathology.insert_effusion(
        s, f.side.value, f.severity.value, r, supine=c.geometry.view == "AP"),
    "cardiomegaly": lambda s, f, r, c: pathology.insert_cardiomegaly(s, f.severity.value, r),
    "pneumothorax": lambda s, f, r, c: pathology.insert_pneumothorax(s, f.side.value, f.severity.value, r),
    "nodule": lambda s, f, r, c: pathology.insert_lesion(s, f, r),
    "mass": lambda s, f, r, c: pathology.insert_lesion(s, f, r),
    "calcified_granuloma": lambda s, f, r, c: pathology.insert_lesion(s, f, r),
    "consolidation": lambda s, f, r, c: pathology.insert_airspace(s, f, r),
    "pneumonia": lambda s, f, r, c: pathology.insert_airspace(s, f, r),
    "atelectasis": lambda s, f, r, c: pathology.insert_atelectasis(s, f.side.value, f.severity.value, r),
    "edema": lambda s, f, r, c: pathology.insert_edema(s, f.severity.value, r),
    "endotracheal_tube": lambda s, f, r, c: devices.insert_endotracheal_tube(s, r),
    "central_line": lambda s, f, r, c: devices.insert_central_line(s, f.side, r),
}


def complete(f: Finding, rng: random.Random) -> Finding:
    """Fill what a report left unsaid (side, severity, lobe) so the image commits to one."""
    spec = KINDS[f.kind]
    side, sev, lobe = f.side, f.severity, f.lobe
    if spec.lobar and lobe is None:
        lobes = [k for k, v in LOBES.items() if side is None or v == side or side == Laterality.BILATERAL]
        lobe = rng.choice(lobes)
    elif spec.sided and side is None:
        choices = ["left", "right"] if f.kind in ("pneumothorax", "central_line") else ["left", "right", "bilateral"]
        side = rng.choice(choices)
    if spec.graded and sev is None:
        sev = rng.choice(["small", "moderate", "large"])
    if spec.lobar:
        side = None  # Finding derives the side from the lobe
    return Finding(f.kind, side, sev, lobe)


# Devices last (they lie on top of whatever the lungs do); airspace before fluid.
ORDER = ["cardiomegaly", "edema", "consolidation", "pneumonia", "atelectasis", "nodule", "mass",
         "calcified_granuloma", "pneumothorax", "pleural_effusion", "endotracheal_tube", "central_line"]


def insert_findings(anat: Anatomy, case: Case, without: frozenset[str] = frozenset()) -> tuple[pathology.Scene, list[dict]]:
    """Apply the case's findings; the returned scene's edit log holds every change (the
    working volume itself is restored on return).

    ``without``: kinds drawn but left out. Each is inserted (so it takes the same random draws) and its edits
    undone at once, so every other finding is drawn exactly as in the full case: the same exam without those
    findings (a counterfactual film; the findings after it see the volume without it, as they would)."""
    rng = random.Random(case.seed)
    truth = []
    with pathology.Scene(anat) as scene:
        for f in sorted(case.findings, key=lambda f: ORDER.index(f.kind)):
            f = complete(f, rng)
            n = len(scene.edits)
            params = INSERTERS[f.kind](scene, f, rng, case)
            if f.kind in without:
                for box, old, _ in reversed(scene.edits[n:]):
                    scene.hu[box] = old
                del scene.edits[n:]
                continue
            truth.append({**f.to_dict(), "params": params})
    return scene, truth


def scene_stack(scene: pathology.Scene, bone: float) -> torch.Tensor:
    """The anatomy's slab stack plus every edit's attenuation change, for bone weight ``bone``."""
    sa, sb = anatomy_stacks(scene.anat)
    stack = sa + bone * sb
    n_h, dy = scene.anat.shape[1], scene.anat.spacing[1]
    for box, old, new in scene.edits:
        (na, nb), (oa, ob) = attenuation_bases(new), attenuation_bases(old)
        delta = slab_integrals((na - oa) + bone * (nb - ob), dy, N_SLABS, h0=box[1].start or 0, n_total=n_h)
        stack[:, box[0], box[2]] += delta
    return stack


def _gauss(img: torch.Tensor, sigma_px: float) -> torch.Tensor:
    if sigma_px < 0.3:
        return img
    r = int(3 * sigma_px) + 1
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma_px) ** 2)
    k = k / k.sum()
    x = F.pad(img[None, None], (r, r, r, r), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    return F.conv2d(x, k.view(1, 1, -1, 1))[0, 0]


def detector(L: torch.Tensor, im: Imaging, mm_per_px: float, gen: torch.Generator) -> torch.Tensor:
    """Line integrals -> noisy, blurred log image (what the detector records, log-transformed)."""
    t = torch.exp(-L)
    # Scatter: a broad low-frequency veil, blurred at 1/8 resolution (it has no detail).
    small = F.avg_pool2d(t[None, None], 8)[0, 0]
    veil = F.interpolate(_gauss(small, 25.0 / (8 * mm_per_px))[None, None], size=t.shape, mode="bilinear")[0, 0]
    t = t + im.scatter * veil
    # Quantum noise: Poisson counts, Gaussian approximation; relative noise grows where few photons arrive.
    t = t + torch.sqrt(t / im.photons) * torch.randn(t.shape, generator=gen)
    log = -torch.log(t.clamp(min=1e-5))
    return _gauss(log, im.blur_mm / mm_per_px)


def display(log: torch.Tensor, im: Imaging, window: tuple[float, float], mm_per_px: float) -> torch.Tensor:
    """Workstation processing: unsharp mask, then a look-up table; values in [0, 1].

    Strong unsharp masking (4 mm) is what makes vessels, nodules and tube edges stand
    out on processed CXRs; the sigmoid's centre and slope are the exam's exposure and
    contrast.
    """
    log = log + im.unsharp * (log - _gauss(log, 4.0 / mm_per_px))
    lo, hi = window
    t = (log - lo) / (hi - lo) - 0.55 - im.exposure
    return torch.sigmoid(5.5 * im.contrast * t)


def render_case(anat: Anatomy, case: Case, px: int, without: frozenset[str] = frozenset()) -> tuple[torch.Tensor, list[dict]]:
    """Render one case to a (px, px) float image in [0, 1] and the findings' ground truth (``without``: kinds
    left out, every other random draw kept: see ``insert_findings``)."""
    scene, truth = insert_findings(anat, case, frozenset(without))
    stack = scene_stack(scene, case.imaging.bone)
    inner = max(px, 256)  # render at >= 256 and downsample: thin ribs do not alias at 128
    elastic = elastic_field(case.imaging.elastic_seed, case.imaging.elastic_mm)
    L = render_stack(stack, anat.extent, case.geometry, case.pose, inner, elastic)
    gen = torch.Generator().manual_seed(case.seed)
    mm = case.geometry.fov_mm / inner
    img = display(detector(L, case.imaging, mm, gen), case.imaging, display_window(anat, case.geometry.view), mm)
    if inner != px:
        img = F.interpolate(img[None, None], size=(px, px), mode="area")[0, 0]
    return img.clamp(0, 1), truth
