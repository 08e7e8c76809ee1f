"""Reward models on tiny data (issue 7, sections 3-4): planted signals, hack guard, checkpoints, CLI.

One module-scoped fixture trains all five kinds on a toy world (training.reward.testing): schematic chests
with a bright basal blob as the "effusion", rotations and shifts as posture, and a fake feedback store whose
ratings call an image plausible when the blob is on the declared side. Training them takes ~10 s of CPU, once
for the module; CI runs them (issue 7, section 6 asks for exactly these checks).
"""

import json
import numpy as np
import pytest
import torch

from training.findings import Finding
from training.reward import base as rb
from training.reward.config import RewardConfig
from training.reward.corrupt import GUARDED, corrupt
from training.reward.testing import toy_image, toy_store, write_toy_sim

SIZE = 32
TINY = dict(image_size=SIZE, channels=(8, 16), features=64, batch_size=16, lr=3e-3, seed=0, max_weak_positives=0)
# plausibility must learn an interaction (blob side x declared side) from 136 noisy labels: it needs the most passes
EPOCHS = {"plausibility": 30, "comparative": 15, "posture": 8, "diagnosis": 24, "consistency": 10}
LEFT, RIGHT = Finding("pleural_effusion", "left", "moderate"), Finding("pleural_effusion", "right", "moderate")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward")
    sim = write_toy_sim(root / "sim", n=160, size=SIZE, seed=0)
    store = toy_store(n_prompts=40, per_prompt=4, size=SIZE, seed=0)
    models = root / "rewards"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: threads cost more than they save on shared cores
    try:
        for kind, epochs in EPOCHS.items():
            cfg = RewardConfig(kind=kind, out=str(models / kind), data=str(sim), epochs=epochs, **TINY)
            rb.trainer(kind)(cfg, store=store)
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "sim": sim, "store": store, "models": models}


def fresh(findings, n=24, roll=0.0, shift=(0.0, 0.0), seed=100):
    rng = np.random.default_rng(seed)
    x = np.stack([toy_image(SIZE, findings, roll, shift, rng) for _ in range(n)])
    return torch.from_numpy(x).float()[:, None] * 2 - 1


def load(world, name):
    return rb.load_reward(world["models"] / name)


def test_every_reward_writes_a_complete_manifest(world):
    for name in rb.REWARD_NAMES:
        folder = world["models"] / name
        m = json.loads((folder / rb.MANIFEST).read_text())
        assert m["kind"] == name and m["version"].startswith(name + "-") and m["created"]
        assert (folder / rb.WEIGHTS).is_file() and (folder / "log.jsonl").read_text().count("\n") == EPOCHS[name]
        assert m["config"]["epochs"] == EPOCHS[name] and m["config"]["channels"] == [8, 16]
        assert m["metrics"]["guard"]["guard_auroc"] > 0.9 and m["metrics"]["guard"]["below_valid_median"] > 0.9
    for name in ("plausibility", "comparative"):
        data = json.loads((world["models"] / name / rb.MANIFEST).read_text())["data"]
        assert data["store_cursor"] == world["store"].cursor() and data["store_url"] == "sqlite:///fake.db"


def test_plausibility_separates_the_declared_side_and_is_calibrated(world):
    r = load(world, "plausibility")
    m = r.manifest["metrics"]
    assert m["test_auroc"] >= 0.75 and m["test_n"] > 10 and m["temperature"] > 0
    x = fresh([LEFT])
    matched, wrong = r.score(x, None, [[LEFT]] * 24), r.score(x, None, [[RIGHT]] * 24)
    assert matched.mean() > wrong.mean() + 0.2, (matched.mean(), wrong.mean())


def test_comparative_prefers_the_image_showing_the_prompt(world):
    r = load(world, "comparative")
    assert r.manifest["metrics"]["test_pair_accuracy"] >= 0.7
    assert r.manifest["metrics"]["panel_agreement_test"]["rater_pairs"] > 0
    good, bad = fresh([LEFT]), fresh([RIGHT], seed=101)
    assert r.score(good, None, [[LEFT]] * 24).mean() > r.score(bad, None, [[LEFT]] * 24).mean() + 0.1


def test_posture_scores_a_rotated_or_shifted_patient_lower(world):
    r = load(world, "posture")
    assert r.manifest["metrics"]["test_r"]["roll_deg"] > 0.6
    upright = r.score(fresh([])).mean()
    assert upright > r.score(fresh([], roll=14.0)).mean() + 0.2
    assert upright > r.score(fresh([], shift=(15.0, 15.0))).mean() + 0.2


def test_diagnosis_rewards_the_prompted_finding(world):
    r = load(world, "diagnosis")
    eff, normal = fresh([LEFT]), fresh([], seed=101)
    assert r.score(eff, None, [[LEFT]] * 24).mean() > r.score(normal, None, [[LEFT]] * 24).mean() + 0.1
    assert r.score(normal, None, [[]] * 24).mean() > r.score(eff, None, [[]] * 24).mean()


def test_consistency_matches_images_to_their_own_reports(world):
    r = load(world, "consistency")
    m = r.manifest["metrics"]
    assert m["conditioning"]["matched_vs_shuffled_auroc"] > 0.7
    assert m["test_recall@5"] > 5 / m["test_candidate_texts"]  # better than chance
    assert "duplicates" in m


@pytest.mark.parametrize("name", rb.REWARD_NAMES)
def test_hack_images_score_low(world, name):
    r = load(world, name)
    x = fresh([LEFT])
    prompts, findings = ["moderate left pleural effusion."] * 24, [[LEFT]] * 24
    valid = r.score(x, prompts, findings).mean().item()
    g = torch.Generator().manual_seed(5)
    for kind in GUARDED:
        hacked = r.score(corrupt(x, kind, g), prompts, findings).mean().item()
        assert hacked < 0.2 and hacked < 0.5 * valid, (name, kind, hacked, valid)
