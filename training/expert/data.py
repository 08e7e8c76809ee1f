"""Data for the panel: simulated splits as tensors with targets, and generated image folders.

Simulated data is read once into memory as uint8 (5,000 films at 128 px are 80 MB), so that
training epochs never decode a JPEG twice. Targets come from the simulator's ground truth
(``ground_truth["findings"]`` and ``["pose"]``), never from report text.

A generated folder is what ``cxrgen generate --out DIR`` writes: ``DIR/*.png`` and
``DIR/generation.jsonl`` (one record per image; the last record of a file wins, since generate
appends). Where the file has no record, its PNG provenance is read instead.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from training.data.images import CONTACT_SHEETS, read_image
from training.evaluate.judge import pose_vector
from training.findings import Finding

from .config import GRADED_KINDS, KIND_NAMES, SEVERITIES, SIDED_KINDS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


# ---------------------------------------------------------------------------------- findings


def resolve_findings(recorded: Sequence | None, prompt: str) -> list[Finding]:
    """The record's structured findings; read from the prompt when the record has none."""
    from training.data.reports import findings_from_text

    if recorded:
        return [Finding.from_record(d) for d in recorded]
    return findings_from_text(prompt or "")


# ----------------------------------------------------------------------------------- targets


def targets(findings: Iterable[Mapping | Finding]) -> dict[str, torch.Tensor]:
    """Reader targets of one film.

    ``presence`` (12,) 0/1; ``side`` (9, 2) left / right presence (bilateral = both) with
    ``side_mask`` (9,) True where the kind is present with a known side; ``severity`` (5,) class
    index, -1 where the kind is absent or ungraded. Two findings of one kind (a left and a right
    nodule) merge: sides OR-ed, the larger severity kept.
    """
    presence = torch.zeros(len(KIND_NAMES))
    side = torch.zeros(len(SIDED_KINDS), 2)
    side_mask = torch.zeros(len(SIDED_KINDS), dtype=torch.bool)
    severity = torch.full((len(GRADED_KINDS),), -1, dtype=torch.long)
    for f in map(Finding.from_record, findings):
        presence[KIND_NAMES.index(f.kind)] = 1.0
        if f.kind in SIDED_KINDS and f.side is not None:
            j = SIDED_KINDS.index(f.kind)
            side_mask[j] = True
            side[j, 0] = max(side[j, 0], float(f.side.value in ("left", "bilateral")))
            side[j, 1] = max(side[j, 1], float(f.side.value in ("right", "bilateral")))
        if f.kind in GRADED_KINDS and f.severity is not None:
            j = GRADED_KINDS.index(f.kind)
            severity[j] = max(int(severity[j]), SEVERITIES.index(f.severity.value))
    return {"presence": presence, "side": side, "side_mask": side_mask, "severity": severity}


@dataclasses.dataclass
class SimSplit:
    """One simulated split in memory: uint8 films and stacked targets, in data set order."""

    images: torch.Tensor  # (N, 1, S, S) uint8
    presence: torch.Tensor  # (N, 12)
    side: torch.Tensor  # (N, 9, 2)
    side_mask: torch.Tensor  # (N, 9) bool
    severity: torch.Tensor  # (N, 5) long, -1 unknown
    pose: torch.Tensor  # (N, 7) physical units
    findings: list[list[Finding]]  # ground-truth findings per film
    ids: list[str]  # dicom_ids
    prompts: list[str]  # the report prompt per film ("" when reports are not read)

    def __len__(self) -> int:
        return self.images.shape[0]

    def unit(self, idx=slice(None)) -> torch.Tensor:
        """Films ``idx`` as float in [-1, 1]."""
        return to_unit(self.images[idx])


def to_unit(u8: torch.Tensor) -> torch.Tensor:
    return u8.float() / 127.5 - 1.0


