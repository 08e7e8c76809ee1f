"""Augmentation batches (issue 9): many synthetic CXRs for a classifier, in MIMIC-CXR-JPG layout.

A batch is planned from a label distribution (finding kind -> weight, ``no_finding`` for normal
studies) or a list of prompts, with a seed, so the same request gives the same prompts and images.
With a minimum plausibility score, images below it are rejected and more are drawn (reward-based
rejection sampling); the acceptance rate is reported. The output folder is what ``cxrgen simulate``
writes and ``training.data.mimic.MimicCXRDataset`` reads (images, reports, the three CSV tables,
``ground_truth.jsonl``), plus ``manifest.json`` (prompts, seeds, scores of every kept image and the
counts of the sampling). ``pack`` makes the ``.tar.gz`` the service hands out.

The service runs this as a BentoML task; the same ``run`` is callable without a server.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import tarfile
import textwrap
from pathlib import Path
from typing import Callable

NO_FINDING = "no_finding"
MAX_ATTEMPTS_FACTOR = 10  # rejection sampling gives up after drawing this many times the wanted count


@dataclasses.dataclass
class AugmentSpec:
    """One augmentation batch; every field is checked by ``validate``."""

    count: int  # images to deliver (1-10,000)
    seed: int = 0  # image attempt i is drawn with seed + i; prompts are drawn from Random(seed)
    labels: dict[str, float] | None = None  # finding kind (or "no_finding") -> weight; normalised
    prompts: list[str] | None = None  # or: cycle through these prompts (findings read from the text)
    min_plausibility: float | None = None  # reject images whose plausibility score is below this
    steps: int = 25  # sampling steps
    guidance: float = 4.0  # classifier-free guidance scale
    scheduler: str = "ddim"  # sampler name (training.generation.SCHEDULERS)
    size: int | None = None  # image side (None: the model's)

    def validate(self) -> "AugmentSpec":
        from .findings import KINDS

        if not 1 <= self.count <= 10_000:
            raise ValueError(f"count must be in [1, 10000], got {self.count}")
        if (self.labels is None) == (self.prompts is None):
            raise ValueError("give exactly one of labels (a label distribution) or prompts (a prompt list)")
        if self.labels is not None:
            unknown = sorted(set(self.labels) - set(KINDS) - {NO_FINDING})
            if unknown:
                raise ValueError(f"labels: unknown finding kind(s) {unknown}; known: {sorted(KINDS) + [NO_FINDING]}")
            if any(w < 0 for w in self.labels.values()) or sum(self.labels.values()) <= 0:
                raise ValueError("labels: weights must be >= 0 with a positive sum")
        if self.prompts is not None and not [p for p in self.prompts if p.strip()]:
            raise ValueError("prompts: give at least one non-empty prompt")
        if self.min_plausibility is not None and not 0 <= self.min_plausibility <= 1:
            raise ValueError(f"min_plausibility must be in [0, 1], got {self.min_plausibility}")
        return self


def plan(spec: AugmentSpec, n: int) -> list[tuple[str, list]]:
    """(prompt, findings) for attempts 0..n-1, deterministic in ``spec.seed``."""
    from .data.reports import findings_from_text
    from .generation import findings_prompt
    from .simulator.sheet import variant

    rng = random.Random(spec.seed)
    if spec.prompts is not None:
        prompts = [p.strip() for p in spec.prompts if p.strip()]
        return [(prompts[i % len(prompts)], findings_from_text(prompts[i % len(prompts)])) for i in range(n)]
    kinds = sorted(spec.labels)
    weights = [spec.labels[k] for k in kinds]
    out = []
    for i in range(n):
        kind = rng.choices(kinds, weights)[0]
        found = [] if kind == NO_FINDING else list(variant(kind, rng.randrange(12)))
        out.append((findings_prompt(found, spec.seed + i), found))
    return out


def report(prompt: str, view: str = "PA") -> str:
    """A MIMIC-style report whose impression is the prompt (the loader's default prompt section)."""
    exam = "CHEST (PA AND LAT)" if view == "PA" else "CHEST (PORTABLE AP)"
    parts = ["FINAL REPORT", f"EXAMINATION:  {exam}", "INDICATION:  Synthetic image (cxrgen augment).",
             "IMPRESSION:\n" + textwrap.fill(prompt, 78)]
    return "\n \n".join(" " + p.replace("\n", "\n ") for p in parts) + "\n"


def write_image(root: Path, index: int, seed: int, image, prompt: str, findings: list, scores: dict) -> dict:
    """Write image ``index`` (a (H, W) array in [0, 1]) and its report; return its ground-truth row."""
    from PIL import Image

    from .findings import labels
    from .simulator.dataset import ids, image_path

    subject, study, dicom = ids(seed, index)
    path = image_path(root, subject, study, dicom)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.jpg")
    Image.fromarray((image * 255).round().clip(0, 255).astype("uint8"), mode="L").save(tmp, quality=95)
    os.replace(tmp, path)
    path.parent.with_suffix(".txt").write_text(report(prompt))
    size = int(image.shape[-1])
    return {"index": index, "dicom_id": dicom, "subject_id": subject, "study_id": study, "seed": seed,
            "split": "train", "view": "PA", "size": size, "findings": [f.to_dict() for f in findings],
            "labels": labels(findings), "prompt": prompt, "scores": scores, "synthetic": True}


def run(spec: AugmentSpec, out: str | Path, sample: Callable, progress: Callable[[int, int], None] | None = None,
        chunk: int = 8, model_version: str = "") -> dict:
    """Generate ``spec.count`` accepted images into ``out``; returns the manifest (also written).

    ``sample(prompts, findings, seeds) -> (images (N, H, W) in [0, 1], scores [dict per image])`` does
    the sampling (the service passes its batcher, so jobs share the GPU with online requests);
    ``progress(accepted, sampled)`` is called after every chunk.
    """
    from .simulator.dataset import write_tables

    spec.validate()
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    budget = spec.count * (MAX_ATTEMPTS_FACTOR if spec.min_plausibility is not None else 1)
    planned = plan(spec, budget)
    rows, sampled = [], 0
    while len(rows) < spec.count and sampled < budget:
        take = min(chunk, budget - sampled) if spec.min_plausibility is not None else min(chunk, spec.count - len(rows))
        batch = planned[sampled:sampled + take]
        seeds = [spec.seed + sampled + i for i in range(take)]
        images, scores = sample([p for p, _ in batch], [[f.to_dict() for f in fs] for _, fs in batch], seeds)
        for (prompt, found), seed, img, sc in zip(batch, seeds, images, scores):
            ok = spec.min_plausibility is None or sc.get("plausibility", 0.0) >= spec.min_plausibility
            if ok and len(rows) < spec.count:
                rows.append(write_image(root, len(rows), seed, img, prompt, list(found), sc))
        sampled += take
        if progress:
            progress(len(rows), sampled)
    if not rows:
        raise RuntimeError(f"no image reached min_plausibility {spec.min_plausibility} in {sampled} draws")
    write_tables(root, rows)
    manifest = {"spec": dataclasses.asdict(spec), "model_version": model_version, "requested": spec.count,
                "accepted": len(rows), "sampled": sampled, "acceptance_rate": round(len(rows) / sampled, 4),
                "complete": len(rows) == spec.count,
                "images": [{"dicom_id": r["dicom_id"], "prompt": r["prompt"], "seed": r["seed"],
                            "findings": r["findings"], "scores": r["scores"]} for r in rows]}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def pack(folder: str | Path, archive: str | Path) -> Path:
    """``folder`` as a .tar.gz whose top-level entry is the folder's name; written atomically."""
    folder, archive = Path(folder), Path(archive)
    tmp = archive.with_name(archive.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    os.replace(tmp, archive)
    return archive


def unpack(archive: str | Path, dest: str | Path) -> Path:
    """Extract an archive made by ``pack`` (safely: no absolute paths or ``..``); returns the data root."""
    dest = Path(dest)
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(dest, filter="data")
        top = {Path(m.name).parts[0] for m in tar.getmembers()}
    if len(top) != 1:
        raise ValueError(f"{archive}: expected one top-level folder, found {sorted(top)}")
    return dest / top.pop()

