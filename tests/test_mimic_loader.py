"""training.data.mimic on a tiny MIMIC-CXR-JPG layout built in tmp_path."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from training.data import mimic
from training.data.mimic import (
    CHEXPERT_CSV, METADATA_CSV, SPLIT_CSV, LoaderConfig, MimicCXRDataset, parse_report, report_prompt,
)
from training.findings import OBSERVATIONS

NAN = float("nan")
IDX = {o: j for j, o in enumerate(OBSERVATIONS)}

# (dicom_id, subject_id, study_id, ViewPosition, split, (width, height))
IMAGES = [
    ("d1", 10000032, 50000001, "PA", "train", (48, 48)),
    ("d2", 10000032, 50000001, "LATERAL", "train", (48, 48)),
    ("d3", 10000032, 50000002, "AP", "validate", (48, 48)),
    ("d4", 11000011, 50000003, "PA", "test", (40, 80)),  # portrait: letterboxed
    ("d5", 11000011, 50000004, "", "train", (48, 48)),  # missing ViewPosition
    ("d6", 11000011, 50000004, "WEIRD", "train", (48, 48)),  # unknown view: fine unless asked for
]

# Study A: No Finding with blanks (cleared), a stated -1 (kept) and blank devices (not cleared).
# Study B: positive, uncertain, negative. Study C has no CheXpert row at all.
CHEXPERT = {
    (10000032, 50000001): {"No Finding": 1.0, "Pleural Effusion": 0.0, "Lung Opacity": -1.0},
    (10000032, 50000002): {"Cardiomegaly": 1.0, "Edema": -1.0, "Pneumonia": 0.0, "Support Devices": 1.0},
    (11000011, 50000004): {"Fracture": 1.0},
}

REPORTS = {
    (10000032, 50000001): (
        "                                 FINAL REPORT\n"
        " EXAMINATION:  CHEST (PA AND LAT)\n\n"
        " INDICATION:  ___F with cough\n\n"
        " FINDINGS:  PA and lateral views of the chest. The lungs are clear\n"
        " without focal consolidation.\n\n"
        " IMPRESSION:  No acute cardiopulmonary\n process.\n"
    ),
    (10000032, 50000002): (  # no IMPRESSION
        "                                 FINAL REPORT\n"
        " INDICATION:  Dyspnea.\n\n"
        " FINDINGS:  The heart is enlarged. Mild interstitial edema is not excluded.\n"
    ),
    (11000011, 50000003): " EXAMINATION:  CHEST (PORTABLE AP)\n\n INDICATION:  Line placement.\n",  # neither
    (11000011, 50000004): " IMPRESSION:  Healing left rib fracture.\n",
}


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    df.to_csv(path, index=False)  # .gz suffix -> gzip, as in MIMIC-CXR-JPG


def base_tables() -> dict[str, pd.DataFrame]:
    """The three CSVs, rows deliberately out of order (the loader must sort)."""
    order = [3, 0, 5, 2, 1, 4]
    meta = pd.DataFrame(
        [{"dicom_id": IMAGES[k][0], "subject_id": IMAGES[k][1], "study_id": IMAGES[k][2],
          "PerformedProcedureStepDescription": "CHEST (PA AND LAT)", "ViewPosition": IMAGES[k][3] or None,
          "Rows": IMAGES[k][5][1], "Columns": IMAGES[k][5][0], "StudyDate": 21800506, "StudyTime": 213014.531}
         for k in order])
    split = pd.DataFrame([{"dicom_id": d, "study_id": st, "subject_id": su, "split": sp}
                          for d, su, st, _, sp, _ in IMAGES])
    rows = [{"subject_id": su, "study_id": st, **{o: v.get(o, NAN) for o in OBSERVATIONS}}
            for (su, st), v in reversed(list(CHEXPERT.items()))]
    return {METADATA_CSV: meta, SPLIT_CSV: split, CHEXPERT_CSV: pd.DataFrame(rows)}


def make_root(base: Path, tables: dict[str, pd.DataFrame] | None = None, reports: bool = True) -> Path:
    """A MIMIC-CXR-JPG folder with images, CSVs, reports and ground_truth.jsonl."""
    root = base / "mimic-cxr-jpg"
    for name, df in (tables or base_tables()).items():
        root.mkdir(parents=True, exist_ok=True)
        _write_csv(df, root / name)
    rng = np.random.default_rng(0)
    with open(root / "ground_truth.jsonl", "w") as f:
        for d, su, st, _, _, (w, h) in IMAGES:
            path = mimic.image_path(root, su, st, d)
            path.parent.mkdir(parents=True, exist_ok=True)
            # A bright image with a dark corner patch, so the [lo, hi] range is exercised.
            arr = np.full((h, w), 255, np.uint8) if d == "d4" else rng.integers(0, 256, (h, w), dtype=np.uint8)
            Image.fromarray(arr, "L").save(path, "JPEG", quality=95)
            f.write(json.dumps({"dicom_id": d, "findings": [{"kind": "nodule", "lobe": "RUL"}]}) + "\n")
    if reports:
        write_reports(root)
    return root


def write_reports(report_root: Path) -> None:
    for (su, st), text in REPORTS.items():
        p = report_root / mimic.study_dir(su, st).with_suffix(".txt")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_root(tmp_path)


def by_id(ds: MimicCXRDataset) -> dict[str, dict]:
    return {ds[i]["dicom_id"]: ds[i] for i in range(len(ds))}


def rewrite(root: Path, name: str, edit) -> None:
    """Re-write one CSV as ``edit(df)`` returns it (df read as strings, blanks as "")."""
    df = pd.read_csv(root / name, dtype=str, keep_default_na=False)
    _write_csv(edit(df), root / name)


# ------------------------------------------------------------------- selection


def test_length_under_view_and_split_filters(root: Path) -> None:
    assert len(MimicCXRDataset(root=root)) == 3  # PA, AP by default: d1, d3, d4
    assert len(MimicCXRDataset(root=root, views=("PA",))) == 2
    assert len(MimicCXRDataset(root=root, views="LATERAL")) == 1
    assert len(MimicCXRDataset(root=root, views=("",))) == 1  # missing ViewPosition
    assert len(MimicCXRDataset(root=root, views=None)) == 6
    assert len(MimicCXRDataset(root=root, split="train")) == 1
    assert len(MimicCXRDataset(root=root, views=None, split="train")) == 4
    assert len(MimicCXRDataset(root=root, split="test")) == 1
    assert [s["dicom_id"] for s in MimicCXRDataset(root=root, split="validate")] == ["d3"]


def test_order_is_sorted_and_config_or_kwargs_agree(root: Path) -> None:
    a = MimicCXRDataset(LoaderConfig(root=root, views=None))
    b = MimicCXRDataset(LoaderConfig(root=str(root), views=("PA",)), views=None)  # kwargs override
    assert list(a.frame["dicom_id"]) == ["d1", "d2", "d3", "d4", "d5", "d6"] == list(b.frame["dicom_id"])


def test_unknown_requested_view_lists_known(root: Path) -> None:
    with pytest.raises(ValueError, match="WEIRD.*LATERAL"):
        MimicCXRDataset(root=root, views=("PA", "WEIRD"))
    with pytest.raises(ValueError, match="split"):
        LoaderConfig(root=root, split="val")


def test_empty_selection_names_the_filter(root: Path) -> None:
    with pytest.raises(ValueError, match=r"view filter \['LL'\]"):
        MimicCXRDataset(root=root, views=("LL",))
    with pytest.raises(ValueError, match="split filter 'validate'"):
        MimicCXRDataset(root=root, views=("PA",), split="validate")


# ---------------------------------------------------------------------- labels


def _labels(root: Path, **kw) -> dict[str, np.ndarray]:
    ds = MimicCXRDataset(root=root, views=None, prompt_sections=(), **kw)
    out = {}
    for s in ds:
        assert s["labels"].dtype == torch.float32 and s["labels"].shape == (14,)
        assert torch.equal(s["label_mask"], ~torch.isnan(s["labels"]))
        out[s["dicom_id"]] = s["labels"].numpy()
    return out


def _eq(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@pytest.mark.parametrize("uncertain,blank", [(u, b) for u in ("nan", "zero", "one") for b in ("nan", "zero")])
def test_label_policies(root: Path, uncertain: str, blank: str) -> None:
    u = {"nan": NAN, "zero": 0.0, "one": 1.0}[uncertain]
    bl = {"nan": NAN, "zero": 0.0}[blank]
    lab = _labels(root, uncertain=uncertain, blank=blank)
    a, b, c = lab["d1"], lab["d3"], lab["d4"]
    # Study A: No Finding = 1 clears blank pathologies but not devices nor a stated -1.
    assert a[IDX["No Finding"]] == 1 and a[IDX["Cardiomegaly"]] == 0 and a[IDX["Pleural Effusion"]] == 0
    assert _eq(a[IDX["Lung Opacity"]], u)
    assert _eq(a[IDX["Support Devices"]], bl)
    # Study B: 1, -1, 0 and blanks.
    assert b[IDX["Cardiomegaly"]] == 1 and b[IDX["Support Devices"]] == 1 and b[IDX["Pneumonia"]] == 0
    assert _eq(b[IDX["Edema"]], u)
    assert _eq(b[IDX["No Finding"]], bl) and _eq(b[IDX["Atelectasis"]], bl)
    # Study C has no CheXpert row: all blank.
    assert all(_eq(x, bl) for x in c)
    assert np.array_equal(lab["d1"], lab["d2"], equal_nan=True)  # labels are per study


def test_label_mask_and_counts(root: Path) -> None:
    ds = MimicCXRDataset(root=root, views=None, uncertain="one", prompt_sections=())
    s = {x["dicom_id"]: x for x in ds}["d3"]
    assert s["label_mask"].tolist() == [o in ("Cardiomegaly", "Edema", "Pneumonia", "Support Devices")
                                        for o in OBSERVATIONS]
    counts = ds.class_counts()
    assert list(counts) == list(OBSERVATIONS)
    # d1, d2 (No Finding; Lung Opacity -1 -> 1 under U-Ones), d3 (Cardiomegaly, Edema, devices), d5, d6 (Fracture)
    assert counts["No Finding"] == 2 and counts["Lung Opacity"] == 2 and counts["Edema"] == 1
    assert counts["Fracture"] == 2 and counts["Pleural Effusion"] == 0
    lf = ds.labels_frame()
    assert list(lf.columns[:5]) == ["dicom_id", "subject_id", "study_id", "view", "split"]
    assert list(lf.columns[5:]) == list(OBSERVATIONS) and len(lf) == 6
    assert lf.loc[lf.dicom_id == "d3", "Edema"].item() == 1.0


def test_apply_label_policy_direct() -> None:
    raw = np.full((1, 14), np.nan, np.float32)
    raw[0, IDX["No Finding"]] = 1
    out = mimic.apply_label_policy(raw, "nan", "nan")
    assert np.isnan(out[0, IDX["Support Devices"]]) and out[0, IDX["Fracture"]] == 0
    assert np.isnan(raw).sum() == 13  # input untouched


# --------------------------------------------------------------------- prompts


def test_prompt_impression_then_findings(root: Path) -> None:
    s = by_id(MimicCXRDataset(root=root, views=None))
    assert s["d1"]["prompt"] == ("No acute cardiopulmonary process. "
                                 "PA and lateral views of the chest. The lungs are clear without focal consolidation.")
    assert s["d3"]["prompt"] == "The heart is enlarged. Mild interstitial edema is not excluded."  # only FINDINGS
    assert s["d4"]["prompt"] == ""  # neither section
    assert s["d5"]["prompt"] == "Healing left rib fracture."
    f = by_id(MimicCXRDataset(root=root, prompt_sections=("findings", "impression"), max_prompt_chars=40))
    assert f["d1"]["prompt"] == "PA and lateral views of the chest. The"


def test_parse_report_sections() -> None:
    sec = parse_report(REPORTS[(10000032, 50000001)])
    assert sec["preamble"] == "FINAL REPORT" and sec["examination"] == "CHEST (PA AND LAT)"
    assert sec["indication"] == "___F with cough"
    assert parse_report(" FINDINGS AND IMPRESSION:  Clear lungs.\n")["impression"] == "Clear lungs."
    assert report_prompt({"impression": "a b c"}, ("impression",), 3) == "a b"


def test_reports_found_beside_root(tmp_path: Path) -> None:
    root = make_root(tmp_path, reports=False)
    write_reports(tmp_path / "mimic-cxr-reports")
    assert MimicCXRDataset(root=root, split="validate")[0]["prompt"].startswith("The heart is enlarged.")
    elsewhere = tmp_path / "my-reports"
    write_reports(elsewhere)
    assert MimicCXRDataset(root=root, split="validate", report_root=elsewhere)[0]["prompt"]
    with pytest.raises(FileNotFoundError, match="s50000002.txt"):
        MimicCXRDataset(root=root, split="validate", report_root=tmp_path / "nowhere")[0]


# ---------------------------------------------------------------------- images


@pytest.mark.parametrize("normalize,lo,hi", [("unit", -1, 1), ("xrv", -1024, 1024), ("none", 0, 1)])
def test_image_shape_and_range(root: Path, normalize: str, lo: float, hi: float) -> None:
    ds = MimicCXRDataset(root=root, views=None, size=32, normalize=normalize)
    for s in ds:
        x = s["image"]
        assert x.shape == (1, 32, 32) and x.dtype == torch.float32
        assert x.min() >= lo and x.max() <= hi
    x = by_id(ds)["d4"]["image"]  # white portrait: pad is lo, the image hi
    assert x[0, 16, 0].item() == pytest.approx(lo, abs=1e-3 * (hi - lo))
    assert x[0, 16, 16].item() == pytest.approx(hi, abs=2e-2 * (hi - lo))


def test_non_square_image_is_letterboxed(root: Path) -> None:
    x = by_id(MimicCXRDataset(root=root, size=32, normalize="none"))["d4"]["image"][0]
    # 40 wide x 80 tall -> 80 x 80 with 20 px black each side -> 8 px each side at 32.
    cols = x.mean(dim=0)
    assert torch.all(cols[:7] < 0.02) and torch.all(cols[-7:] < 0.02)
    assert torch.all(cols[9:23] > 0.97)
    assert torch.all(x[:, 16] > 0.97)  # full height kept: no vertical padding


def test_transform_hook_and_collate(root: Path) -> None:
    ds = MimicCXRDataset(root=root, size=16, transform=lambda t: t.flip(-1) * 0 + 7)
    assert torch.all(ds[0]["image"] == 7)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["image"].shape == (3, 1, 16, 16) and batch["labels"].shape == (3, 14)
    assert batch["dicom_id"] == ["d1", "d3", "d4"] and batch["view"] == ["PA", "AP", "PA"]


def test_ground_truth(root: Path) -> None:
    s = MimicCXRDataset(root=root, return_ground_truth=True)[0]
    assert s["ground_truth"] == {"dicom_id": "d1", "findings": [{"kind": "nodule", "lobe": "RUL"}]}
    assert "ground_truth" not in MimicCXRDataset(root=root)[0]
    lines = (root / "ground_truth.jsonl").read_text().splitlines()
    (root / "ground_truth.jsonl").write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(ValueError, match="ground_truth.jsonl.*'d1'"):
        MimicCXRDataset(root=root, return_ground_truth=True)
    (root / "ground_truth.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="ground_truth.jsonl"):
        MimicCXRDataset(root=root, return_ground_truth=True)


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", [CHEXPERT_CSV, METADATA_CSV, SPLIT_CSV])
def test_missing_csv_names_file(root: Path, name: str) -> None:
    (root / name).unlink()
    with pytest.raises(FileNotFoundError, match=name.replace(".", r"\.")):
        MimicCXRDataset(root=root)


@pytest.mark.parametrize("name,col", [(METADATA_CSV, "ViewPosition"), (SPLIT_CSV, "split"),
                                      (CHEXPERT_CSV, "Pleural Effusion")])
def test_missing_column_names_file_and_column(root: Path, name: str, col: str) -> None:
    rewrite(root, name, lambda df: df.drop(columns=[col]))
    with pytest.raises(ValueError, match=f"{name}.*{col}"):
        MimicCXRDataset(root=root)


def test_non_numeric_subject_id_names_file_column_row(root: Path) -> None:
    rewrite(root, METADATA_CSV, lambda df: df.assign(subject_id=df["subject_id"].where(df.index != 1, "p100")))
    with pytest.raises(ValueError, match=f"{METADATA_CSV}: column 'subject_id', row 2.*'p100'"):
        MimicCXRDataset(root=root)


def test_bad_label_names_file_column_row(root: Path) -> None:
    rewrite(root, CHEXPERT_CSV, lambda df: df.assign(Edema=df["Edema"].where(df.index != 2, "2.0")))
    with pytest.raises(ValueError, match=f"{CHEXPERT_CSV}: column 'Edema', row 3.*'2.0'"):
        MimicCXRDataset(root=root)


def test_corrupt_gzip_names_file(root: Path) -> None:
    (root / SPLIT_CSV).write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=SPLIT_CSV):
        MimicCXRDataset(root=root)


def test_missing_image_names_file_and_metadata_row(root: Path) -> None:
    path = mimic.image_path(root, 10000032, 50000002, "d3")
    path.unlink()
    ds = MimicCXRDataset(root=root)  # construction does not touch images
    with pytest.raises(FileNotFoundError, match=r"d3\.jpg.*metadata row 4 .*dicom_id d3"):
        ds[1]


def test_corrupt_image_names_file(root: Path) -> None:
    path = mimic.image_path(root, 10000032, 50000001, "d1")
    path.write_bytes(path.read_bytes()[:200])  # truncated JPEG
    with pytest.raises(ValueError, match=r"d1\.jpg"):
        MimicCXRDataset(root=root)[0]
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"d1\.jpg"):
        MimicCXRDataset(root=root)[0]


def test_csvs_are_gzipped(root: Path) -> None:
    with gzip.open(root / CHEXPERT_CSV, "rt") as f:
        assert f.readline().startswith("subject_id,study_id,No Finding,")
