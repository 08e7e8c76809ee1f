"""Small helpers shared by every saved model folder (judge, panel, rewards): JSON-safe metadata and
safetensors weights read with errors that name the file; tensors a resumed run must not make again."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping


def jsonable(x):
    """Strict-JSON-ready copy: NaN / infinity -> None, numpy / torch scalars -> Python, paths -> str."""
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:  # numpy / torch scalars
        x = x.item()
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    return x


def read_safetensors(path: Path, what: str) -> dict:
    """A state dict from a .safetensors file; missing -> FileNotFoundError, corrupt -> ValueError (naming it)."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} weights not found: {path}")
    try:
        from safetensors.torch import load_file

        return load_file(str(path))
    except Exception as e:  # safetensors raises assorted types for truncated / garbage files
        raise ValueError(f"{path}: corrupt or unreadable {what} weights: {e}") from None


def read_meta(path: Path, what: str, required: tuple[str, ...], format_version: int, hint: str = "") -> dict:
    """A model folder's JSON metadata, checked: missing -> FileNotFoundError; unreadable, not an object with
    the ``required`` keys, or another format version -> ValueError. Every message names ``path`` and ``what``
    (e.g. "reward manifest"); ``hint`` says how to make a missing one."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}{hint}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: corrupt {what}: {e}") from None
    missing = [k for k in ("format", *required) if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ValueError(f"{path}: not a {what}, missing key(s) {missing}")
    if meta["format"] != format_version:
        raise ValueError(f"{path}: {what} format {meta['format']!r}, this code reads {format_version}")
    return meta


def cached_tensors(path: Path, key, make):
    """``make()``'s tensors, kept in ``path`` with ``key``: reused when the key matches (a resumed run), made
    again when the file is absent, foreign or unreadable."""
    import torch

    if path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if blob.get("key") == key:
                return blob["value"]
        except Exception:  # a truncated or foreign file: make it again and overwrite it
            pass
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # one per process: several (accelerate launch) may write at once
    torch.save({"key": key, "value": value}, tmp)
    tmp.replace(path)
    return value


def trim_log(path: Path, key: str, last: int) -> int:
    """Drop the rows of a JSON-lines log past ``last`` (``row[key] > last``) and any unreadable line, for a run
    resumed from its state at ``last``: a run killed after logging a step and before saving its state logs that
    step again on resume. Rows without ``key`` are kept. Returns how many lines were dropped."""
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut off by the kill
            dropped += 1
            continue
        if isinstance(row, dict) and isinstance(row.get(key), (int, float)) and row[key] > last:
            dropped += 1
            continue
        keep.append(line)
    if dropped:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text("".join(x + "\n" for x in keep), encoding="utf-8")
        tmp.replace(path)
    return dropped
