"""The panel's networks, anatomy checks, calibration and folder (issue 7, section 2), on tiny inputs."""

import json

import numpy as np
import pytest
import torch

from training.expert import anatomy
from training.expert.calibrate import fit_groups, fit_tail
from training.expert.config import GRADED_KINDS, KIND_NAMES, SIDED_KINDS, PanelConfig
from training.expert.data import targets
from training.expert.nets import Critic, Reader, n_parameters
from training.expert.panel import TAIL_GROUPS, Panel
from training.findings import Finding


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convolutions run faster on one thread, and much faster on a shared, busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_panel() -> Panel:
    """An uncalibrated-by-data panel: random tiny nets, neutral tails, wide anatomy bands."""
    torch.manual_seed(0)
    reader, critic = Reader(size=32, width=4), Critic(size=32)
    neutral = {"median": 0.0, "scale": 1.0, "upper": True, "n": 1}
    cal = {k: {"*": {**neutral, "upper": k in ("presence_neg", "side_off", "size")}} for k in TAIL_GROUPS}
    cal.update({"anatomy": neutral, "artefact": neutral,
                "anatomy_bands": {f: [-10.0, 10.0] for f in anatomy.FEATURE_NAMES}})
    meta = {"format": 1, "kinds": list(KIND_NAMES), "reader": {"size": 32, "width": 4}, "critic": {"size": 32},
            "calibration": cal}
    return Panel(reader, critic, torch.full((32, 32), 0.5), meta)


def films(n=3, size=48):
    g = torch.Generator().manual_seed(1)
    return torch.rand((n, 1, size, size), generator=g) * 2 - 1


def test_nets_shapes_and_size_budget():
    r = Reader()
    out = r(films(2, 128))
    assert out["presence"].shape == (2, len(KIND_NAMES))
    assert out["side"].shape == (2, len(SIDED_KINDS), 2) and out["severity"].shape == (2, len(GRADED_KINDS), 3)
    assert out["pose"].shape == (2, 7)
    assert Critic()(films(2, 128)).shape == (2,)
    # models/panel must stay under ~10 MB: float32 weights of both nets.
    assert 4 * (n_parameters(r) + n_parameters(Critic())) < 4e6
    assert n_parameters(Critic()) < 50_000  # the critic is low-capacity by design
    with pytest.raises(ValueError, match="square"):
        r(torch.zeros(1, 1, 32, 40))


def test_targets_from_ground_truth():
    t = targets([{"kind": "pleural_effusion", "side": "bilateral", "severity": "large", "params": {}},
                 {"kind": "nodule", "side": "left", "lobe": "LUL"}, Finding("nodule", lobe="RLL")])
    assert t["presence"][KIND_NAMES.index("pleural_effusion")] == 1 and t["presence"].sum() == 2
    j = SIDED_KINDS.index("pleural_effusion")
    assert t["side"][j].tolist() == [1, 1] and t["side_mask"][j]
    assert t["side"][SIDED_KINDS.index("nodule")].tolist() == [1, 1]  # a left and a right nodule
    assert t["severity"].tolist()[GRADED_KINDS.index("pleural_effusion")] == 2
    assert t["severity"][GRADED_KINDS.index("cardiomegaly")] == -1


def test_anatomy_features_are_finite_and_real_films_pass_their_bands():
    x = films(8, 64)
    mean = anatomy.mean_film(x)
    f = anatomy.features(x, mean).numpy()
    assert f.shape == (8, len(anatomy.FEATURE_NAMES)) and np.isfinite(f).all()
    bands = anatomy.bands(f, (0.0, 100.0))
    assert anatomy.excess(f, bands).max() == 0
    blank = anatomy.features(torch.full((1, 1, 64, 64), -1.0), mean).numpy()
    assert anatomy.excess(blank, bands).max() > 0


def test_tails_measure_badness_in_real_film_standard_deviations():
    v = np.random.default_rng(0).normal(2.0, 0.5, 20_000)
    lo = fit_tail(v, upper=False, min_scale=0.01)
    assert lo.median == pytest.approx(2.0, abs=0.02) and lo.scale == pytest.approx(0.5, rel=0.05)
    assert lo.z(1.0) == pytest.approx(2.0, rel=0.05)  # two SDs below the median is bad
    assert fit_tail([1.0] * 50, upper=True, min_scale=0.3).scale == 0.3  # floor
    groups = fit_groups({"big": v, "tiny": v[:3]}, upper=True, min_scale=0.01)
    assert groups["tiny"] == groups["*"]  # too few values: the pooled tail
    with pytest.raises(ValueError, match="no values"):
        fit_tail([np.nan], upper=True, min_scale=1)