def load_split(root: str | Path, split: str, size: int, limit: int = 0, prompts: bool = False) -> SimSplit:
    """Read ``split`` of a simulated MIMIC-layout data set (``cxrgen simulate`` output).

    ``limit`` > 0 keeps the first ``limit`` films (data set order is sorted by ids, so a limit is
    reproducible). A folder without ground truth is an error: the panel learns from it.
    """
    from training.data.mimic import GROUND_TRUTH, MimicCXRDataset

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"simulated data folder not found: {root}")
    if not (root / GROUND_TRUTH).is_file():
        raise FileNotFoundError(f"{root / GROUND_TRUTH} not found: the panel trains on simulator ground truth "
                                f"(cxrgen simulate --seed 2 --out {root})")
    ds = MimicCXRDataset(root=root, split=split, size=size, normalize="none", return_ground_truth=True,
                         prompt_sections=("impression", "findings") if prompts else ())
    n = len(ds) if limit <= 0 else min(limit, len(ds))
    images, rows, ids, texts = [], [], [], []
    for i in range(n):
        s = ds[i]
        images.append((s["image"] * 255).round().to(torch.uint8))
        rows.append(s["ground_truth"])
        ids.append(s["dicom_id"])
        texts.append(s["prompt"])
    t = [targets(r.get("findings", [])) for r in rows]
    return SimSplit(
        images=torch.stack(images), presence=torch.stack([x["presence"] for x in t]),
        side=torch.stack([x["side"] for x in t]), side_mask=torch.stack([x["side_mask"] for x in t]),
        severity=torch.stack([x["severity"] for x in t]),
        pose=torch.stack([pose_vector(r, d) for r, d in zip(rows, ids)]),
        findings=[[Finding.from_record(f) for f in r.get("findings", [])] for r in rows], ids=ids, prompts=texts,
    )


# --------------------------------------------------------------------------- generated images


@dataclasses.dataclass(frozen=True)
class GeneratedImage:
    """One image of a generated folder and what it was generated from."""

    path: Path
    prompt: str
    findings: tuple[dict, ...]  # finding dicts as recorded (may be empty)
    seed: int
    sampler: dict  # steps, guidance_scale, scheduler, negative_prompt, height, width, model_path
    model_version: str


SAMPLER_KEYS = ("steps", "guidance_scale", "scheduler", "negative_prompt", "height", "width", "model_path")


def image_files(folder: str | Path) -> list[Path]:
    """The PNG / JPEG files of a folder, sorted by name; errors for a missing or empty folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"generated image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                   and p.name not in CONTACT_SHEETS)
    if not files:
        raise ValueError(f"{folder} holds no .png / .jpg images")
    return files


def read_generated(folder: str | Path) -> list[GeneratedImage]:
    """Every image of a ``cxrgen generate`` folder with its prompt, findings, seed and sampler.

    The record comes from ``generation.jsonl`` or else from the PNG's provenance; an image with
    neither is an error naming it (the panel cannot check an image against an unknown prompt).
    """
    from training.generation import read_generation_log
    from training.provenance import read_png_provenance

    folder = Path(folder)
    files, records = image_files(folder), read_generation_log(folder)
    out = []
    for path in files:
        rec = records.get(path.name)
        if rec is None:
            try:
                rec = read_png_provenance(path).to_dict()
            except ValueError as e:
                raise ValueError(f"{path}: no record in {folder / 'generation.jsonl'} and no provenance ({e})") \
                    from None
        out.append(GeneratedImage(
            path=path, prompt=str(rec.get("prompt", "")), findings=tuple(rec.get("findings") or ()),
            seed=int(rec.get("seed", 0)), sampler={k: rec[k] for k in SAMPLER_KEYS if k in rec},
            model_version=str(rec.get("model_version", "unknown")),
        ))
    return out


def load_images(paths: Sequence[str | Path], size: int) -> torch.Tensor:
    """Image files as (N, 1, size, size) float in [-1, 1]."""
    if not paths:
        return torch.zeros((0, 1, size, size))
    return torch.stack([read_image(p, size) for p in paths])


def stable_fraction(name: str) -> float:
    """A number in [0, 1) fixed by a string: held-out splits that do not move when files are added."""
    import hashlib

    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") / 2 ** 64
