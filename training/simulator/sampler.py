"""What to simulate: a report (real where one fits) and the exam it describes.

Every image is a pure function of (seed, index): its own ``random.Random`` is seeded
from both, so workers can render in any order, a re-run reproduces each image, and a
data set can be extended by raising ``n``.

Two routes to a case (issue 2, section 3, "Text"):
  * real: sample a usable IU report; its MeSH terms become the findings, the image is
    rendered to agree, and its impression + findings are the prompt;
  * balanced: sample a finding set with every kind equally likely (the IU reports
    are 35 % normal and have only a few dozen pneumothoraces or tubes), then use a
    real report with exactly those findings if one exists, else compose a clinically
    worded one.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import random

from ..data import reports as iu
from ..findings import KINDS, LOBES, Finding
from .projector import Geometry, Pose
from .render import Case, Imaging


@dataclasses.dataclass(frozen=True)
class SampledCase:
    case: Case
    findings_text: str
    impression_text: str
    indication: str
    report_source: str  # IU report uid ("CXR207") or "composed"


def case_rng(seed: int, index: int) -> random.Random:
    digest = hashlib.sha256(f"cxrgen-simulate:{seed}:{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


@functools.lru_cache(maxsize=1)
def _report_pool() -> tuple[tuple, tuple, iu.ReportIndex]:
    """Usable IU reports split into normal and abnormal (85 % of usable ones are normal)."""
    usable = tuple(r for r in iu.load_reports() if r.usable)
    normal = tuple(r for r in usable if not r.findings_list)
    abnormal = tuple(r for r in usable if r.findings_list)
    return normal, abnormal, iu.ReportIndex(usable)


def sample_findings(rng: random.Random) -> tuple[Finding, ...]:
    """A balanced finding set: 0-3 distinct kinds, attributes left to ``render.complete``."""
    n = rng.choices([0, 1, 2, 3], weights=[0.15, 0.55, 0.25, 0.05])[0]
    kinds = rng.sample(sorted(KINDS), n)
    # Same-lobe consolidation + pneumonia, or nodule + mass, would be one finding said twice.
    if "pneumonia" in kinds and "consolidation" in kinds:
        kinds.remove("consolidation")
    out = []
    for k in kinds:
        spec = KINDS[k]
        side = sev = lobe = None
        if spec.lobar:
            lobe = rng.choice(sorted(LOBES))
        elif spec.sided:
            side = rng.choice(["left", "right"] if k in ("pneumothorax", "central_line") else ["left", "right", "bilateral"])
        if spec.graded:
            sev = rng.choice(["small", "moderate", "large"])
        out.append(Finding(k, side, sev, lobe))
    return tuple(out)


def sample_pose(rng: random.Random) -> Pose:
    """Patient-to-patient and exam-to-exam variation of position and shape."""
    return Pose(
        roll_deg=rng.gauss(0, 1.5), yaw_deg=rng.gauss(0, 2.5), pitch_deg=rng.gauss(0, 2.5),
        shift_x_mm=rng.uniform(-12, 12), shift_z_mm=rng.uniform(-12, 12),
        inspiration=rng.uniform(1.15, 1.45), width_scale=rng.uniform(0.92, 1.08),
    )


def sample_imaging(rng: random.Random) -> Imaging:
    return Imaging(
        bone=rng.uniform(0.4, 0.9), photons=math.exp(rng.uniform(math.log(1.5e4), math.log(1e5))),
        scatter=rng.uniform(0.08, 0.25), blur_mm=rng.uniform(0.5, 1.2), unsharp=rng.uniform(0.8, 1.5),
        exposure=rng.uniform(-0.12, 0.12), contrast=rng.uniform(0.85, 1.2),
        elastic_mm=rng.uniform(0.0, 6.0), elastic_seed=rng.getrandbits(31),
    )


def sample_case(seed: int, index: int, real_fraction: float = 0.5) -> SampledCase:
    rng = case_rng(seed, index)
    normal, abnormal, index_ = _report_pool()
    report = None
    if rng.random() < real_fraction:
        report = rng.choice(normal if rng.random() < 0.3 else abnormal)
        findings = tuple(report.findings_list)
    else:
        findings = sample_findings(rng)
        report = index_.match(findings, rng)
    if report is not None:
        texts = (report.findings, report.impression, report.indication, report.uid)
    else:
        f_text, i_text = iu.compose_report(findings, rng)
        texts = (f_text, i_text, "", "composed")
    # Portable AP films are where lines and tubes are: ICU patients.
    devices = any(f.kind in ("endotracheal_tube", "central_line") for f in findings)
    view = "AP" if rng.random() < (0.8 if devices else 0.25) else "PA"
    case = Case(findings, Geometry(view=view), sample_pose(rng), sample_imaging(rng), seed=rng.getrandbits(31))
    return SampledCase(case, *texts)
