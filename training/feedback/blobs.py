"""Content-addressed image files: ``<blobs>/<sha[:2]>/<sha256>.png``.

The database holds only the hash and this relative location, never pixels. A file is written
once, atomically (temporary file in the same folder, fsync, ``os.replace``); because its name is
its content's hash, two writers racing to write the same image write the same bytes, and a
rewrite is harmless. Every image is stored as an 8-bit grey PNG: PNG bytes or PNG files are kept
byte for byte (cxrgen's provenance chunks travel with them); arrays and other image files are
encoded once here.
"""

from __future__ import annotations

import hashlib
import io
import os
import uuid
from pathlib import Path

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def to_png_bytes(image) -> bytes:
    """PNG bytes for an (H, W) uint8 array, a float array in [0, 1], PNG bytes, or an image file path."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data.startswith(PNG_SIGNATURE):
            raise ValueError("image: bytes given are not a PNG (no PNG signature)")
        return data
    if isinstance(image, (str, os.PathLike)):
        return _file_png(Path(image))
    if isinstance(image, np.ndarray):
        return _encode(_to_uint8(image))
    raise ValueError(f"image: expected an (H, W) array, PNG bytes or a file path, got {type(image).__name__}")


def _to_uint8(a: np.ndarray) -> np.ndarray:
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"image: expected a non-empty (H, W) array, got shape {a.shape}")
    if a.dtype == np.uint8:
        return a
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"image: expected uint8 or float in [0, 1], got dtype {a.dtype}")
    if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
        raise ValueError("image: float arrays must hold finite values in [0, 1]")
    return np.rint(a.astype(np.float64) * 255).astype(np.uint8)


def _encode(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _file_png(path: Path) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"image: no file at {path}")
    data = path.read_bytes()
    if data.startswith(PNG_SIGNATURE):
        return data
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return _encode(np.asarray(im.convert("L")))
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"image: {path} is not an image file PIL can read: {e}") from e


def decode(data: bytes) -> np.ndarray:
    """(H, W) uint8 pixels of stored PNG bytes."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("L")).copy()


class BlobFolder:
    """Image files named by content hash under ``root``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @staticmethod
    def location(sha: str) -> str:
        return f"{sha[:2]}/{sha}.png"

    def path(self, location: str) -> Path:
        return self.root / location

    def put(self, data: bytes) -> tuple[str, str]:
        """Store PNG bytes once; returns (sha256, location relative to root)."""
        sha = hashlib.sha256(data).hexdigest()
        loc = self.location(sha)
        dest = self.path(loc)
        if dest.is_file() and dest.stat().st_size == len(data):
            return sha, loc
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{sha}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        return sha, loc

    def get(self, location: str) -> bytes:
        path = self.path(location)
        if not path.is_file():
            raise FileNotFoundError(f"image file {path} is missing from the blob folder {self.root}")
        return path.read_bytes()
