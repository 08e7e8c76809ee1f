"""benchmarks/judge_findings.py's spot-head readout: the pointing game against the simulator's finding masks."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import judge_findings  # noqa: E402

KINDS = ("calcified_granuloma", "nodule", "mass")


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    from training.data.mimic import MimicCXRDataset
    from training.simulator.dataset import SimulateConfig, simulate
    from training.simulator.masks import finding_masks

    root = tmp_path_factory.mktemp("jf_sim")
    simulate(SimulateConfig(out=str(root), n=24, size=128, seed=1, workers=1), progress=False)
    finding_masks(root, KINDS, grid=32, workers=1, progress=False)
    ds = MimicCXRDataset(root=root, split=None, size=64, normalize="unit", return_ground_truth=True)
    return root, ds, [ds[i]["ground_truth"] for i in range(len(ds))]


class Pointer(torch.nn.Module):
    """A stand-in spot judge whose most confident cell is given per film (in data set order)."""

    spot = True

    def __init__(self, cells: list[tuple[int, int]], h: int = 4):
        super().__init__()
        self.cells, self.h, self.seen = cells, h, 0
        self.meta = {"spot_kinds": list(KINDS)}

    def forward(self, x):
        out = torch.full((x.shape[0], 1, self.h, self.h), -4.0)
        for b in range(x.shape[0]):
            r, c = self.cells[self.seen + b]
            out[b, 0, r, c] = 4.0
        self.seen += x.shape[0]
        return {"spot": out}


def cell_of(mask: np.ndarray, h: int, on: bool) -> tuple[int, int]:
    m = F.adaptive_max_pool2d(torch.from_numpy(mask.astype(np.float32))[None], h)[0]
    grown = F.max_pool2d(m[None, None], 3, 1, 1)[0, 0] > 0
    idx = (grown if on else ~grown).nonzero()[0]
    return int(idx[0]), int(idx[1])


def test_pointing_counts_a_best_cell_on_the_finding_and_not_one_elsewhere(sim, tmp_path):
    from training.simulator.masks import load_masks

    root, ds, rows = sim
    union, _ = load_masks(root)
    h = 8
    for on in (True, False):
        cells = [cell_of(union[r["dicom_id"]], h, on) if r["dicom_id"] in union else (0, 0) for r in rows]
        fig = tmp_path / f"spot-{on}.png"
        out, text = judge_findings.spot_pointing(Pointer(cells, h), ds, rows, root, fig)
        scored = {k: v for k, v in out["by_kind"].items() if v["n"]}
        assert scored and all(v["pointing"] == (1.0 if on else 0.0) for v in scored.values()), (on, out)
        assert "| spot head: kind |" in text and fig.is_file()
    assert out["best_cell_median"]["with_lesion"] > 0.9 and out["best_cell_median"]["without"] > 0.9
