"""TensorRT engines (issue 10, section 3).

Without a GPU only the stamp / mismatch logic runs: the machine lookup (``current_platform``) is
replaced, the checks themselves are the real ones. The GPU tests build engines from a micro export
and compare with the torch pipeline (PSNR >= 35 dB in fp16); they skip with the reason elsewhere.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from export import tensorrt as ext
from export.folder import ExportConfig
from export.onnx_export import export_onnx
from micro_model import micro_checkpoint

H100 = {"tensorrt": "11.4.0.106", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from export.testing import micro_rewards

    root = tmp_path_factory.mktemp("trt")
    ckpt = micro_checkpoint(root / "ckpt", "micro-trt", reports=300)
    out = export_onnx(ExportConfig(checkpoint=str(ckpt), out=str(root / "onnx"), fp16=True,
                                   reward_dir=str(micro_rewards(root / "rewards"))))
    return ckpt, out


def fake_engines(export_dir, platform, tmp_path):
    """A copy of the export with an engine file and a stamp for ``platform`` per graph (no TensorRT)."""
    from export.folder import read_export

    folder = tmp_path / "export"
    shutil.copytree(export_dir, folder)
    export = read_export(folder)
    for name, entry, precision in ext.engine_plan(export):
        path = ext.engine_path(export, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not a real engine")
        ext.write_stamp(path, platform, entry["file"], entry["sha256"], precision,
                        ext.profile_shapes(name, entry, 16, 4))
    return folder


def test_engine_plan_is_fp16_where_the_export_has_it_and_fp32_for_the_decoder(exported):
    from export.folder import read_export

    plan = {n: (e["file"], p) for n, e, p in ext.engine_plan(read_export(exported[1]))}
    assert plan["unet"] == ("unet.fp16.onnx", "fp16") and plan["text_encoder"] == ("text_encoder.fp16.onnx", "fp16")
    assert plan["vae_decoder"] == ("vae_decoder.onnx", "fp32")
    assert {n for n in plan if n.startswith("rewards/")} == {f"rewards/{k}" for k in
                                                           ("plausibility", "comparative", "posture", "diagnosis",
                                                            "consistency")}


def test_profiles_cover_batch_1_to_16_and_the_guided_unet_to_32(exported):
    from export.folder import read_export

    export = read_export(exported[1])
    unet = ext.profile_shapes("unet", export.graph("unet"), 16, 4)
    assert unet["sample"] == [[1, 4, 4, 4], [2, 4, 4, 4], [32, 4, 4, 4]]
    assert unet["timestep"] == [[1], [2], [32]]
    text = ext.profile_shapes("text_encoder", export.graph("text_encoder"), 16, 4)
    assert text["input_ids"][0][0] == 1 and text["input_ids"][2][0] == 16
    consistency = ext.profile_shapes("rewards/consistency", export.rewards["consistency"], 16, 4)
    assert consistency["text_ids"][0] == [1, 1] and consistency["text_ids"][2][0] == 16


def test_a_matching_engine_is_kept(exported, tmp_path, monkeypatch):
    folder = fake_engines(exported[1], H100, tmp_path)
    monkeypatch.setattr(ext, "current_platform", lambda device=0: dict(H100))
    kept = ext.build_engines(folder)  # nothing to build: every engine is stamped for this machine
    assert set(kept.values()) == {"kept"} and "unet" in kept


@pytest.mark.parametrize("field, value, message", [
    ("tensorrt", "10.13.3.9", "tensorrt '11.4.0.106' (this machine: '10.13.3.9')"),
    ("gpu", "NVIDIA H200", "gpu 'NVIDIA H100 80GB HBM3' (this machine: 'NVIDIA H200')"),
    ("compute_capability", "10.0", "compute_capability '9.0' (this machine: '10.0')"),
])
def test_a_mismatched_engine_is_refused_with_the_reason(exported, tmp_path, monkeypatch, field, value, message):
    folder = fake_engines(exported[1], H100, tmp_path)
    monkeypatch.setattr(ext, "current_platform", lambda device=0: {**H100, field: value})
    with pytest.raises(ext.EngineMismatch) as build:
        ext.build_engines(folder)
    with pytest.raises(ext.EngineMismatch) as run:
        ext.load(folder, device="cuda")  # the runner refuses it too, before deserialising anything
    for e in (build.value, run.value):
        assert message in str(e) and f"cxrgen export tensorrt {folder} --rebuild" in str(e)


def test_changed_onnx_or_missing_stamp_is_refused(exported, tmp_path, monkeypatch):
    folder = fake_engines(exported[1], H100, tmp_path)
    monkeypatch.setattr(ext, "current_platform", lambda device=0: dict(H100))
    doc = json.loads((folder / "export.json").read_text())
    doc["graphs"]["vae_decoder"]["sha256"] = "0" * 64  # as if re-exported after the engines were built
    (folder / "export.json").write_text(json.dumps(doc))
    with pytest.raises(ext.EngineMismatch, match="vae_decoder.onnx has changed since the build"):
        ext.build_engines(folder)
    (folder / "tensorrt" / "rewards" / "posture.engine.json").unlink()
    with pytest.raises(ext.EngineMismatch, match="posture.engine has no stamp"):
        ext.check_stamp(folder / "tensorrt" / "rewards" / "posture.engine", H100)


def test_missing_engines_name_the_command(exported, monkeypatch):
    monkeypatch.setattr(ext, "current_platform", lambda device=0: dict(H100))
    with pytest.raises(ext.ExportError, match="build them with `cxrgen export tensorrt"):
        ext.load(exported[1], device="cuda")
    with pytest.raises(ext.ExportError, match="pass --device cuda"):
        ext.load(exported[1], device="cpu")


# --------------------------------------------------------------------------- on a GPU


def needs_tensorrt():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (TensorRT engines are built for the GPU they run on)")
    pytest.importorskip("tensorrt", reason="TensorRT is not installed: pip install -e '.[gpu]' on a GPU machine")


@pytest.mark.gpu
def test_tensorrt_engines_match_torch(exported):
    needs_tensorrt()
    from test_export import PROMPTS, psnr, torch_images

    ckpt, out = exported
    built = ext.build_engines(out, max_batch=4)
    assert set(built.values()) == {"built"}
    stamp = json.loads((out / "tensorrt" / "unet.engine.json").read_text())
    assert stamp == {**stamp, **ext.current_platform()} and stamp["precision"] == "fp16"
    assert set(ext.build_engines(out, max_batch=4).values()) == {"kept"}  # second call: nothing to do
    pipe = ext.load(out, device="cuda")
    pipe.set_scheduler("ddim")
    got = pipe.generate(PROMPTS, 5, 3, 3.0, "", 2, pipe.native_size)
    assert psnr(got, torch_images(ckpt, PROMPTS)) >= 35


@pytest.mark.gpu
def test_onnxruntime_cuda_provider_matches_torch(exported):
    torch = pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")
    if not torch.cuda.is_available() or "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs a CUDA GPU and onnxruntime-gpu (pip install -e '.[gpu]')")
    from export.ort import load
    from test_export import PROMPTS, psnr, torch_images

    ckpt, out = exported
    for precision, floor in (("fp32", 40), ("fp16", 35)):
        pipe = load(out, device="cuda", precision=precision)
        pipe.set_scheduler("ddim")
        got = pipe.generate(PROMPTS, 5, 3, 3.0, "", 2, pipe.native_size)
        assert psnr(got, torch_images(ckpt, PROMPTS)) >= floor, precision
    assert np.isfinite(got).all()
