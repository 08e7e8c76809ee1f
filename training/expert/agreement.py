"""Agreement statistics of a panel: Fleiss' kappa, agreement with the majority, pairwise agreement."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Hashable, Iterable, Mapping, Sequence

import numpy as np


def fleiss_kappa(counts) -> float:
    """Fleiss' kappa of an (items x categories) table of rating counts (Fleiss 1971).

    Every item must have the same number n >= 2 of ratings. With p_j the share of all ratings in
    category j and P_i = (sum_j n_ij^2 - n) / (n (n - 1)) the agreement on item i,
    kappa = (mean_i P_i - sum_j p_j^2) / (1 - sum_j p_j^2). NaN when chance agreement is 1
    (every rating in one category: kappa is undefined there).
    """
    t = np.asarray(counts, dtype=np.float64)
    if t.ndim != 2 or t.shape[0] < 1 or t.shape[1] < 2 or (t < 0).any():
        raise ValueError(f"expected a non-negative (items, categories >= 2) table, got shape {t.shape}")
    n = t.sum(1)
    if not np.allclose(n, n[0]) or n[0] < 2:
        raise ValueError(f"every item needs the same number (>= 2) of ratings; got {sorted(set(n.tolist()))}")
    n = n[0]
    p_item = ((t ** 2).sum(1) - n) / (n * (n - 1))
    p_cat = t.sum(0) / t.sum()
    p_e = float((p_cat ** 2).sum())
    if math.isclose(p_e, 1.0):
        return math.nan
    return float((p_item.mean() - p_e) / (1 - p_e))


def verdict_table(votes: Mapping[Hashable, Mapping[str, bool]], raters: Sequence[str]) -> np.ndarray:
    """(items, 2) counts [implausible, plausible] over items rated by every one of ``raters``."""
    rows = [[sum(not v[r] for r in raters), sum(v[r] for r in raters)]
            for v in votes.values() if all(r in v for r in raters)]
    return np.array(rows, dtype=np.float64).reshape(-1, 2)


def majority(values: Iterable[bool]) -> bool | None:
    """The majority verdict; None on a tie."""
    c = Counter(bool(v) for v in values)
    return None if c[True] == c[False] else c[True] > c[False]


def majority_agreement(votes: Mapping[Hashable, Mapping[str, bool]], raters: Sequence[str]) -> dict[str, float]:
    """Each rater's share of items where it agrees with the panel majority (all raters, itself included;
    tied items skipped). NaN for a rater with no untied item."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for v in votes.values():
        m = majority(v[r] for r in raters if r in v)
        if m is None:
            continue
        for r in raters:
            if r in v:
                hits[r].append(v[r] == m)
    return {r: float(np.mean(hits[r])) if hits[r] else math.nan for r in raters}


def majority_verdicts(votes: Mapping[Hashable, Mapping[str, bool]]) -> dict[Hashable, bool | None]:
    return {k: majority(v.values()) for k, v in votes.items()}


def comparison_agreement(prefs: Mapping[Hashable, Mapping[str, str]]) -> dict[str, float]:
    """How predictable individual preferences are from the rest of the panel.

    ``prefs``: pair -> {rater: "a" | "b" | "tie"}. ``leave_one_out``: the share of a rater's
    decided (non-tie) preferences that match the majority of the *other* raters' decided
    preferences on that pair (pairs where the others tie or abstain are skipped): the accuracy a
    perfect consensus model (e.g. Bradley-Terry) could reach on individual comparisons, its
    ceiling. ``pairwise``: the share of decided rater pairs on one pair of images that agree.
    ``tie_rate``: share of ties among all preferences.
    """
    loo, pairwise, ties, total = [], [], 0, 0
    for votes in prefs.values():
        decided = {r: p for r, p in votes.items() if p in ("a", "b")}
        ties += sum(p == "tie" for p in votes.values())
        total += len(votes)
        for r, p in decided.items():
            others = Counter(q for s, q in decided.items() if s != r)
            if others["a"] != others["b"]:
                loo.append(p == ("a" if others["a"] > others["b"] else "b"))
        ps = list(decided.values())
        pairwise += [ps[i] == ps[j] for i in range(len(ps)) for j in range(i + 1, len(ps))]
    return {"leave_one_out": float(np.mean(loo)) if loo else math.nan,
            "pairwise": float(np.mean(pairwise)) if pairwise else math.nan,
            "tie_rate": ties / total if total else math.nan, "pairs": len(prefs), "preferences": total}
