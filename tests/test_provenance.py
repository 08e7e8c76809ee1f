"""Provenance-carrying PNG and DICOM writers (training.provenance)."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from training.provenance import (
    BT601_LUMA,
    Provenance,
    read_dicom_provenance,
    read_png_provenance,
    save_dicom,
    save_png,
)

H, W = 23, 17  # odd size: odd pixel-data length in DICOM, padding must not leak into the pixels


def make_prov(**kw) -> Provenance:
    base = dict(model_version="roentgen-sim-v0.3", model_path="/models/roentgen/v0.3", seed=1234,
                prompt="Small left pleural effusion. Heart size normal — no pneumothorax.",
                negative_prompt="blurry", steps=50, guidance_scale=4.0, scheduler="DDIM",
                height=H, width=W, created="2025-02-03T04:05:06+00:00")
    base.update(kw)
    return Provenance(**base)


def ramp(h: int = H, w: int = W) -> np.ndarray:
    return (np.arange(h * w, dtype=np.int64).reshape(h, w) * 7 % 256).astype(np.uint8)


def png_text(path) -> dict:
    with Image.open(path) as im:
        im.load()
        return dict(im.text)


# ---------------------------------------------------------------------------------------- Provenance


def test_provenance_defaults_and_dict_round_trip():
    p = Provenance(model_version="v1", model_path="m", seed=0, prompt="", steps=1, guidance_scale=1,
                   scheduler="DDPM", height=8, width=8)
    assert p.negative_prompt == ""
    assert isinstance(p.guidance_scale, float)
    assert p.generator.startswith("cxrgen")
    assert p.created.endswith("+00:00")
    assert p.prompt_sha256 == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    d = p.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert Provenance.from_dict(d) == p
    assert Provenance.from_dict({**d, "prompt_sha256": p.prompt_sha256}) == p
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.seed = 1  # type: ignore[misc]


@pytest.mark.parametrize("kw, msg", [
    (dict(prompt=None), "prompt"),
    (dict(negative_prompt=None), "negative_prompt"),
    (dict(seed="1"), "seed"),
    (dict(seed=True), "seed"),
    (dict(steps=0), "steps"),
    (dict(height=0), "height"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(created="yesterday"), "created"),
    (dict(created="2025-02-03T04:05:06"), "UTC"),
    (dict(created="2025-02-03T04:05:06+01:00"), "UTC"),
    (dict(findings="effusion"), "findings"),
    (dict(findings=[{"kind": "tumour"}]), "tumour"),
    (dict(findings=[3]), "findings"),
    (dict(scores={"plausibility": float("nan")}), "scores"),
    (dict(scores=[0.5]), "scores"),
])
def test_provenance_rejects_bad_fields(kw, msg):
    with pytest.raises(ValueError, match=msg):
        make_prov(**kw)


def test_from_dict_rejects_missing_unknown_and_wrong_hash():
    d = make_prov().to_dict()
    with pytest.raises(ValueError, match="missing.*seed"):
        Provenance.from_dict({k: v for k, v in d.items() if k != "seed"})
    with pytest.raises(ValueError, match="unknown.*colour"):
        Provenance.from_dict({**d, "colour": "red"})
    with pytest.raises(ValueError, match="prompt_sha256"):
        Provenance.from_dict({**d, "prompt_sha256": "0" * 64})


def test_findings_and_scores_round_trip():
    from training.findings import Finding

    p = make_prov(findings=[Finding("pleural_effusion", "left", "moderate")], scores={"plausibility": 0.75})
    assert p.findings == ({"kind": "pleural_effusion", "side": "left", "severity": "moderate"},)
    d = p.to_dict()
    assert d["findings"] == [{"kind": "pleural_effusion", "side": "left", "severity": "moderate"}]
    assert Provenance.from_json(p.to_json()) == p
    old = {k: v for k, v in d.items() if k not in ("findings", "scores")}  # files written before issue 7
    assert Provenance.from_dict(old).findings == () and Provenance.from_dict(old).scores == {}


# ---------------------------------------------------------------------------------------------- PNG


def test_png_round_trip_pixels_and_provenance(tmp_path):
    prov = make_prov()
    img = ramp()
    out = save_png(img, tmp_path / "sub" / "a.png", prov)
    assert out == tmp_path / "sub" / "a.png"
    with Image.open(out) as im:
        assert im.format == "PNG" and im.mode == "L"
        np.testing.assert_array_equal(np.asarray(im), img)
    assert read_png_provenance(out) == prov
    assert [p.name for p in out.parent.iterdir()] == ["a.png"]  # no temporary file left behind


def test_png_text_chunks(tmp_path):
    prov = make_prov()
    text = png_text(save_png(ramp(), tmp_path / "a.png", prov))
    assert text["synthetic"] == "true"
    assert text["cxrgen:model_version"] == prov.model_version
    assert text["cxrgen:seed"] == "1234"
    assert text["cxrgen:prompt_sha256"] == prov.prompt_sha256
    assert text["cxrgen:prompt"] == prov.prompt  # non-ASCII (an em dash) survives via iTXt
    assert json.loads(text["cxrgen:provenance"]) == prov.to_dict()
    assert text["Software"] == prov.generator
    assert "SYNTHETIC" in text["Description"]


def test_png_float_input_is_rounded(tmp_path):
    prov = make_prov(height=2, width=3)
    x = np.array([[0.0, 0.5, 1.0], [0.1, 1 / 255, 0.999]], dtype=np.float32)
    out = save_png(x, tmp_path / "f.png", prov)
    with Image.open(out) as im:
        got = np.asarray(im)
    np.testing.assert_array_equal(got, np.rint(x.astype(np.float64) * 255).astype(np.uint8))
    assert got[0].tolist() == [0, 128, 255]


def test_png_channel_inputs(tmp_path):
    prov = make_prov()
    img = ramp()
    with Image.open(save_png(img[:, :, None], tmp_path / "c1.png", prov)) as im:
        np.testing.assert_array_equal(np.asarray(im), img)
    # gray replicated in three channels stays exactly the same gray (luma weights sum to 1)
    with Image.open(save_png(np.repeat(img[:, :, None], 3, axis=2), tmp_path / "c3.png", prov)) as im:
        np.testing.assert_array_equal(np.asarray(im), img)
    # real colour: ITU-R BT.601 luma, and PIL's convert("L") agrees within 1 grey level
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    with Image.open(save_png(rgb, tmp_path / "rgb.png", prov)) as im:
        got = np.asarray(im)
    want = np.rint(rgb.astype(np.float64) @ np.array(BT601_LUMA)).astype(np.uint8)
    np.testing.assert_array_equal(got, want)
    pil = np.asarray(Image.fromarray(rgb).convert("L"))
    assert np.abs(got.astype(int) - pil.astype(int)).max() <= 1
    # float RGB in [0, 1]
    with Image.open(save_png(rgb / 255.0, tmp_path / "rgbf.png", prov)) as im:
        np.testing.assert_array_equal(np.asarray(im), want)


@pytest.mark.parametrize("image, msg", [
    (np.zeros((H,), np.uint8), "2-D"),
    (np.zeros((1, H, W), np.uint8), "channel-first"),
    (np.zeros((H, W, 4), np.uint8), "HxWx3"),
    (np.zeros((H, W, 3, 1), np.uint8), "4-D"),
    (np.zeros((0, W), np.uint8), "empty"),
    (np.zeros((H, W), np.uint16), "uint8"),
    (np.zeros((H, W), bool), "dtype"),
    (np.full((H, W), np.nan), "non-finite"),
    (np.full((H, W), np.inf, np.float32), "non-finite"),
    (np.full((H, W), 1.5), r"\[0, 1\]"),
    (np.full((H, W), -0.01), r"\[0, 1\]"),
    (np.zeros((W, H), np.uint8), "provenance says"),
])
def test_bad_images_raise(tmp_path, image, msg):
    with pytest.raises(ValueError, match=msg):
        save_png(image, tmp_path / "x.png", make_prov())
    assert not any(tmp_path.iterdir())  # nothing written, no temporary file left


def test_bad_prov_raises(tmp_path):
    with pytest.raises(ValueError, match="Provenance"):
        save_png(ramp(), tmp_path / "x.png", {"seed": 1})


def test_read_plain_png_names_the_file(tmp_path):
    plain = tmp_path / "plain.png"
    Image.fromarray(ramp()).save(plain)
    with pytest.raises(ValueError, match="plain.png"):
        read_png_provenance(plain)
    jpg = tmp_path / "photo.jpg"
    Image.fromarray(ramp()).save(jpg)
    with pytest.raises(ValueError, match="photo.jpg"):
        read_png_provenance(jpg)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="junk.png"):
        read_png_provenance(junk)


def test_png_overwrite_is_atomic_replace(tmp_path):
    path = tmp_path / "a.png"
    save_png(ramp(), path, make_prov(seed=1))
    save_png(ramp(), path, make_prov(seed=2))
    assert read_png_provenance(path).seed == 2
    assert sorted(os.listdir(tmp_path)) == ["a.png"]


# -------------------------------------------------------------------------------------------- DICOM

try:
    import pydicom
except ImportError:  # pydicom is not (yet) a declared dependency of cxrgen; PNG tests still run
    pydicom = None
needs_pydicom = pytest.mark.skipif(pydicom is None, reason="pydicom not installed")


def _save_dicom_strict(image, path, prov):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pydicom's value validation warns on invalid VR values
        return save_dicom(image, path, prov)


@needs_pydicom
def test_dicom_round_trip(tmp_path):
    prov = make_prov()
    img = ramp()
    out = _save_dicom_strict(img, tmp_path / "a.dcm", prov)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = pydicom.dcmread(out)
        pixels = ds.pixel_array
    np.testing.assert_array_equal(pixels, img)
    assert pixels.dtype == np.uint8
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert "DERIVED" in ds.ImageType and "SECONDARY" in ds.ImageType
    assert "SYNTHETIC" in ds.SeriesDescription and prov.model_version in ds.SeriesDescription
    assert ds.ConversionType == "SYN" and ds.Modality == "OT"
    assert ds.BurnedInAnnotation == "NO"
    assert str(ds.PatientName) == "SYNTHETIC^CXRGEN" and ds.PatientID == "CXRGEN-SEED-1234"
    assert ds.ContentDate == "20250203" and ds.ContentTime == "040506"
    assert ds.ImageComments == prov.prompt
    assert (ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored,
            ds.HighBit, ds.PixelRepresentation) == ("MONOCHROME2", 1, 8, 8, 7, 0)
    assert (ds.Rows, ds.Columns) == (H, W)
    block = ds.private_block(0x0011, "CXRGEN")
    assert json.loads(block[0x02].value) == prov.to_dict()
    assert block[0x03].value == prov.prompt_sha256
    assert read_dicom_provenance(out) == prov


@needs_pydicom
def test_dicom_float_and_rgb_inputs(tmp_path):
    prov = make_prov()
    img = ramp()
    out = _save_dicom_strict(img / 255.0, tmp_path / "f.dcm", prov)
    np.testing.assert_array_equal(pydicom.dcmread(out).pixel_array, img)
    out = _save_dicom_strict(np.repeat(img[:, :, None], 3, axis=2), tmp_path / "c.dcm", prov)
    np.testing.assert_array_equal(pydicom.dcmread(out).pixel_array, img)


@needs_pydicom
def test_dicom_new_uid_per_save(tmp_path):
    prov = make_prov()
    a = pydicom.dcmread(save_dicom(ramp(), tmp_path / "a.dcm", prov))
    b = pydicom.dcmread(save_dicom(ramp(), tmp_path / "b.dcm", prov))
    assert a.SOPInstanceUID != b.SOPInstanceUID
    assert a.SeriesInstanceUID != b.SeriesInstanceUID


@needs_pydicom
def test_dicom_long_and_odd_prompt(tmp_path):
    prompt = "Bilateral effusions \\ edema; 肺水肿. " * 600  # > 10240 characters, backslash, CJK
    prov = make_prov(prompt=prompt, model_version="v" * 100)
    out = _save_dicom_strict(ramp(), tmp_path / "long.dcm", prov)
    ds = pydicom.dcmread(out)
    assert len(ds.ImageComments) == 10240 and prompt.startswith(ds.ImageComments)
    assert len(ds.SeriesDescription) <= 64 and ds.SeriesDescription.startswith("SYNTHETIC")
    assert read_dicom_provenance(out) == prov  # the full prompt is in the JSON


@needs_pydicom
def test_dicom_bad_input_and_foreign_files(tmp_path):
    with pytest.raises(ValueError, match="non-finite"):
        save_dicom(np.full((H, W), np.nan), tmp_path / "x.dcm", make_prov())
    assert not any(tmp_path.iterdir())
    foreign = tmp_path / "foreign.dcm"
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.PatientName = "X"
    ds.save_as(foreign, enforce_file_format=True)
    with pytest.raises(ValueError, match="foreign.dcm.*CXRGEN"):
        read_dicom_provenance(foreign)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="junk.dcm"):
        read_dicom_provenance(junk)


def test_written_files_get_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        png = save_png(ramp(), tmp_path / "a.png", make_prov())
    finally:
        os.umask(umask)
    assert png.stat().st_mode & 0o777 == 0o644
