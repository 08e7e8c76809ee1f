"""Reading image files as the models see them: PNG / JPEG through the loader's own grey decode,
DICOM through pydicom; letterboxed to a square side, in [-1, 1]. Shared by ``cxrgen score`` and the
expert panel (file I/O only: no eye's network is shared)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .mimic import letterbox_resize, load_grayscale

# cxrgen's own contact sheets (generate --grid, simulate --grid) sit beside the images: not films to read.
CONTACT_SHEETS = frozenset({"grid.png", "contact_sheet.png"})
DICOM_SUFFIXES = (".dcm", ".dicom")


def read_dicom_pixels(path: Path) -> np.ndarray:
    """A DICOM image as float (H, W) in [0, 1] (MONOCHROME1 inverted; scaled by its stored bit depth)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array.astype(np.float64)
    except Exception as e:  # pydicom raises assorted types for non-DICOM / pixel-less files
        raise ValueError(f"corrupt or unreadable DICOM image {path}: {e}") from e
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected a single grey frame, got pixel array of shape {arr.shape}")
    bits = int(getattr(ds, "BitsStored", 0) or 0)
    if bits and arr.min() >= 0:  # unsigned stored values: full range of the stored bit depth
        arr = arr / float(2 ** bits - 1)
    else:  # signed or unknown depth: the image's own range
        arr = (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-12)
    if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
        arr = 1.0 - arr
    return np.clip(arr, 0.0, 1.0)


def read_image(path: str | Path, size: int) -> torch.Tensor:
    """(1, size, size) in [-1, 1], letterboxed like the training data."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        x = torch.from_numpy(read_dicom_pixels(path).astype(np.float32))[None]
    else:
        x = load_grayscale(path)
    return letterbox_resize(x, size) * 2 - 1
