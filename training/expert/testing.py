"""Tiny, fast stand-ins for the panel's tests: cartoon chest films with planted findings.

``write_fake_dataset`` writes a MIMIC-layout data set (the simulator's own table writer, so the
loader reads it as it reads ``cxrgen simulate`` output) whose films are drawn in a few
milliseconds: two dark lung fields, a mediastinum, a heart left of the spine, diaphragm domes,
and the findings of the ground truth planted where a reader would look for them (an effusion
fills the bottom of its lung, a pneumothorax darkens its lung's edge, cardiomegaly widens the
heart, ...). Pose rotates and shifts the drawing. ``write_fake_generated`` writes a
``cxrgen generate``-style folder (PNG with provenance + generation.jsonl) of softened cartoons.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np

from training.findings import OBSERVATIONS, Finding, labels

SEV = {"small": 0, "moderate": 1, "large": 2, None: 1}


def _ellipse(xx, yy, cx, cy, rx, ry):
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0


def draw_film(findings: list[Finding], pose: dict, size: int, rng: random.Random) -> np.ndarray:
    """A cartoon frontal chest film in [0, 1] (bright = dense; patient's left on image right)."""
    t = math.radians(pose.get("roll_deg", 0.0) * 3)  # exaggerated, so a tiny reader can see it
    lin = np.linspace(-1, 1, size)
    x0, y0 = np.meshgrid(lin, lin)
    xx = math.cos(t) * x0 - math.sin(t) * y0 - pose.get("shift_x_mm", 0.0) / 120
    yy = math.sin(t) * x0 + math.cos(t) * y0
    sev = {f.kind: SEV[f.severity.value if f.severity else None] for f in findings}
    img = np.full((size, size), 0.78)
    img[np.abs(xx) > 0.88] = 0.12
    lungs = {s: _ellipse(xx, yy, c, -0.15, 0.3, 0.55) for s, c in (("right", -0.45), ("left", 0.45))}
    for s, m in lungs.items():
        img[m] = 0.22 + (0.08 * (1 + sev["edema"]) if "edema" in sev else 0.0)
    heart = 1.0 + (0.25 * (1 + sev["cardiomegaly"]) if "cardiomegaly" in sev else 0.0)
    img[_ellipse(xx, yy, 0.12, 0.25, 0.22 * heart, 0.2)] = 0.62
    img[yy > 0.48 + 0.1 * np.abs(xx)] = 0.85  # diaphragm domes and abdomen
    for f in findings:
        side = f.side.value if f.side else "left"
        sides = ("left", "right") if side == "bilateral" else (side,)
        for s in sides:
            cx = 0.45 if s == "left" else -0.45
            _plant(img, f.kind, sev.get(f.kind, 1), lungs[s], xx, yy, cx, s)
    img += np.array([rng.gauss(0, 0.02) for _ in range(size * size)]).reshape(size, size)
    return np.clip(img, 0, 1)


def _plant(img, kind, sev, lung, xx, yy, cx, side) -> None:
    if kind == "pleural_effusion":
        img[lung & (yy > 0.35 - 0.2 * sev)] = 0.7
    elif kind == "pneumothorax":
        img[lung & (np.abs(xx) > 0.62 - 0.08 * sev)] = 0.03
    elif kind == "atelectasis":
        img[lung & (yy > 0.1) & (np.abs(xx - cx) < 0.1 + 0.05 * sev)] = 0.55
    elif kind in ("nodule", "mass", "calcified_granuloma", "consolidation", "pneumonia"):
        r, v = {"nodule": (0.07, 0.6), "mass": (0.15, 0.65), "calcified_granuloma": (0.05, 0.95),
                "consolidation": (0.22, 0.5), "pneumonia": (0.22, 0.55)}[kind]
        img[lung & _ellipse(xx, yy, cx, -0.2, r, r)] = v
    elif kind == "endotracheal_tube":
        img[(np.abs(xx) < 0.03) & (yy < -0.3)] = 1.0
    elif kind == "central_line":
        img[(np.abs(yy + 0.75 + 0.3 * xx * (1 if side == "left" else -1)) < 0.03) & (np.abs(xx) < 0.6)] = 1.0


def _row(index: int, seed: int, size: int, findings: list[Finding], pose: dict) -> dict:
    from training.simulator.dataset import ids, split_of

    subject, study, dicom = ids(seed, index)
    return {"index": index, "dicom_id": dicom, "subject_id": subject, "study_id": study, "seed": seed,
            "split": split_of(seed, index), "view": "PA", "size": size, "findings": [f.to_dict() for f in findings],
            "labels": labels(findings), "pose": pose, "prompt": "; ".join(f.describe() for f in findings)}


def write_fake_dataset(root: str | Path, n: int = 48, size: int = 64, seed: int = 2) -> Path:
    """A MIMIC-layout data set of ``n`` cartoon films with ground truth (and simulate_config.json)."""
    import dataclasses

    from PIL import Image

    from training.simulator.dataset import image_path, write_tables
    from training.simulator.sampler import case_rng, sample_findings, sample_pose

    root = Path(root)
    rows = []
    for i in range(n):
        rng = case_rng(seed, i)
        findings = list(sample_findings(rng))
        findings = [Finding(f.kind, f.side or ("left" if f.kind in ("pleural_effusion", "pneumothorax",
                                                                      "atelectasis", "central_line") else None),
                            f.severity, f.lobe) for f in findings]
        pose = dataclasses.asdict(sample_pose(rng))
        row = _row(i, seed, size, findings, pose)
        path = image_path(root, row["subject_id"], row["study_id"], row["dicom_id"])
        path.parent.mkdir(parents=True, exist_ok=True)
        film = draw_film(findings, pose, size, rng)
        Image.fromarray((film * 255).round().astype(np.uint8), mode="L").save(path, quality=95)
        report = row["prompt"] or "Normal chest."
        path.parent.with_suffix(".txt").write_text(f" FINAL REPORT\n IMPRESSION:\n {report}\n")
        rows.append(row)
    write_tables(root, rows)
    (root / "simulate_config.json").write_text(json.dumps({"seed": seed, "n": n, "size": size, "fake": True}))
    assert all(o in rows[0]["labels"] for o in OBSERVATIONS)
    return root


def write_fake_generated(folder: str | Path, prompts: list[list[Finding]], n: int = 2, size: int = 64,
                         seed: int = 0, model_version: str = "fake-v0", blur: float = 1.0) -> Path:
    """A ``cxrgen generate``-style folder: ``n`` softened cartoon films per prompt, PNG provenance and
    generation.jsonl (findings recorded, prompts written from them)."""
    from PIL import Image, ImageFilter

    from training.provenance import Provenance, save_png

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines, i = [], 0
    for findings in prompts:
        text = ". ".join(f.describe().capitalize() for f in findings) or "No acute cardiopulmonary process."
        for _ in range(n):
            rng = random.Random(seed * 100_003 + i)
            pose = {"roll_deg": rng.gauss(0, 1.5), "shift_x_mm": rng.uniform(-12, 12)}
            film = draw_film(findings, pose, size, rng)
            im = Image.fromarray((film * 255).round().astype(np.uint8), mode="L").filter(ImageFilter.GaussianBlur(blur))
            prov = Provenance(model_version=model_version, model_path="fake", seed=seed + i, prompt=text, steps=10,
                              guidance_scale=4.0, scheduler="ddim", height=size, width=size,
                              findings=[f.to_dict() for f in findings])
            path = save_png(np.asarray(im), folder / f"{i:04d}_seed{seed + i}.png", prov)
            lines.append(json.dumps({"file": path.name, **prov.to_dict()}))
            i += 1
    (folder / "generation.jsonl").write_text("\n".join(lines) + "\n")
    return folder
