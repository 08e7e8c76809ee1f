"""The simulated panel's logic on planted evidence: criteria, noise, comparisons, agreement (issue 7, section 2).

No network here: assessments are built by hand, so each test says exactly what a rater saw.
"""

import math

import numpy as np
import pytest
import torch

from training.expert import raters as rt
from training.expert.agreement import comparison_agreement, fleiss_kappa, majority_agreement, verdict_table
from training.expert.config import CRITERIA
from training.expert.panel import Assessment, FindingEvidence
from training.findings import Finding

EFFUSION_LEFT = Finding("pleural_effusion", "left", "moderate")


def assessment(findings=(), unprompted=0.0, unprompted_kind="mass", anatomy=0.0, posture=0.0, artefact=0.0):
    return Assessment(findings=tuple(findings), unprompted=unprompted, unprompted_kind=unprompted_kind,
                      anatomy=anatomy, anatomy_feature="heart_width", posture=posture,
                      posture_deg=3.0 + 2.0 * posture, artefact=artefact, presence={}, pose={})


def quiet(**overrides) -> rt.RaterProfile:
    """A rater without label noise: thresholds 2 unless overridden."""
    th = {c: 2.0 for c in CRITERIA}
    th.update(overrides)
    return rt.RaterProfile("quiet", "simulated radiologist", "test rater", th, noise=0.0, tie_margin=0.1)


# ----------------------------------------------------------------------------- criteria


def test_criteria_match_the_store():
    from training.feedback import store

    assert tuple(CRITERIA) == tuple(store.CRITERIA)


def test_left_effusion_read_on_the_right_fails_wrong_side_only():
    a = assessment([FindingEvidence(EFFUSION_LEFT, absent=0.1, side=4.0, size=0.2)])
    v = rt.rate(quiet(), a, seed=0, key="g1")
    assert not v.plausible and v.failed == ("wrong_side",)
    assert "wrong side" in v.comment and "moderate left pleural effusion" in v.comment


@pytest.mark.parametrize("kwargs, failed", [
    ({"findings": [FindingEvidence(EFFUSION_LEFT, absent=5.0, side=9.0, size=9.0)]}, ("finding_absent",)),
    ({"findings": [FindingEvidence(EFFUSION_LEFT, absent=0.0, side=0.0, size=3.0)]}, ("wrong_size",)),
    ({"unprompted": 2.5}, ("unprompted_finding",)),
    ({"anatomy": 7.0}, ("anatomy",)),
    ({"posture": 3.0}, ("posture",)),
    ({"artefact": 3.0}, ("artefact",)),
    ({"posture": 3.0, "artefact": 3.0, "anatomy": 9.0}, ("anatomy", "posture", "artefact")),
])
def test_each_criterion_fails_on_its_own_evidence(kwargs, failed):
    v = rt.rate(quiet(), assessment(**kwargs), seed=0, key="g")
    assert v.failed == failed and not v.plausible
    assert v.score == max(1, 4 - len(failed))


def test_an_unseen_finding_is_absent_not_on_the_wrong_side():
    """Side and grade are judged on a finding the rater sees; an invisible one is just absent."""
    a = assessment([FindingEvidence(EFFUSION_LEFT, absent=3.0, side=8.0, size=8.0)])
    assert rt.rate(quiet(), a, 0, "g").failed == ("finding_absent",)


def test_a_clean_film_passes_with_a_top_score():
    v = rt.rate(quiet(), assessment([FindingEvidence(EFFUSION_LEFT, 0.0, 0.0, 0.0)]), 0, "g")
    assert v.plausible and v.failed == () and v.score == 5 and v.comment == "Plausible."


def test_strictness_is_per_rater():
    a = assessment(artefact=2.5)
    assert not rt.rate(quiet(artefact=2.0), a, 0, "g").plausible
    assert rt.rate(quiet(artefact=3.0), a, 0, "g").plausible


# -------------------------------------------------------------------------------- noise


def test_same_seed_same_ratings_other_seed_other_noise():
    r = dataclass_replace(rt.DEFAULT_RATERS[3], noise=0.2)
    a = assessment(artefact=1.0)
    first = [rt.rate(r, a, 7, f"g{i}") for i in range(300)]
    again = [rt.rate(r, a, 7, f"g{i}") for i in range(300)]
    other = [rt.rate(r, a, 8, f"g{i}") for i in range(300)]
    assert first == again
    assert first != other


def dataclass_replace(r, **kw):
    import dataclasses

    return dataclasses.replace(r, **kw)


@pytest.mark.parametrize("noise", [0.05, 0.2])
def test_noise_rate_within_tolerance(noise):
    n = 4000
    r = dataclass_replace(quiet(), noise=noise)
    good, bad = assessment(), assessment(artefact=5.0)
    flipped_good = np.mean([not rt.rate(r, good, 1, f"k{i}").plausible for i in range(n)])
    flipped_bad = np.mean([rt.rate(r, bad, 1, f"k{i}").plausible for i in range(n)])
    tol = 4 * math.sqrt(noise * (1 - noise) / n)
    assert abs(flipped_good - noise) < tol and abs(flipped_bad - noise) < tol


def test_noise_fails_the_nearest_miss():
    r = dataclass_replace(quiet(), noise=0.5)
    a = assessment(posture=1.9, artefact=0.5)  # posture at 95 % of its limit: the nearest miss
    flipped = [v for v in (rt.rate(r, a, 0, f"k{i}") for i in range(60)) if v.flipped]
    assert flipped and all(v.failed == ("posture",) and "borderline" in v.comment for v in flipped)


