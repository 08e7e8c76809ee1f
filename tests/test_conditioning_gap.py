"""benchmarks/conditioning_gap.py: the text-preference margin and the min-SNR loss shares it reports."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from micro_model import micro_checkpoint  # noqa: E402

import conditioning_gap as cg  # noqa: E402


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from training.model.checkpoint import load_pipeline

    return load_pipeline(micro_checkpoint(tmp_path_factory.mktemp("gap") / "ckpt", reports=200))[0]


def test_loss_shares_sum_to_one_and_min_snr_starves_low_noise(pipe):
    shares = cg.band_weights(pipe.scheduler, 5.0)
    assert sum(v["min_snr"] for v in shares.values()) == pytest.approx(1.0)
    assert sum(v["plain"] for v in shares.values()) == pytest.approx(1.0)
    low = shares["0-25"]
    assert low["min_snr"] < 0.2 * low["plain"]  # gamma 5 keeps under a fifth of the t < 25 steps' share
    assert cg.band_weights(pipe.scheduler, 1e9)["0-25"]["min_snr"] == pytest.approx(low["plain"])


def test_gap_is_antisymmetric_and_zero_for_identical_films(pipe):
    g = torch.Generator().manual_seed(0)
    x = torch.rand((3, 1, 32, 32), generator=g) * 2 - 1
    y = (x + 0.3 * torch.rand((3, 1, 32, 32), generator=g)).clamp(-1, 1)
    prompts = ["Large right pleural effusion.", "Endotracheal tube in place.", "Normal chest."]
    ab = cg.gaps(pipe, {"k": (x, y, prompts)}, draws=2, seed=1)["k"]
    ba = cg.gaps(pipe, {"k": (y, x, prompts)}, draws=2, seed=1)["k"]
    same = cg.gaps(pipe, {"k": (x, x, prompts)}, draws=2, seed=1)["k"]
    for band, v in ab["bands"].items():
        assert v["gap_x1e3"] == pytest.approx(-ba["bands"][band]["gap_x1e3"], abs=1e-6)
        assert v["gap_x1e3"] != 0.0
        assert same["bands"][band]["gap_x1e3"] == 0.0
    assert same["latent_energy_x1e3"] == 0.0 and ab["latent_energy_x1e3"] > 0


def test_exam_pairs_are_one_exam_with_and_without_the_finding(tmp_path):
    from training.simulator.dataset import SimulateConfig, simulate

    simulate(SimulateConfig(out=str(tmp_path), n=12, size=128, seed=3, workers=1), progress=False)
    pairs = cg.exam_pairs(tmp_path, ("pleural_effusion", "cardiomegaly", "central_line"), n=2, size=32)
    assert pairs, "12 simulated exams hold none of the kinds asked for"
    for kind, (xp, xm, prompts) in pairs.items():
        assert xp.shape == xm.shape and len(prompts) == len(xp) <= 2
        assert xp.min() >= -1 and xp.max() <= 1
        assert (xp - xm).abs().amax(dim=(1, 2, 3)).min() > 0, kind  # every pair differs
        if len(xp) > 1:  # ... by less than two different exams do
            assert (xp - xm).abs().mean() < (xp - xp.roll(1, 0)).abs().mean(), kind
