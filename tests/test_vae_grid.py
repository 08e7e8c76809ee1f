"""benchmarks/vae_grid.py: what an autoencoder keeps of a finding, on 8x and 4x micro VAEs."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from micro_model import MICRO  # noqa: E402

import vae_grid  # noqa: E402


def films(seed=0):
    g = torch.Generator().manual_seed(seed)
    xm = torch.rand((3, 1, 32, 32), generator=g) * 1.6 - 0.8
    xp = xm.clone()
    xp[:, :, 4:28, 15:17] += 0.5  # a two-pixel vertical line: the finding
    return xp, xm


def test_kept_is_one_for_a_perfect_round_trip_and_scales_with_the_finding():
    xp, xm = films()
    assert vae_grid.kept(xp, xm, xp, xm) == pytest.approx(1.0)
    assert vae_grid.kept(xm + 0.5 * (xp - xm), xm, xp, xm) == pytest.approx(0.5)
    assert vae_grid.kept(xm, xm, xp, xm) == pytest.approx(0.0)  # the finding erased


@pytest.mark.parametrize("channels, grid", [((8, 8, 16, 16), 4), ((8, 8, 16), 8)])
def test_measure_reports_each_kind_on_the_vaes_grid(channels, grid):
    from training.model.components import build_vae

    torch.manual_seed(0)
    vae = build_vae(dataclasses.replace(MICRO, vae_channels=channels)).eval()
    xp, xm = films()
    r = vae_grid.measure(vae, {"line": (xp, xm, ["a line"] * 3)})["line"]
    assert r["n"] == 3 and r["latent_grid"] == [grid, grid]
    assert r["recon_mse_x1e3"] > 0 and r["latent_energy_x1e3"] > 0
    same = vae_grid.measure(vae, {"none": (xm, xm, ["none"] * 3)})["none"]
    assert same["latent_energy_x1e3"] == 0.0


def test_judged_scores_real_films_and_each_round_trip(tmp_path):
    import math

    from training.evaluate.judge import CXRJudge
    from training.model.components import build_vae
    from training.simulator.dataset import SimulateConfig, simulate

    simulate(SimulateConfig(out=str(tmp_path / "sim"), n=24, size=128, seed=5, workers=1), progress=False)
    torch.manual_seed(0)
    vaes = {"8x": build_vae(MICRO).eval(), "4x": build_vae(dataclasses.replace(MICRO, vae_channels=(8, 8, 16))).eval()}
    out = vae_grid.judged(CXRJudge("resnet18", 32).eval(), vaes, str(tmp_path / "sim"), 8, 32)
    assert set(out) == {"n", "real", "8x", "4x"} and 0 < out["n"] <= 8
    assert set(out["8x"]) == set(out["real"]) == set(out["4x"])
    assert all(math.isnan(v) or 0 <= v <= 1 for r in ("real", "8x", "4x") for v in out[r].values())


@pytest.mark.parametrize("size", ["100", "0"])
def test_a_size_the_vae_cannot_tile_is_a_cli_error(size, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["vae_grid.py", "8x=models/default", "--size", size, "--figure", ""])
    with pytest.raises(SystemExit) as e:
        vae_grid.main()
    assert e.value.code == 2
    assert f"--size {size}: not a multiple of every VAE's downsampling factor" in capsys.readouterr().err
