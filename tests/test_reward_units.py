"""Reward models (issue 7, section 3): losses, calibration, metrics, corruptions, registry. No training here."""

import math

import numpy as np
import pytest
import torch

from training.findings import Finding
from training.reward import base as rb
from training.reward.config import RewardConfig
from training.reward.corrupt import CORRUPTIONS, GUARDED, corrupt, random_corruptions
from training.reward.diagnosis import agreement, label_matrix
from training.reward.metrics import (binary_nll, bradley_terry_loss, expected_calibration_error, fit_temperature,
                                     panel_pair_agreement, pearson, recall_at_k)
from training.reward.nets import FINDING_DIM, TextEncoder, encode_findings, prepare, text_features
from training.reward.posture import posture_reward
from training.reward.testing import Comparison


def test_bradley_terry_loss_matches_hand_computation():
    fa, fb = torch.tensor([1.0, 1.0, 1.0, 0.0]), torch.tensor([0.0, 0.0, 0.0, 0.0])
    per = [math.log(1 + math.exp(-1)), math.log(1 + math.exp(1)), None, math.log(2)]
    per[2] = 0.5 * (per[0] + per[1])  # a tie is half a win each way
    t = torch.tensor([1.0, 0.0, 0.5, 0.5])
    for i in range(4):
        got = bradley_terry_loss(fa[i:i + 1], fb[i:i + 1], t[i:i + 1])
        assert got.item() == pytest.approx(per[i], abs=1e-6)
    assert bradley_terry_loss(fa, fb, t).item() == pytest.approx(np.mean(per), abs=1e-6)
    w = torch.tensor([1.0, 0.0, 0.0, 3.0])
    assert bradley_terry_loss(fa, fb, t, w).item() == pytest.approx((per[0] + 3 * per[3]) / 4, abs=1e-6)


def test_bradley_terry_tie_is_minimised_at_equal_utilities():
    d = torch.tensor([0.7], requires_grad=True)
    bradley_terry_loss(d, torch.zeros(1), torch.tensor([0.5])).backward()
    assert d.grad.item() == pytest.approx(torch.sigmoid(torch.tensor(0.7)).item() - 0.5, abs=1e-6)
    e = torch.zeros(1, requires_grad=True)
    bradley_terry_loss(e, torch.zeros(1), torch.tensor([0.5])).backward()
    assert e.grad.item() == pytest.approx(0.0, abs=1e-7)


def test_temperature_scaling_lowers_the_nll_of_an_overconfident_model():
    g = torch.Generator().manual_seed(0)
    true_logit = torch.randn(4000, generator=g) * 1.5
    y = (torch.rand(4000, generator=g) < torch.sigmoid(true_logit)).float()
    over = 4.0 * true_logit  # four times too confident
    t = fit_temperature(over, y)
    assert t == pytest.approx(4.0, rel=0.15)
    assert binary_nll(over, y, t) < binary_nll(over, y) - 0.1
    p_before, p_after = torch.sigmoid(over), torch.sigmoid(over / t)
    assert expected_calibration_error(p_after, y) < expected_calibration_error(p_before, y)
    assert fit_temperature(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0])) == 1.0  # one class: nothing to fit


def test_platt_scaling_recovers_temperature_and_base_rate_shift():
    from training.reward.metrics import fit_platt

    g = torch.Generator().manual_seed(1)
    true_logit = torch.randn(4000, generator=g) * 1.5 - 1.0
    y = (torch.rand(4000, generator=g) < torch.sigmoid(true_logit)).float()
    shifted = 2.0 * (true_logit + 1.5)  # overconfident and too optimistic, as weak positives make it
    t, b = fit_platt(shifted, y)
    assert t == pytest.approx(2.0, rel=0.15) and b == pytest.approx(-1.5, abs=0.25)
    p_temp_only = torch.sigmoid(shifted / fit_temperature(shifted, y))
    p_platt = torch.sigmoid(shifted / t + b)
    assert expected_calibration_error(p_platt, y) < 0.5 * expected_calibration_error(p_temp_only, y)
    assert fit_platt(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0])) == (1.0, 0.0)


def test_expected_calibration_error_by_hand():
    # bin [0.2, 0.267): two samples at 0.25, one positive -> |0.25 - 0.5| x 2/4; bin of 0.9: |0.9 - 1| x 2/4
    assert expected_calibration_error([0.25, 0.25, 0.9, 0.9], [1, 0, 1, 1]) == pytest.approx(0.5 * 0.25 + 0.5 * 0.1)
    assert expected_calibration_error([1.0, 0.0], [1, 0]) == 0.0  # 1.0 falls in the last bin
    assert math.isnan(expected_calibration_error([], []))


def test_panel_pair_agreement_counts_rater_pairs_and_leave_one_out():
    cs = [Comparison(1, 1, 2, "a", "r1"), Comparison(2, 2, 1, "b", "r2"),  # both say 1 wins (ids swapped)
          Comparison(3, 1, 2, "b", "r3"),  # says 2 wins
          Comparison(4, 3, 4, "tie", "r1"), Comparison(5, 3, 4, "a", "r2")]  # ties are left out
    out = panel_pair_agreement(cs)
    assert out["rater_pairs"] == 3 and out["rater_pair_agreement"] == pytest.approx(1 / 3)
    # r1 and r2 each agree with the other two's... split 1-1 -> skipped; r3 disagrees with the 2-0 majority
    assert out["loo_votes"] == 1 and out["loo_majority_agreement"] == 0.0


