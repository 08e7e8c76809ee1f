"""benchmarks/laterality.py: the side separation of sided findings, real against generated."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import laterality as lat  # noqa: E402


def films(sides: list[str], rng, strength: float = 0.3) -> np.ndarray:
    """Noisy 16 x 16 films; a right-sided finding whitens the image's left half (the patient's right)."""
    x = rng.normal(0.0, 0.05, size=(len(sides), 1, 16, 16))
    for i, s in enumerate(sides):
        if s == "right":
            x[i, :, :, :8] += strength
        elif s == "left":
            x[i, :, :, 8:] += strength
    return x


@pytest.fixture
def world():
    rng = np.random.default_rng(0)
    sides = ["right"] * 12 + ["left"] * 12 + [None] * 12
    rows = [{"findings": [{"kind": "pleural_effusion", "side": s}] if s else []} for s in sides]
    return sides, rows, rng


def test_a_generator_that_follows_the_words_separates_the_sides_as_real_films_do(world):
    sides, rows, rng = world
    real = films(sides, rng)
    flipped = [{"right": "left", "left": "right"}.get(s) for s in sides]
    out = lat.laterality(real, {"same": films(sides, rng), "flipped": films(flipped, rng, 0.15),
                                "blind": films([None] * len(sides), rng)}, rows)
    k = out["kinds"]["pleural_effusion"]
    assert k["clear"] and k["real"] == pytest.approx(0.6, abs=0.05) and k["n_right"] == 12
    assert k["models"]["same"]["ratio"] == pytest.approx(1.0, abs=0.15)
    assert k["models"]["flipped"]["ratio"] == pytest.approx(-0.5, abs=0.15)
    assert abs(k["models"]["blind"]["ratio"]) < 0.15
    assert out["summary"]["same"]["same_side"] == 1 and out["summary"]["flipped"]["same_side"] == 0
    assert "pleural_effusion" in lat.table(out)


def test_kinds_with_few_exams_a_side_are_left_out_and_bilateral_is_not_a_side(world):
    sides, rows, rng = world
    rows = [{"findings": [{"kind": "pneumothorax", "side": "bilateral"}]}] + rows[1:]
    rows[2]["findings"].append({"kind": "nodule", "side": "left"})
    groups = lat.sided(rows)
    assert groups["pleural_effusion"]["right"] == list(range(1, 12)) and "pneumothorax" not in groups
    out = lat.laterality(films(sides, rng), {"m": films(sides, rng)}, rows)
    assert "nodule" not in out["kinds"]
