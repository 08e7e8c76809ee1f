"""Simulated raters: thresholds on the panel's evidence, plus deterministic label noise.

A rater (``RaterProfile``) has one threshold per criterion (a normal score against real films:
2.33 fails ~1 % of real films on that criterion, 3.0 ~0.1 %), a label-noise rate and a tie
margin. Raters differ in strictness, so the panel disagrees as real panels do: systematically (a
strict consultant fails what a junior passes) and at random (noise).

Rating one image (``rate``):
  1. each prompted finding is checked: not visible -> ``finding_absent``; visible but on the wrong
     side -> ``wrong_side``; of the wrong grade -> ``wrong_size`` (side and grade are judged only
     on a finding the rater sees, as a radiologist would);
  2. image-level criteria: ``unprompted_finding``, ``anatomy``, ``posture``, ``artefact``;
  3. label noise: with probability ``noise`` the verdict flips: a plausible film is failed on its
     nearest miss (the criterion closest to the rater's threshold), an implausible one is passed.
     The draw is a pure function of (seed, rater id, generation key), so ratings are reproducible;
  4. score 1-5 and a short comment naming the failures.

Comparing two generations of one prompt (``compare``): each rater prefers the one of higher
continuous quality (minus the sum of evidence / threshold over criteria, clipped), a tie within
the rater's margin; the preference flips with the same noise rate.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from typing import Mapping, Sequence

from .config import CRITERIA
from .panel import KIND_PHRASES, Assessment
from .anatomy import FEATURES

RATIO_CAP = 5.0  # evidence / threshold beyond this adds nothing to a comparison (garbage is garbage)
PREFERENCES = ("a", "b", "tie")


@dataclasses.dataclass(frozen=True)
class RaterProfile:
    """One simulated reader."""

    id: str  # rater id in the store
    role: str  # e.g. "simulated radiologist"
    qualification: str  # free text shown with the rater
    thresholds: Mapping[str, float]  # criterion -> fail above this evidence (normal score against real films)
    noise: float  # label-noise rate: share of verdicts / preferences flipped
    tie_margin: float = 0.2  # |quality difference| within which two images tie

    def __post_init__(self) -> None:
        if not self.id or not isinstance(self.id, str):
            raise ValueError(f"rater id must be a non-empty string, got {self.id!r}")
        missing = [c for c in CRITERIA if c not in self.thresholds]
        unknown = [c for c in self.thresholds if c not in CRITERIA]
        if missing or unknown:
            raise ValueError(f"rater {self.id}: thresholds must name every criterion of {list(CRITERIA)}; "
                             f"missing {missing}, unknown {unknown}")
        bad = {c: v for c, v in self.thresholds.items() if not float(v) > 0}
        if bad:
            raise ValueError(f"rater {self.id}: thresholds must be > 0, got {bad}")
        if not 0.0 <= self.noise <= 0.5 or self.tie_margin < 0:
            raise ValueError(f"rater {self.id}: need 0 <= noise <= 0.5 and tie_margin >= 0, got "
                             f"{self.noise}, {self.tie_margin}")
        object.__setattr__(self, "thresholds", {c: float(self.thresholds[c]) for c in CRITERIA})

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "thresholds": dict(self.thresholds)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "RaterProfile":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def _t(absent, side, size, unprompted, anatomy, posture, artefact) -> dict[str, float]:
    return dict(zip(CRITERIA, (absent, side, size, unprompted, anatomy, posture, artefact)))


# The default panel: five readers of different training and temperament. Thresholds are normal
# scores against real films (2.2 fails ~1.4 % of real films on that criterion, 2.6 ~0.5 %,
# 3.2 ~0.07 %); the order is finding_absent, wrong_side, wrong_size, unprompted_finding, anatomy,
# posture, artefact.
DEFAULT_RATERS: tuple[RaterProfile, ...] = (
    RaterProfile("sim-thoracic-consultant", "simulated radiologist",
                 "Simulated consultant thoracic radiologist, 20 years: strict on findings and laterality.",
                 _t(2.2, 2.2, 2.6, 2.5, 2.8, 2.8, 2.6), noise=0.05, tie_margin=0.15),
    RaterProfile("sim-general-radiologist", "simulated radiologist",
                 "Simulated general radiologist, 10 years: even-handed.",
                 _t(2.6, 2.6, 2.8, 2.8, 2.8, 2.8, 2.8), noise=0.08, tie_margin=0.2),
    RaterProfile("sim-senior-resident", "simulated resident",
                 "Simulated radiology resident, year 4: strict on artefacts and anatomy, lenient on grading.",
                 _t(2.5, 2.5, 3.2, 2.8, 2.4, 2.8, 2.3), noise=0.12, tie_margin=0.25),
    RaterProfile("sim-junior-resident", "simulated resident",
                 "Simulated radiology resident, year 1: lenient and inconsistent.",
                 _t(3.0, 3.0, 3.5, 3.2, 3.2, 3.2, 3.2), noise=0.18, tie_margin=0.3),
    RaterProfile("sim-reporting-radiographer", "simulated radiographer",
                 "Simulated reporting radiographer: strict on positioning and artefacts, lenient on grading.",
                 _t(2.8, 2.5, 3.5, 3.0, 2.6, 2.2, 2.3), noise=0.10, tie_margin=0.2),
)


def select_raters(ids: Sequence[str] | None = None, raters: Sequence[RaterProfile] = DEFAULT_RATERS) \
        -> tuple[RaterProfile, ...]:
    """The raters named by ``ids`` (all when None); an unknown id is an error listing the known ones."""
    if not ids:
        return tuple(raters)
    known = {r.id: r for r in raters}
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise ValueError(f"unknown rater id(s) {unknown}; known: {list(known)}")
    return tuple(known[i] for i in dict.fromkeys(ids))


@dataclasses.dataclass(frozen=True)
class Rating:
    """One rater's verdict on one image (what goes to the store, plus whether noise flipped it)."""

    rater_id: str
    plausible: bool
    failed: tuple[str, ...]  # in CRITERIA order
    score: int  # 1-5
    comment: str
    flipped: bool  # the label noise changed the verdict (not stored: a real reader's noise is unknown)


