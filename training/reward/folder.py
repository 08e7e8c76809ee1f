"""Scores on every image of a folder (issue 7, section 4): ``cxrgen score DIR``.

Images: PNG, JPEG and DICOM files directly in DIR (not sub-folders), in name
order. What each image claims to show comes from, in this order:

1. ``--prompt P`` (every image; findings read from the text with
   ``training.data.reports.findings_from_text``);
2. the file's own provenance (``read_png_provenance`` / ``read_dicom_provenance``:
   fields ``prompt`` and ``findings``);
3. the folder's ``generation.jsonl`` row for the file (what ``cxrgen generate`` writes);
4. nothing: prompt "" and no findings (a warning says how many). Conditional
   rewards then judge the image as a study declared normal.

A prompt with no structured findings (older provenance) gets them from its text.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from training.data.images import CONTACT_SHEETS, read_image
from training.findings import Finding
from training.generation import read_generation_log

from .data import parse_findings

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
CSV_NAME = "scores.csv"


def list_images(folder: str | Path) -> list[Path]:
    """The images directly in ``folder``; a clear error for a missing folder or one without images."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"no such folder: {folder}")
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder: give the folder that holds the images")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and p.name not in CONTACT_SHEETS)
    if not files:
        raise ValueError(f"no images (PNG, JPEG or DICOM) in {folder}")
    return files


def declared(path: Path, rows: dict[str, dict]) -> tuple[str, list[Finding]] | None:
    """(prompt, findings) from the file's provenance or generation.jsonl; None when neither says."""
    from training.provenance import read_dicom_provenance, read_png_provenance

    reader = {".png": read_png_provenance, ".dcm": read_dicom_provenance, ".dicom": read_dicom_provenance}
    prov = None
    if path.suffix.lower() in reader:
        try:
            prov = reader[path.suffix.lower()](path).to_dict()
        except ValueError:
            prov = None  # not written by cxrgen
    prov = prov or rows.get(path.name)
    if not prov:
        return None
    return str(prov.get("prompt", "")), parse_findings(prov.get("findings"))


def prompts_and_findings(files: Sequence[Path], prompt: str | None) -> tuple[list[str], list[list[Finding]], int]:
    """Per file: what it claims to show (see the module docstring); also how many claim nothing."""
    from training.data.reports import findings_from_text

    if prompt is not None:
        found = findings_from_text(prompt)
        return [prompt] * len(files), [list(found) for _ in files], 0
    # A torn line (an interrupted run) is skipped: the files' own provenance still holds.
    rows = read_generation_log(files[0].parent, strict=False) if files else {}
    prompts, findings, missing = [], [], 0
    for f in files:
        d = declared(f, rows)
        if d is None:
            missing += 1
            d = ("", [])
        p, fs = d
        prompts.append(p)
        findings.append(fs if fs or not p.strip() else findings_from_text(p))
    return prompts, findings, missing


def score_files(files: Sequence[Path], prompts, findings, names: Sequence[str], model_dir=None,
                device: str = "cpu", batch_size: int = 16) -> dict[str, list[float]]:
    """Every reward's scores for ``files`` (+ ``combined``), read and scored ``batch_size`` at a time."""
    from .base import cached_reward, combine, combined_weights

    rewards = {n: cached_reward(n, model_dir, device) for n in names}
    size = max(r.net.image_size for r in rewards.values())
    out: dict[str, list[float]] = {n: [] for n in names}
    for i in range(0, len(files), batch_size):
        x = torch.stack([read_image(p, size) for p in files[i:i + batch_size]])
        for n, r in rewards.items():
            out[n] += r.score(x, prompts[i:i + batch_size], findings[i:i + batch_size]).tolist()
    both = combine({n: torch.tensor(v) for n, v in out.items()}, combined_weights(model_dir))
    if both is not None:
        out["combined"] = both.tolist()
    return out


def write_csv(path: Path, files: Sequence[Path], scores: dict[str, list[float]]) -> Path:
    """``file`` then one column per reward (6 decimals)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", *scores])
        for i, f in enumerate(files):
            w.writerow([f.name, *(f"{scores[k][i]:.6f}" for k in scores)])
    tmp.replace(path)
    return path


def table(files: Sequence[Path], scores: dict[str, list[float]]) -> str:
    """A fixed-width text table, one row per image, plus a mean row."""
    names = list(scores)
    width = max([len("file"), len("mean")] + [len(f.name) for f in files])
    lines = ["  ".join([f"{'file':<{width}}", *(f"{n:>12}" for n in names)])]
    for i, f in enumerate(files):
        lines.append("  ".join([f"{f.name:<{width}}", *(f"{scores[n][i]:>12.3f}" for n in names)]))
    means = [float(np.mean(scores[n])) if scores[n] else math.nan for n in names]
    lines.append("  ".join([f"{'mean':<{width}}", *(f"{m:>12.3f}" for m in means)]))
    return "\n".join(lines)
