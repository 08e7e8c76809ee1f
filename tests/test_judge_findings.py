"""benchmarks/judge_findings.py's spot-head readout: the pointing game against the simulator's finding masks."""

from __future__ import annotations

import json
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


def test_generated_images_are_the_test_prompts_of_the_same_data(sim, tmp_path):
    """--generated reads an evaluation's cached held-out images, the test prompts' first, and refuses another
    data set's evaluation or a folder without one."""
    root, ds, rows = sim
    folder = tmp_path / "eval"
    (folder / "generated").mkdir(parents=True)
    images = torch.randn(10, 1, 64, 64)  # 6 test prompts, then 4 from a prompts file
    torch.save({"key": "k", "value": images}, folder / "generated" / "heldout.pt")
    (folder / "metrics.json").write_text(json.dumps({"data": str(root), "n_prompts": 6}))
    assert torch.equal(judge_findings.generated_images(folder, str(root), len(ds)), images[:6])
    with pytest.raises(SystemExit, match="evaluated .* not --data"):
        judge_findings.generated_images(folder, str(tmp_path), len(ds))
    with pytest.raises(SystemExit, match="no finished cxrgen evaluate"):
        judge_findings.generated_images(tmp_path, str(root), len(ds))


def test_label_table_puts_the_generated_auroc_beside_the_real_one(sim):
    _, _, rows = sim
    label = "Lung Lesion"
    y = np.array([r["labels"].get(label) == 1.0 for r in rows], dtype=float)
    assert 0 < y.sum() < len(y)
    real, _ = judge_findings.label_table(y, rows, label)  # perfect scores
    gen, lines = judge_findings.label_table(1 - y, rows, label, real)  # inverted: AUROC 0
    assert real["auroc"] == 1.0 and gen["auroc"] == 0.0
    assert lines[-1] == f"| {label} | all | {int(y.sum())} | 1.000 | 0.000 (0.00) |"
    assert set(gen["by_kind"]) == set(real["by_kind"]) and gen["by_kind"]


def test_pair_figure_puts_each_real_film_above_its_generated_image(sim, tmp_path):
    from PIL import Image

    _, ds, rows = sim
    real, gen = torch.full((len(rows), 1, 64, 64), 1.0), torch.full((len(rows), 1, 64, 64), -1.0)
    kinds = [k for k in KINDS if any(f["kind"] == k for r in rows for f in r["findings"])]
    assert kinds
    judge_findings.pair_figure(real, gen, rows, kinds, tmp_path / "pairs.png", k=2)
    img = np.asarray(Image.open(tmp_path / "pairs.png"))
    n = sum(min(2, sum(any(f["kind"] == k for f in r["findings"]) for r in rows)) for k in kinds)
    assert img.shape == (128, 64 * n) and (img[:64] == 255).all() and (img[64:] == 0).all()
