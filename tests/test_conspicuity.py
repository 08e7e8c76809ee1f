"""benchmarks/conspicuity.py: a finding's contrast against the film's own texture around it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import conspicuity  # noqa: E402


def films(amplitude: float, noise: float = 0.05, n: int = 6, side: int = 64):
    g = torch.Generator().manual_seed(0)
    xm = torch.randn((n, 1, side, side), generator=g) * noise
    xp = xm.clone()
    xp[:, :, 30:33, 40:43] += amplitude  # a 3 px dot
    return xp, xm


def test_a_dot_well_above_the_texture_scores_high_and_one_at_its_level_low():
    strong = conspicuity.summary(*conspicuity.cnr(*films(0.5)))
    faint = conspicuity.summary(*conspicuity.cnr(*films(0.05)))
    assert strong["peak_median"] == pytest.approx(0.5)
    assert strong["cnr_median"] > 5 and strong["share_cnr_below_2"] == 0.0
    assert faint["cnr_median"] < 2 and faint["share_cnr_below_2"] > 0.5
    # twice the texture, same dot: half the ratio
    rough = conspicuity.summary(*conspicuity.cnr(*films(0.5, noise=0.1)))
    assert rough["cnr_median"] == pytest.approx(strong["cnr_median"] / 2, rel=0.15)


def test_the_window_is_centred_on_the_finding_not_the_whole_film():
    xp, xm = films(0.5)
    xm[:, :, :, :8] += torch.randn_like(xm[:, :, :, :8])  # rough texture far from the dot
    xp[:, :, :, :8] = xm[:, :, :, :8]
    assert conspicuity.summary(*conspicuity.cnr(xp, xm))["cnr_median"] > 5


def run_cli(args, monkeypatch, capsys, tmp_path) -> str:
    monkeypatch.setattr(sys, "argv", ["conspicuity.py", *args, "--out", str(tmp_path / "o.json")])
    with pytest.raises(SystemExit) as e:
        conspicuity.main()
    assert e.value.code == 2
    return capsys.readouterr().err


def test_cli_errors_name_the_problem(monkeypatch, capsys, tmp_path):
    assert "no ground_truth.jsonl" in run_cli(["--data", "no/such/folder"], monkeypatch, capsys, tmp_path)
    (tmp_path / "ground_truth.jsonl").write_text("")
    for sizes, message in (("a,b", "not a comma-separated list of integers"), ("16", "each side must be at least 32 px")):
        err = run_cli(["--data", str(tmp_path), "--sizes", sizes], monkeypatch, capsys, tmp_path)
        assert f"--sizes {sizes}: {message}" in err


def test_figure_crops_around_the_finding(tmp_path):
    from PIL import Image

    xp, xm = films(0.5)
    conspicuity.figure(xp, xm, tmp_path / "f.png", k=2, crop=16, zoom=2)
    img = Image.open(tmp_path / "f.png")
    assert img.size == (3 * 16 * 2, 2 * 16 * 2)
    import numpy as np

    diff = np.asarray(img, dtype=np.float32)[:32, 64:]
    assert diff.max() > 200 and diff.min() >= 120  # the dot, bright on mid-grey, inside the crop