def test_assess_is_deterministic_and_per_finding():
    p = tiny_panel()
    x = films(3)
    fs = [[Finding("pleural_effusion", "left", "small")], [], [{"kind": "cardiomegaly", "severity": "large"}]]
    a, b = p.assess(x, fs), p.assess(x, fs)
    assert a == b and len(a) == 3
    assert a[0].findings[0].side is not None and a[0].findings[0].size is not None
    assert a[1].findings == () and a[1].evidence()["finding_absent"] is None
    assert a[2].findings[0].side is None and a[2].findings[0].size is not None
    # Unprompted excludes the prompted kind and its look-alikes.
    assert a[0].unprompted_kind != "pleural_effusion"
    assert set(a[0].evidence()) == set(__import__("training.expert.config", fromlist=["CRITERIA"]).CRITERIA)
    with pytest.raises(ValueError, match="finding lists"):
        p.assess(x, fs[:2])


def test_panel_folder_round_trip_and_errors(tmp_path):
    p = tiny_panel()
    p.save(tmp_path / "panel")
    q = Panel.load(tmp_path / "panel")
    assert q.version.startswith("panel-") and q.version == p.version
    x = films(2)
    assert q.assess(x, [[], []]) == p.assess(x, [[], []])
    with pytest.raises(FileNotFoundError, match="panel folder not found"):
        Panel.load(tmp_path / "nope")
    (tmp_path / "panel" / "panel.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt or unreadable panel weights"):
        Panel.load(tmp_path / "panel")
    meta = json.loads((tmp_path / "panel" / "panel.json").read_text())
    meta["kinds"] = meta["kinds"][:3]
    (tmp_path / "panel" / "panel.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="kinds"):
        Panel.load(tmp_path / "panel")


def test_config_refuses_bad_values():
    with pytest.raises(ValueError, match="epochs"):
        PanelConfig(epochs=0)
    with pytest.raises(ValueError, match="device"):
        PanelConfig(device="tpu")
    with pytest.raises(ValueError, match="anatomy_band"):
        PanelConfig(anatomy_band=(90, 10))


def test_reader_loss_falls_when_overfitting_cartoons(tmp_path):
    from training.expert.data import load_split
    from training.expert.testing import write_fake_dataset
    from training.expert.train import _batch, presence_weights, reader_loss

    split = load_split(write_fake_dataset(tmp_path / "sim", n=24, size=64), "train", 32)
    cfg = PanelConfig(reader_size=32, width=4)
    torch.manual_seed(0)
    reader = Reader(32, 4)
    opt = torch.optim.AdamW(reader.parameters(), lr=3e-3)
    x, y = _batch(split, torch.arange(len(split)), "cpu")
    pw = presence_weights(split.presence, cfg.pos_weight_max)
    assert pw.min() >= 1 and pw.max() <= cfg.pos_weight_max
    losses = []
    for _ in range(40):
        loss, parts = reader_loss(reader, x, y, cfg, pw)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(parts["loss"])
    assert losses[-1] < 0.6 * losses[0]


def test_generated_folders_are_read_with_their_records(tmp_path):
    from PIL import Image

    from training.expert.data import read_generated
    from training.expert.testing import write_fake_generated

    folder = write_fake_generated(tmp_path / "gen", [[Finding("edema", severity="large")]], n=2, seed=7)
    images = read_generated(folder)
    assert [im.seed for im in images] == [7, 8] and images[0].findings == ({"kind": "edema", "severity": "large"},)
    assert images[0].model_version == "fake-v0" and images[0].sampler["steps"] == 10
    (folder / "generation.jsonl").unlink()  # the PNG provenance carries the same record
    assert read_generated(folder) == images
    Image.new("L", (8, 8)).save(folder / "stray.png")
    with pytest.raises(ValueError, match="stray.png: no record"):
        read_generated(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        read_generated(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not found"):
        read_generated(tmp_path / "missing")
