"""``cxrgen expert report``: how plausible the panel finds real and generated films, and how it agrees.

Real simulated films (a split of ``--data``) are rated in memory by the same raters and never
stored: they are the calibration check (issue 7 target: >= 90 % plausible). Generated films are
read from the store: the latest rating of each (generation, panel rater), per model version.

Plausibility rates are given two ways: ``majority`` (the panel's verdict, a film is plausible when
most raters say so; the headline) and ``ratings`` (the share of individual ratings that say
plausible, which label noise lowers by about the mean noise rate).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .agreement import comparison_agreement, fleiss_kappa, majority, majority_agreement, verdict_table
from .config import CRITERIA
from .raters import RaterProfile, Rating, rate

TARGET_REAL_PLAUSIBLE = 0.90


def summarise(votes: Mapping, failed: Sequence[Sequence[str]], raters: Sequence[str]) -> dict:
    """Rates, kappa, agreement with the majority and criterion shares of a set of rated items.

    ``votes``: item -> {rater: plausible}; ``failed``: the failed criteria of every rating.
    """
    ids = list(raters)
    verdicts = [majority(v[r] for r in ids if r in v) for v in votes.values()]
    decided = [m for m in verdicts if m is not None]
    flat = [p for v in votes.values() for p in v.values()]
    table = verdict_table(votes, ids)
    per_rater = {r: [v[r] for v in votes.values() if r in v] for r in ids}
    counts = Counter(c for f in failed for c in f)
    n = len(failed)
    return {
        "items": len(votes), "ratings": n,
        "plausible_rate_majority": float(np.mean(decided)) if decided else math.nan,
        "plausible_rate_ratings": float(np.mean(flat)) if flat else math.nan,
        "plausible_rate_by_rater": {r: float(np.mean(v)) if v else math.nan for r, v in per_rater.items()},
        "fleiss_kappa": fleiss_kappa(table) if len(table) and len(ids) >= 2 else math.nan,
        "agreement_with_majority": majority_agreement(votes, ids),
        "failed_share": {c: counts[c] / n if n else math.nan for c in CRITERIA},
    }


def rate_real(panel, raters: Sequence[RaterProfile], data: str | Path, split: str, n: int, seed: int) -> dict:
    """Rate ``n`` real simulated films of ``split`` in memory (ground-truth findings as the prompt)."""
    from .data import load_split

    films = load_split(data, split, panel.reader.size, limit=n)
    assessed = panel.assess(films.unit(), films.findings)
    votes, failed = {}, []
    for dicom, a in zip(films.ids, assessed):
        ratings: list[Rating] = [rate(r, a, seed, "real:" + dicom) for r in raters]
        votes[dicom] = {v.rater_id: v.plausible for v in ratings}
        failed += [v.failed for v in ratings]
    out = summarise(votes, failed, [r.id for r in raters])
    out.update({"data": str(data), "split": split})
    out["meets_target"] = bool(out["plausible_rate_majority"] >= TARGET_REAL_PLAUSIBLE)
    return out


def latest_ratings(store, rater_ids: Sequence[str]) -> dict[tuple[int, str], object]:
    """The latest rating of each (generation, rater) among ``rater_ids`` (a rater may re-rate)."""
    latest = {}
    for r in store.ratings():  # feed order: later ratings overwrite earlier ones
        if r.rater_id in rater_ids:
            latest[r.generation_id, r.rater_id] = r
    return latest


def stored(store, rater_ids: Sequence[str]) -> dict:
    """Generated films' ratings from the store, overall and per model version, and comparisons."""
    latest = latest_ratings(store, rater_ids)
    gens = {g.id: g for g in store.generations(sorted({g for g, _ in latest}))} if latest else {}
    groups: dict[str, tuple[dict, list]] = defaultdict(lambda: ({}, []))
    for (gid, rid), r in latest.items():
        for name in ("all", gens[gid].model_version):
            votes, failed = groups[name]
            votes.setdefault(gid, {})[rid] = r.plausible
            failed.append(r.failed)
    out = {"overall": summarise(*groups["all"], rater_ids) if "all" in groups else None,
           "by_model_version": {k: summarise(*v, rater_ids) for k, v in sorted(groups.items()) if k != "all"}}
    out["comparisons"] = comparisons(store, rater_ids)
    return out


def comparisons(store, rater_ids: Sequence[str]) -> dict:
    """Agreement on same-prompt comparisons (the ceiling a Bradley-Terry model can reach)."""
    prefs: dict[tuple[int, int], dict[str, str]] = defaultdict(dict)
    for c in store.comparisons():
        if c.rater_id not in rater_ids:
            continue
        a, b, p = c.generation_a, c.generation_b, c.preferred
        if a > b:  # one orientation per pair of images
            a, b, p = b, a, {"a": "b", "b": "a"}.get(p, p)
        prefs[a, b][c.rater_id] = p
    return comparison_agreement(prefs)


def build_report(panel, raters: Sequence[RaterProfile], store=None, data: str | Path | None = None,
                 split: str = "test", n: int = 200, seed: int = 0) -> dict:
    """The report dict: real films (when ``data``), stored generated films (when ``store``)."""
    if store is None and data is None:
        raise ValueError("nothing to report: give a store, --data for real films, or both")
    ids = [r.id for r in raters]
    out = {"panel_version": panel.version, "seed": seed, "raters": [r.to_dict() for r in raters],
           "target_real_plausible_rate": TARGET_REAL_PLAUSIBLE}
    if data is not None:
        out["real"] = rate_real(panel, raters, data, split, n, seed)
    if store is not None:
        out["generated"] = stored(store, ids)
    return out