def test_default_raters_disagree_by_design():
    ids = [r.id for r in rt.DEFAULT_RATERS]
    assert len(set(ids)) == len(ids) >= 5
    assert all(0.05 <= r.noise <= 0.2 for r in rt.DEFAULT_RATERS)
    assert len({tuple(r.thresholds.values()) for r in rt.DEFAULT_RATERS}) == len(ids)


def test_unknown_rater_and_bad_profile_are_clear_errors():
    with pytest.raises(ValueError, match="unknown rater id.*known"):
        rt.select_raters(["sim-thoracic-consultant", "dr-nobody"])
    assert [r.id for r in rt.select_raters(["sim-junior-resident"])] == ["sim-junior-resident"]
    with pytest.raises(ValueError, match="every criterion"):
        rt.RaterProfile("x", "r", "", {"posture": 1.0}, noise=0.1)
    with pytest.raises(ValueError, match="noise"):
        dataclass_replace(quiet(), noise=0.9)


# --------------------------------------------------------------------------- comparisons


def test_comparison_prefers_the_better_image_and_ties_within_the_margin():
    r = quiet()
    good, bad = assessment(artefact=0.5), assessment(artefact=1.9)
    assert rt.compare(r, good, bad, 0, "p") == "a"
    assert rt.compare(r, bad, good, 0, "p") == "b"
    assert rt.compare(r, good, assessment(artefact=0.6), 0, "p") == "tie"
    assert rt.quality(r, assessment(artefact=100.0)) == rt.quality(r, assessment(artefact=50.0))  # clipped


def test_comparison_noise_flips_at_its_rate():
    r = dataclass_replace(quiet(), noise=0.1)
    good, bad = assessment(), assessment(artefact=3.0)
    prefs = [rt.compare(r, good, bad, 3, f"p{i}") for i in range(3000)]
    assert abs(prefs.count("b") / len(prefs) - 0.1) < 0.025 and "tie" not in prefs


# ----------------------------------------------------------------------------- agreement


def test_fleiss_kappa_worked_example():
    """Fleiss (1971) / Wikipedia's worked example: 10 items, 14 raters, 5 categories, kappa = 0.210."""
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert fleiss_kappa(table) == pytest.approx(0.20993, abs=1e-4)


def test_fleiss_kappa_limits_and_errors():
    assert fleiss_kappa([[3, 0], [0, 3], [3, 0]]) == pytest.approx(1.0)
    assert math.isnan(fleiss_kappa([[3, 0], [3, 0]]))  # one category only: undefined
    with pytest.raises(ValueError, match="same number"):
        fleiss_kappa([[2, 1], [1, 1]])


def test_agreement_with_the_majority_and_on_comparisons():
    votes = {1: {"a": True, "b": True, "c": False}, 2: {"a": False, "b": False, "c": False}}
    assert majority_agreement(votes, ["a", "b", "c"]) == {"a": 1.0, "b": 1.0, "c": 0.5}
    assert verdict_table(votes, ["a", "b", "c"]).tolist() == [[1, 2], [3, 0]]
    prefs = {(1, 2): {"a": "a", "b": "a", "c": "b"}, (3, 4): {"a": "tie", "b": "b", "c": "b"}}
    out = comparison_agreement(prefs)
    # Leave-one-out: on (1, 2) the others of a (and of b) tie 1-1, skipped; c disagrees with a + b.
    # On (3, 4) b and c agree with each other; a's tie is not a decided preference.
    assert out["leave_one_out"] == pytest.approx(2 / 3)
    assert out["pairwise"] == pytest.approx(2 / 4)
    assert out["tie_rate"] == pytest.approx(1 / 6)


# ------------------------------------------------------------------------------ findings


def test_findings_come_from_the_record_else_from_the_prompt():
    from training.expert.data import resolve_findings

    assert resolve_findings([{"kind": "edema", "severity": "large", "params": {"x": 1}}], "ignored") == \
        [Finding("edema", severity="large")]
    parsed = resolve_findings([], "Moderate left pleural effusion. No pneumothorax.")
    assert [(f.kind, f.side.value) for f in parsed] == [("pleural_effusion", "left")]


# ---------------------------------------------------------------------------- corruptions


def test_corruptions_are_deterministic_and_visible():
    from training.expert.corrupt import CORRUPTIONS, blur, corrupt

    x = torch.rand((4, 1, 64, 64), generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8  # texture to smear
    for kind in CORRUPTIONS:
        a, _ = corrupt(x, torch.Generator().manual_seed(0), (kind,))
        b, _ = corrupt(x, torch.Generator().manual_seed(0), (kind,))
        assert torch.equal(a, b) and a.shape == x.shape, kind
        assert (a - x).abs().amax(dim=(1, 2, 3)).min() > 0.05, kind
        assert a.min() >= -1 and a.max() <= 1
    assert torch.allclose(blur(x, 0.0), x)
    y = blur(x, [0.0, 1.0, 2.0, 3.0])
    assert torch.allclose(y[0], x[0]) and not torch.allclose(y[3], x[3])
    with pytest.raises(ValueError, match="known"):
        corrupt(x, torch.Generator(), ("smudge",))
