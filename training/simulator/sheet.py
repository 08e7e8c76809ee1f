"""Contact sheet: one row per finding, columns vary side / severity / lobe, view and pose.

The first column of every row is a canonical PA exam so rows compare at a glance;
the others draw pose, exposure and view the way the data set does.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..findings import KINDS, LOBES, Finding
from .anatomy import load_anatomy
from .projector import Geometry, Pose
from .render import Case, Imaging, render_case
from .sampler import case_rng, sample_imaging, sample_pose

SIDES = ("left", "right", "bilateral")
SEVERITIES = ("small", "moderate", "large")


def variant(kind: str | None, j: int) -> tuple[Finding, ...]:
    """The j-th variation of a finding: cycles severity, side and lobe."""
    if kind is None:
        return ()
    spec = KINDS[kind]
    side = sev = lobe = None
    if spec.lobar:
        lobe = sorted(LOBES)[j % len(LOBES)]
    elif spec.sided:
        side = ("right", "left")[j % 2] if kind in ("pneumothorax", "central_line") else SIDES[j % 3]
    if spec.graded:
        sev = SEVERITIES[(j + 2) % 3]
    return (Finding(kind, side, sev, lobe),)


def sheet_cases(seed: int, columns: int) -> list[tuple[str, list[tuple[Case, str]]]]:
    rows = []
    for r, kind in enumerate([None, *KINDS]):
        cells = []
        for j in range(columns):
            rng = case_rng(seed + 104729, r * 100 + j)
            findings = variant(kind, j)
            if j == 0:
                geom, pose, im = Geometry("PA"), Pose(inspiration=1.3), Imaging()
            else:
                geom = Geometry("AP" if j % 3 == 2 else "PA")
                pose, im = sample_pose(rng), sample_imaging(rng)
            label = ", ".join(f.describe() for f in findings) or "no finding"
            cells.append((Case(findings, geom, pose, im, seed=rng.getrandbits(31)), f"{geom.view}: {label}"))
        rows.append((kind or "no finding", cells))
    return rows


def contact_sheet(path: Path, seed: int = 0, size: int = 192, columns: int = 5) -> Path:
    """Render the sheet to ``path`` (PNG) and return it."""
    from PIL import Image, ImageDraw, ImageFont

    anat = load_anatomy()
    rows = sheet_cases(seed, columns)
    head, strip = 130, 16
    sheet = Image.new("L", (head + columns * size, len(rows) * (size + strip)), color=255)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=11)
    for r, (name, cells) in enumerate(rows):
        y = r * (size + strip)
        draw.text((6, y + size // 2), name.replace("_", " "), fill=0, font=font)
        for c, (case, label) in enumerate(cells):
            img, _ = render_case(anat, case, size)
            tile = Image.fromarray((img * 255).round().byte().numpy(), mode="L")
            sheet.paste(tile, (head + c * size, y + strip))
            draw.text((head + c * size + 3, y + 2), label[:34], fill=0, font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