def test_recall_at_k_and_pearson():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.7, 0.1], [0.1, 0.2, 0.3]])
    r = recall_at_k(sim, [0, 0, 0], (1, 2))
    assert r == {"recall@1": pytest.approx(2 / 3), "recall@2": pytest.approx(2 / 3)}
    assert recall_at_k(sim, [0, 1, 2], (1,))["recall@1"] == pytest.approx(2 / 3)
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corruptions_keep_shape_range_and_are_deterministic(kind):
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    a = corrupt(x, kind, torch.Generator().manual_seed(1))
    b = corrupt(x, kind, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1 and not torch.equal(a, x)


def test_random_corruptions_and_errors():
    x = torch.rand(16, 1, 24, 24) * 2 - 1
    y, kinds = random_corruptions(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and len(kinds) == 16 and set(kinds) <= set(CORRUPTIONS)
    assert set(GUARDED) == {"noise", "blank", "inverted", "saturated"}
    with pytest.raises(ValueError, match="unknown corruption 'smudge'; known:"):
        corrupt(x, "smudge")


def test_finding_encoding_sides_and_severity():
    fs = [[], [Finding("pleural_effusion", "left", "small")], [Finding("pleural_effusion", "bilateral", "large")],
          [Finding("nodule", lobe="RUL")]]
    e = encode_findings(fs)
    assert e.shape == (4, FINDING_DIM) and e[0].sum() == 0
    j = 1 * 4  # pleural_effusion is the second kind
    assert e[1, j:j + 4].tolist() == pytest.approx([1, 1, 0, 1 / 3])
    assert e[2, j:j + 4].tolist() == pytest.approx([1, 1, 1, 1])
    k = 3 * 4  # nodule: side from its lobe
    assert e[3, k:k + 4].tolist() == pytest.approx([1, 0, 1, 0])
    with pytest.raises(ValueError, match="lists of training.findings.Finding"):
        encode_findings([["pleural_effusion"]])


def test_diagnosis_agreement_weighs_positives_and_negatives_equally():
    y = label_matrix([[Finding("pleural_effusion", "left")], []])
    p = torch.where(y > 0, torch.ones_like(y), torch.zeros_like(y))
    assert agreement(p, y).tolist() == pytest.approx([1.0, 1.0])
    assert agreement(1 - p, y).tolist() == pytest.approx([0.0, 0.0])
    # missing the one prompted finding costs half the reward however many negatives are right
    p2 = p.clone()
    p2[0, y[0] > 0] = 0.0
    assert agreement(p2, y)[0].item() == pytest.approx(0.5)


def test_posture_reward_is_one_upright_and_falls_with_rotation_and_shift():
    inv = torch.tensor([1 / 5, 1 / 5, 1 / 5, 1 / 20, 1 / 20, 0.0, 0.0])
    pose = torch.tensor([[0, 0, 0, 0, 0, 1.3, 1.0], [5, 0, 0, 0, 0, 1.3, 1.0], [0, 0, 0, 20, 20, 1.0, 0.9]])
    assert posture_reward(pose, inv).tolist() == pytest.approx([1.0, math.exp(-0.5), math.exp(-1.0)], abs=1e-6)


def test_text_features_are_stable_and_keep_negations():
    a, b = text_features("No pleural effusion.", 8192), text_features("Pleural effusion.", 8192)
    assert a == text_features("no  PLEURAL effusion", 8192) and len(a) == 5 and set(b) < set(a)
    assert text_features("", 64) == [0]
    enc = TextEncoder(64, 8, 4)
    assert enc(["a b", "", "c"]).shape == (3, 4)


def test_prepare_checks_and_resizes():
    assert prepare(torch.zeros(2, 1, 64, 48), 32).shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        prepare(torch.zeros(2, 3, 64, 64), 32)


def test_registry_and_name_errors(tmp_path):
    assert rb.REWARD_NAMES == ("plausibility", "comparative", "posture", "diagnosis", "consistency")
    for name in rb.REWARD_NAMES:
        assert rb.reward_class(name).name == name and callable(rb.trainer(name))
    with pytest.raises(ValueError, match=r"unknown reward 'beauty'; known: \['plausibility'"):
        rb.load_reward("beauty", model_dir=tmp_path)
    with pytest.raises(ValueError, match=r"unknown reward\(s\) \['beauty'\]; known"):
        rb.parse_names("posture,beauty")
    with pytest.raises(FileNotFoundError, match="no trained posture reward: .*reward_manifest.json is missing"):
        rb.load_reward("posture", model_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="reward folder not found"):
        rb.load_reward(str(tmp_path / "nowhere" / "x"))
    with pytest.raises(FileNotFoundError, match="no trained rewards under"):
        rb.score_all(torch.zeros(1, 1, 32, 32), model_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown reward kind 'beauty'"):
        RewardConfig(kind="beauty")
    with pytest.raises(ValueError, match="label_mode must be one of"):
        RewardConfig(label_mode="vote")


def test_store_url_is_redacted():
    assert rb.redact_url("postgresql+psycopg://u:secret@db:5432/fb") == "postgresql+psycopg://u:***@db:5432/fb"
    assert rb.redact_url("sqlite:///feedback/store.db") == "sqlite:///feedback/store.db"
    assert rb.redact_url(None) is None


def test_combine_is_a_weighted_mean_of_the_weighted_rewards():
    s = {"plausibility": torch.tensor([1.0, 0.0]), "posture": torch.tensor([0.0, 0.0]),
         "diagnosis": torch.tensor([0.5, 0.5])}
    both = rb.combine(s, {"plausibility": 3.0, "posture": 1.0, "comparative": 5.0})
    assert both.tolist() == pytest.approx([0.75, 0.0])  # comparative absent, diagnosis unweighted
    assert rb.combine(s, {"consistency": 1.0}) is None