def rng_for(seed: int, rater_id: str, key: str) -> random.Random:
    """The rater's private random stream for one item: fixed by (seed, rater, item key)."""
    digest = hashlib.sha256(f"cxrgen-panel:{seed}:{rater_id}:{key}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def _checks(r: RaterProfile, a: Assessment) -> list[tuple[str, float, str]]:
    """(criterion, evidence / threshold, what) for every check the rater makes on ``a``."""
    th, out = r.thresholds, []
    for fe in a.findings:
        what = fe.finding.describe()
        absent = fe.absent / th["finding_absent"]
        out.append(("finding_absent", absent, what))
        seen = absent <= 1.0
        if fe.side is not None:  # an unseen finding has no side to judge: count it as a borderline miss
            out.append(("wrong_side", fe.side / th["wrong_side"] if seen else 1.0, what))
        if fe.size is not None:
            out.append(("wrong_size", fe.size / th["wrong_size"] if seen else 1.0, what))
    if a.unprompted_kind is not None:
        out.append(("unprompted_finding", a.unprompted / th["unprompted_finding"], KIND_PHRASES[a.unprompted_kind]))
    out.append(("anatomy", a.anatomy / th["anatomy"], FEATURES[a.anatomy_feature] + " atypical"))
    out.append(("posture", a.posture / th["posture"], f"rotated {a.posture_deg:.0f} deg"))
    out.append(("artefact", a.artefact / th["artefact"], "looks processed or artificial"))
    return out


def _failures(checks: list[tuple[str, float, str]]) -> dict[str, list[str]]:
    failed: dict[str, list[str]] = {}
    seen_absent = {what for c, ratio, what in checks if c == "finding_absent" and ratio > 1.0}
    for c, ratio, what in checks:
        if ratio > 1.0 and not (c in ("wrong_side", "wrong_size") and what in seen_absent):
            failed.setdefault(c, []).append(what)
    return failed


def rate(r: RaterProfile, a: Assessment, seed: int, key: str) -> Rating:
    """``r``'s rating of the image assessed as ``a``; ``key`` identifies the image (noise stream)."""
    checks = _checks(r, a)
    failed = _failures(checks)
    flipped = rng_for(seed, r.id, "rate:" + key).random() < r.noise
    if flipped and failed:
        failed = {}  # a miss: the rater passes a film it should have failed
    elif flipped:
        c, _, what = max(checks, key=lambda t: t[1])  # over-calls the nearest miss
        failed = {c: [f"borderline: {what}"]}
    worst = max((t[1] for t in checks), default=0.0)
    if not failed:
        score = 5 if worst < 0.6 else 4
        comment = "Plausible." if worst < 0.6 else "Plausible, borderline in places."
    else:
        score = max(1, 4 - len(failed))
        comment = "Not plausible: " + "; ".join(
            f"{c.replace('_', ' ')} ({', '.join(dict.fromkeys(failed[c]))})" for c in CRITERIA if c in failed) + "."
    return Rating(r.id, not failed, tuple(c for c in CRITERIA if c in failed), score, comment, flipped)


def quality(r: RaterProfile, a: Assessment) -> float:
    """``r``'s continuous impression of an image: minus the sum of clipped evidence / threshold."""
    return -sum(min(max(ratio, 0.0), RATIO_CAP) for _, ratio, _ in _checks(r, a))


def compare(r: RaterProfile, a: Assessment, b: Assessment, seed: int, key: str) -> str:
    """"a", "b" or "tie": which of two images of one prompt ``r`` prefers (noise flips it)."""
    d = quality(r, a) - quality(r, b)
    pref = "a" if d > r.tie_margin else "b" if d < -r.tie_margin else "tie"
    rng = rng_for(seed, r.id, "compare:" + key)
    if rng.random() < r.noise:
        pref = {"a": "b", "b": "a"}.get(pref) or rng.choice("ab")
    return pref
