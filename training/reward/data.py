"""Training data of the rewards: simulated images in memory, and snapshots of the feedback store.

Two sources only (DESIGN.md, "three separate eyes"):

* simulator data (``cxrgen simulate --seed 3``: runs/sim-reward), read with
  ``MimicCXRDataset``: images, CheXpert labels, report prompts, ground-truth
  findings and poses;
* the feedback store, through its public API only: a ``read_after`` snapshot
  (generations, ratings, comparisons and the cursor they stop at, consistent
  with each other) and ``image(gid)``. Never the panel's internals.

Images are kept as uint8 (N, 1, S, S) tensors (5,000 images at 128 px: 80 MB) and
turned into float [-1, 1] per batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from training.findings import Finding

from .nets import prepare



def to_u8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8 (the 8-bit files' own precision)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_u8(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0


def parse_findings(items: Sequence[Any] | None) -> list[Finding]:
    """Finding dicts (ground truth carries extra keys such as ``params``: ignored) -> Findings."""
    return [Finding.from_record(d) for d in items or []]


def prompt_split(prompt: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """"train" / "val" / "test" from a hash of (seed, prompt): every image of a prompt lands in one split."""
    u = int.from_bytes(hashlib.sha256(f"{seed}\0{prompt}".encode()).digest()[:8], "big") / 2.0 ** 64
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


# ------------------------------------------------------------------------ simulator


@dataclasses.dataclass
class SimData:
    """A simulated (or real MIMIC-CXR-JPG) data set, in memory."""

    images: torch.Tensor  # (N, 1, S, S) uint8
    labels: torch.Tensor  # (N, 14) float, NaN = unknown
    mask: torch.Tensor  # (N, 14) bool, True where the label is known
    pose: torch.Tensor | None  # (N, 7) in training.evaluate.judge.POSE_KEYS order; None without ground truth
    prompts: list[str]
    findings: list[list[Finding]]
    splits: list[str]  # "train" / "validate" / "test" per image (the data set's own split file)

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, idx: Sequence[int]) -> "SimData":
        idx = list(idx)
        t = torch.tensor(idx, dtype=torch.long)
        return SimData(self.images[t], self.labels[t], self.mask[t], None if self.pose is None else self.pose[t],
                       [self.prompts[i] for i in idx], [self.findings[i] for i in idx], [self.splits[i] for i in idx])

    def split(self, name: str) -> "SimData":
        return self.subset([i for i, s in enumerate(self.splits) if s == name])


def load_sim(root: str | Path, size: int, max_train: int = 0, seed: int = 0, need_pose: bool = False) -> SimData:
    """Decode a MIMIC-layout data set at ``size`` px; ``max_train`` > 0 keeps a seeded subset of its train split."""
    from training.data.mimic import GROUND_TRUTH, MimicCXRDataset
    from training.evaluate.judge import pose_vector

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data set not found: {root} (make it with `cxrgen simulate --seed 3 --out {root}`)")
    has_gt = (root / GROUND_TRUTH).is_file()
    if need_pose and not has_gt:
        raise ValueError(f"{root} has no {GROUND_TRUTH}: posture needs simulator data with ground-truth poses")
    ds = MimicCXRDataset(root=root, size=size, normalize="unit", return_ground_truth=has_gt)
    splits = ds.frame["split"].astype(str).tolist()
    train = [i for i, s in enumerate(splits) if s == "train"]
    if max_train and max_train < len(train):
        keep = set(np.random.default_rng(seed).choice(train, size=max_train, replace=False).tolist())
        order = [i for i in range(len(ds)) if splits[i] != "train" or i in keep]
    else:
        order = list(range(len(ds)))
    images, labels, masks, poses, prompts, findings = [], [], [], [], [], []
    for i in order:
        s = ds[i]
        images.append(to_u8(s["image"]))
        labels.append(s["labels"])
        masks.append(s["label_mask"])
        prompts.append(s["prompt"])
        gt = s.get("ground_truth") or {}
        findings.append(parse_findings(gt.get("findings")))
        if has_gt:
            poses.append(pose_vector(gt, s["dicom_id"]))
    return SimData(torch.stack(images), torch.stack(labels), torch.stack(masks),
                   torch.stack(poses) if has_gt else None, prompts, findings, [splits[i] for i in order])


# ------------------------------------------------------------------------- the store


@dataclasses.dataclass
class StoreSnapshot:
    """Everything the store held up to ``cursor``, through its public API."""

    generations: dict[int, Any]  # id -> GenerationRecord
    ratings: list  # RatingRecord, in feed order
    comparisons: list  # ComparisonRecord, in feed order
    cursor: int  # the feed position this snapshot stops at (recorded in the manifest)
    url: str | None  # where it came from, password redacted

    def ratings_by_generation(self) -> dict[int, list]:
        out: dict[int, list] = defaultdict(list)
        for r in self.ratings:
            out[int(r.generation_id)].append(r)
        return dict(out)


def open_store(url: str = "", blobs: str = ""):
    """The feedback store at ``url`` ("" -> $CXRGEN_STORE or its default), through training.feedback.store.

    ``upgrade=False``: a training job reads; it never migrates a (possibly production) database.
    """
    from training.feedback import store as fs

    return fs.open_store(url or None, blobs or None, upgrade=False)


def store_url(store, url: str = "") -> str | None:
    from .base import redact_url

    return redact_url(url or str(getattr(store, "url", "") or "") or os.environ.get("CXRGEN_STORE") or None)


def read_snapshot(store, url: str = "", page: int = 10_000) -> StoreSnapshot:
    """Page through ``read_after`` from 0: generations, ratings and comparisons up to one cursor.

    The feed (not ``ratings()`` + ``cursor()`` called separately) is what makes the
    recorded cursor exact: a rating committed between two calls would otherwise be
    trained on yet lie beyond the cursor, or the reverse.
    """
    gens, ratings, comps, cursor = {}, [], [], 0
    while True:
        batch = store.read_after(cursor, limit=page)
        for ev in batch.events:
            if ev.kind == "generation":
                gens[int(ev.record.id)] = ev.record
            elif ev.kind == "rating":
                ratings.append(ev.record)
            elif ev.kind == "comparison":
                comps.append(ev.record)
        if not batch.events or batch.cursor <= cursor:
            break
        cursor = batch.cursor
    return StoreSnapshot(gens, ratings, comps, cursor, store_url(store, url))


def store_images(store, ids: Sequence[int], size: int) -> torch.Tensor:
    """The store's images of generations ``ids`` as uint8 (N, 1, size, size)."""
    out = []
    for gid in ids:
        arr = np.asarray(store.image(int(gid)))
        if arr.ndim != 2:
            raise ValueError(f"store image of generation {gid}: expected a 2-D grey image, got shape {arr.shape}")
        x = torch.from_numpy(arr.astype(np.float32) / (255.0 if arr.dtype == np.uint8 else 1.0))
        out.append(to_u8(prepare(x[None, None] * 2 - 1, size))[0])
    return torch.stack(out) if out else torch.zeros((0, 1, size, size), dtype=torch.uint8)


def record_findings(rec) -> list[Finding]:
    return parse_findings(getattr(rec, "findings", None))
