"""cxrgen simulate end to end: MIMIC layout, labels agree with ground truth, resume, loader."""

import gzip
import json
import subprocess
import sys

import pandas as pd
import pytest

from training.data.mimic import MimicCXRDataset
from training.findings import OBSERVATIONS, Finding, labels
from training.simulator.dataset import SimulateConfig, simulate


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim")
    summary = simulate(SimulateConfig(out=str(root), n=6, size=128, seed=3, workers=1), progress=False)
    return root, summary


def rows(root):
    return [json.loads(line) for line in (root / "ground_truth.jsonl").read_text().splitlines()]


def test_writes_the_mimic_layout(ds):
    root, summary = ds
    assert summary["rendered"] == 6
    for name in ("chexpert", "metadata", "split"):
        assert (root / f"mimic-cxr-2.0.0-{name}.csv.gz").is_file()
    jpgs = sorted(root.glob("files/p*/p*/s*/*.jpg"))
    reports = sorted(root.glob("files/p*/p*/s*.txt"))
    assert len(jpgs) == 6 and len(reports) == 6
    meta = pd.read_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz")
    assert set(meta.ViewPosition) <= {"PA", "AP"} and (meta.Rows == 128).all()


def test_labels_and_reports_agree_with_ground_truth(ds):
    root, _ = ds
    chex = pd.read_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz").set_index("study_id")
    for r in rows(root):
        findings = [Finding.from_dict({k: v for k, v in f.items() if k != "params"}) for f in r["findings"]]
        expect = labels(findings)
        assert {o: chex.loc[r["study_id"], o] for o in OBSERVATIONS} == expect
        assert set(r["pose"]) >= {"roll_deg", "yaw_deg", "pitch_deg", "inspiration"}
        text = (root / "files" / f"p{str(r['subject_id'])[:2]}" / f"p{r['subject_id']}" / f"s{r['study_id']}.txt")
        assert "IMPRESSION" in text.read_text() or "FINDINGS" in text.read_text()


def test_loader_reads_what_the_simulator_writes(ds):
    root, _ = ds
    data = MimicCXRDataset(root=str(root), views=("PA", "AP"), size=64, return_ground_truth=True)
    assert len(data) == 6
    item = data[0]
    assert item["image"].shape == (1, 64, 64)
    assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["ground_truth"]["dicom_id"] == item["dicom_id"]
    assert item["prompt"] == item["ground_truth"]["prompt"]


def test_rerun_resumes_and_extends(ds):
    root, _ = ds
    again = simulate(SimulateConfig(out=str(root), n=6, size=128, seed=3, workers=1), progress=False)
    assert again["rendered"] == 0 and again["skipped"] == 6
    # Delete one image: only that one is rendered again, identical to before.
    r = rows(root)[2]
    path = next(root.glob(f"files/p*/p{r['subject_id']}/s{r['study_id']}/{r['dicom_id']}.jpg"))
    before = path.read_bytes()
    path.unlink()
    again = simulate(SimulateConfig(out=str(root), n=6, size=128, seed=3, workers=1), progress=False)
    assert again["rendered"] == 1 and path.read_bytes() == before


def test_same_seed_same_data_set_with_two_workers(ds, tmp_path):
    root, _ = ds
    simulate(SimulateConfig(out=str(tmp_path), n=6, size=128, seed=3, workers=2), progress=False)
    a = {p.name: p.read_bytes() for p in root.glob("files/**/*.jpg")}
    b = {p.name: p.read_bytes() for p in tmp_path.glob("files/**/*.jpg")}
    assert a == b


def test_other_settings_in_the_same_folder_are_refused(ds):
    root, _ = ds
    with pytest.raises(ValueError, match="seed=3, not 4"):
        simulate(SimulateConfig(out=str(root), n=6, size=128, seed=4, workers=1), progress=False)


@pytest.mark.parametrize("args, message", [
    (["--size", "64"], "--size must be between 128 and 512"),
    (["--n", "0"], "--n must be at least 1"),
    (["--real-fraction", "2"], "--real-fraction must be in [0, 1]"),
])
def test_cli_bad_input_is_a_clear_error(tmp_path, args, message):
    proc = subprocess.run([sys.executable, "-m", "training.cli", "simulate", "--out", str(tmp_path / "o"), *args],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_cli_help_says_what_it_writes():
    proc = subprocess.run([sys.executable, "-m", "training.cli", "simulate", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "ground_truth.jsonl" in proc.stdout


def test_contact_sheet(tmp_path):
    from PIL import Image

    from training.simulator.sheet import contact_sheet

    path = contact_sheet(tmp_path / "sheet.png", size=128, columns=2)
    img = Image.open(path)
    assert img.size == (130 + 2 * 128, 13 * (128 + 16))
