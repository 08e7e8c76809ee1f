"""ONNX export and the onnxruntime backend (issue 10, sections 1, 2 and 6): parity with the torch pipeline.

Tolerances are the issue's: U-Net output max abs difference <= 1e-3 (fp32), final image PSNR >= 40 dB,
reward scores within 1e-3; fp16 graphs PSNR >= 35 dB.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.testing import psnr
from micro_model import MICRO, micro_checkpoint
from training.cli import main as cli
from training.generation import DEFAULT_MODEL, generate, set_scheduler
from training.model.checkpoint import load_pipeline

PROMPTS = ["left pleural effusion", "no acute cardiopulmonary process", "cardiomegaly"]


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A micro checkpoint, micro rewards, and its export through the CLI (fp16 variant too)."""
    from export.testing import micro_rewards

    root = tmp_path_factory.mktemp("export")
    ckpt = micro_checkpoint(root / "ckpt", "micro-export", reports=300)
    rewards = micro_rewards(root / "rewards")
    out = root / "onnx"
    assert cli(["export", "onnx", str(ckpt), str(out), "--fp16", "--reward-dir", str(rewards)]) == 0
    return ckpt, rewards, out


@pytest.fixture(scope="module")
def micro_ace(micro, tmp_path_factory):
    """The micro checkpoint with ACE condition tokens (training.align.ace), exported without rewards."""
    from export.folder import ExportConfig
    from export.onnx_export import export_onnx
    from training.align.ace import ConditionTokens

    root = tmp_path_factory.mktemp("ace")
    ckpt = root / "ckpt"
    shutil.copytree(micro[0], ckpt)
    torch.manual_seed(1)
    ConditionTokens(3, MICRO.text_hidden, init_std=1.0).save(ckpt)
    return ckpt, export_onnx(ExportConfig(checkpoint=str(ckpt), out=str(root / "onnx"), rewards=False))


@pytest.fixture(scope="module")
def default_export(tmp_path_factory):
    """The committed embedded model and its rewards, exported (the real architecture, 128 px)."""
    from export.folder import ExportConfig
    from export.onnx_export import export_onnx

    return export_onnx(ExportConfig(checkpoint=str(DEFAULT_MODEL), out=str(tmp_path_factory.mktemp("d") / "onnx")))


def torch_images(ckpt, prompts, scheduler="ddim", steps=3, guidance=3.0, negative="", size=None):
    pipe, _ = load_pipeline(ckpt)
    set_scheduler(pipe, scheduler)
    return generate(pipe, prompts, 5, steps, guidance, negative, 2, size or pipe.vae.config.sample_size)


def ort_images(export_dir, prompts, scheduler="ddim", steps=3, guidance=3.0, negative="", size=None,
               precision="fp32"):
    from export.ort import load

    pipe = load(export_dir, precision=precision)
    pipe.set_scheduler(scheduler)
    return pipe.generate(prompts, 5, steps, guidance, negative, 2, size or pipe.native_size)


# ------------------------------------------------------------------------------ the folder


def test_export_folder_is_self_describing(micro):
    ckpt, _, out = micro
    doc = json.loads((out / "export.json").read_text())
    assert doc["source"]["checkpoint"] == str(ckpt.resolve()) and doc["source"]["version"] == "micro-export"
    assert json.loads((out / "cxrgen_manifest.json").read_text())["version"] == "micro-export"
    assert (out / "tokenizer" / "tokenizer_config.json").is_file()
    assert (out / "scheduler" / "scheduler_config.json").is_file()
    assert doc["opset"] >= 17 and {"torch", "onnx", "onnxruntime"} <= set(doc["versions"])
    assert set(doc["graphs"]) == {"text_encoder", "unet", "vae_decoder"}
    assert set(doc["fp16_graphs"]) == {"text_encoder", "unet"}  # the VAE decoder stays fp32
    assert set(doc["rewards"]) == {"plausibility", "comparative", "posture", "diagnosis", "consistency"}
    names = {g: ([i["name"] for i in e["inputs"]], [o["name"] for o in e["outputs"]]) for g, e in doc["graphs"].items()}
    assert names == {"text_encoder": (["input_ids"], ["text_embeddings"]),
                     "unet": (["sample", "timestep", "encoder_hidden_states"], ["noise_pred"]),
                     "vae_decoder": (["latents"], ["image"])}
    for e in [*doc["graphs"].values(), *doc["fp16_graphs"].values(), *doc["rewards"].values()]:
        assert all(i["shape"][0] == "batch" for i in e["inputs"] + e["outputs"])  # dynamic batch everywhere
        model = onnx.load(str(out / e["file"]))
        onnx.checker.check_model(model)
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    unet16 = onnx.load(str(out / doc["fp16_graphs"]["unet"]["file"]))
    kinds = {init.data_type for init in unet16.graph.initializer if len(init.dims) > 1}
    assert kinds == {onnx.TensorProto.FLOAT16}
    assert max(doc["verified_max_abs_diff"].values()) <= 1e-3
    # the fused U-Net: same I/O, attention as onnxruntime's fused nodes, no CUDA-only op
    fused = doc["fused_graphs"]["unet"]
    assert (fused["inputs"], fused["outputs"]) == (doc["graphs"]["unet"]["inputs"], doc["graphs"]["unet"]["outputs"])
    assert fused["fused_ops"].get("Attention", 0) + fused["fused_ops"].get("MultiHeadAttention", 0) >= 2
    assert not {"GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "NhwcConv", "BiasAdd"} & set(fused["fused_ops"])
    assert "unet.fused" in doc["verified_max_abs_diff"]
    plain = {n.op_type for n in onnx.load(str(out / "unet.onnx")).graph.node}
    assert "Softmax" in plain and not {"Attention", "MultiHeadAttention"} & plain  # TensorRT's graph stays plain


def test_onnxruntime_runs_the_fused_unet_and_falls_back_without_it(micro, tmp_path):
    from export.folder import read_export
    from export.ort import OrtRunner

    _, _, out = micro
    runner = OrtRunner(read_export(out))
    runner.session("unet")
    assert runner.sessions["unet"]._model_path.endswith("unet.fused.onnx")
    plain = tmp_path / "plain"
    shutil.copytree(out, plain)
    doc = json.loads((plain / "export.json").read_text())
    del doc["fused_graphs"]  # an export written with --no-fuse (or before fusion existed)
    (plain / "export.json").write_text(json.dumps(doc))
    runner = OrtRunner(read_export(plain))
    runner.session("unet")
    assert runner.sessions["unet"]._model_path.endswith("unet.onnx")
    assert OrtRunner(read_export(out), precision="fp16").export.graph("unet", "fp16", fused=True)["file"] \
        == "unet.fp16.onnx"  # fused is an fp32 graph: fp16 keeps its own


def test_no_fuse_writes_no_fused_graph(micro, tmp_path):
    ckpt, _, _ = micro
    out = tmp_path / "onnx"
    assert cli(["export", "onnx", str(ckpt), str(out), "--no-rewards", "--no-fuse"]) == 0
    assert json.loads((out / "export.json").read_text())["fused_graphs"] == {}
    assert not (out / "unet.fused.onnx").exists()


@pytest.mark.parametrize("graph", ["unet.onnx", "unet.fused.onnx"])
def test_unet_parity_fp32_at_an_untraced_batch(micro, graph):
    import onnxruntime as ort

    ckpt, _, out = micro
    pipe, _ = load_pipeline(ckpt)
    g = torch.Generator().manual_seed(3)
    sample = torch.randn(5, 4, 4, 4, generator=g)  # batch 5 (traced with 2)
    t = torch.tensor([999.0, 761.0, 501.0, 241.0, 1.0])
    ehs = torch.randn(5, MICRO.max_length, MICRO.text_hidden, generator=g)
    with torch.no_grad():
        ref = pipe.unet(sample, t, encoder_hidden_states=ehs).sample.numpy()
    sess = ort.InferenceSession(str(out / graph), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"sample": sample.numpy(), "timestep": t.numpy(), "encoder_hidden_states": ehs.numpy()})[0]
    assert np.abs(got - ref).max() <= 1e-3


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a", "pndm"])  # euler_a draws noise from the generators
def test_images_match_torch_for_the_same_seed(micro, scheduler):
    ckpt, _, out = micro
    ref = torch_images(ckpt, PROMPTS, scheduler, negative="pneumothorax")
    got = ort_images(out, PROMPTS, scheduler, negative="pneumothorax")
    assert got.shape == ref.shape == (3, MICRO.image_size, MICRO.image_size)
    assert psnr(got, ref) >= 40
    assert psnr(ort_images(out, PROMPTS[:1], scheduler, negative="pneumothorax"), ref[:1]) >= 40  # batch-free


def test_cross_attention_only_level_exports(tmp_path):
    """A U-Net with a cross-attention-only level (``--unet-attention cross,...``): same images through onnxruntime."""
    import dataclasses

    from export.folder import ExportConfig
    from export.onnx_export import export_onnx

    config = dataclasses.replace(MICRO, unet_attention=("cross", "none"))
    ckpt = micro_checkpoint(tmp_path / "ckpt", "micro-cross", reports=300, config=config)
    out = export_onnx(ExportConfig(checkpoint=str(ckpt), out=str(tmp_path / "onnx"), rewards=False))
    assert psnr(ort_images(out, PROMPTS[:2]), torch_images(ckpt, PROMPTS[:2])) >= 40


def test_guidance_off_and_another_size(micro):
    ckpt, _, out = micro
    ref = torch_images(ckpt, PROMPTS[:2], guidance=1.0, size=48)  # no unconditional branch; latents 6 x 6
    assert psnr(ort_images(out, PROMPTS[:2], guidance=1.0, size=48), ref) >= 40


def test_fp16_graphs_stay_close(micro):
    ckpt, _, out = micro
    ref = torch_images(ckpt, PROMPTS[:2])
    assert psnr(ort_images(out, PROMPTS[:2], precision="fp16"), ref) >= 35


def test_ace_tokens_travel_inside_the_text_encoder_graph(micro, micro_ace):
    ckpt, out = micro_ace
    doc = json.loads((out / "export.json").read_text())
    assert doc["model"]["ace_tokens"] == 3 and doc["rewards"] == {}
    assert [i["name"] for i in doc["graphs"]["text_encoder"]["inputs"]] == ["input_ids", "conditional"]
    assert doc["graphs"]["unet"]["inputs"][2]["shape"] == ["batch", MICRO.max_length + 3, MICRO.text_hidden]
    from export.ort import load
    from training.align.ace import ConditionTokens

    pipe = load(out)
    tokens = ConditionTokens.load(ckpt).tokens.detach().numpy()
    cond, uncond = pipe.encode(PROMPTS[:2], conditional=True), pipe.encode(["", ""], conditional=False)
    assert np.allclose(cond[:, -3:], tokens[None], atol=1e-6) and not uncond[:, -3:].any()
    ref = torch_images(ckpt, PROMPTS[:2])
    with_tokens = psnr(ort_images(out, PROMPTS[:2]), ref)
    assert with_tokens >= 40
    # the tokens matter: the plain export's images from the same seed are further from the aligned torch model
    assert psnr(ort_images(micro[2], PROMPTS[:2]), ref) < with_tokens - 20


def test_reward_scores_match_torch(micro):
    from export.ort import load
    from training.reward.base import generation_scorer

    _, rewards, out = micro
    rng = np.random.default_rng(0)
    images = rng.random((4, MICRO.image_size, MICRO.image_size)).astype(np.float32)
    prompts = ["left pleural effusion", "normal chest", "right upper lobe nodule", ""]
    findings = [[{"kind": "pleural_effusion", "side": "left", "severity": "moderate"}], [],
                [{"kind": "nodule", "lobe": "RUL"}], [{"kind": "cardiomegaly"}]]
    ref = generation_scorer(rewards)(images, prompts, findings)
    got = load(out).scorer()(images, prompts, findings)
    assert [set(r) for r in got] == [set(r) for r in ref] and "combined" in got[0]
    diff = max(abs(g[k] - r[k]) for g, r in zip(got, ref) for k in r)
    assert diff <= 1e-3
    assert len({round(r["plausibility"], 4) for r in ref}) > 1  # the scores vary: not a constant graph


def test_default_model_parity(default_export):
    """The committed model: U-Net output, a 2-step image and the committed rewards' scores."""
    import onnxruntime as ort

    from export.ort import load
    from training.reward.base import generation_scorer

    pipe, _ = load_pipeline(DEFAULT_MODEL)
    g = torch.Generator().manual_seed(0)
    sample, ehs = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 64, 128, generator=g)
    t = torch.tensor([900.0, 20.0])
    with torch.no_grad():
        ref = pipe.unet(sample, t, encoder_hidden_states=ehs).sample.numpy()
    sess = ort.InferenceSession(str(default_export / "unet.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"sample": sample.numpy(), "timestep": t.numpy(), "encoder_hidden_states": ehs.numpy()})[0]
    assert np.abs(got - ref).max() <= 1e-3
    set_scheduler(pipe, "ddim")
    img_ref = generate(pipe, PROMPTS[:1], 11, 2, 4.0, "", 1, 128)
    ort_pipe = load(default_export)
    ort_pipe.set_scheduler("ddim")
    img = ort_pipe.generate(PROMPTS[:1], 11, 2, 4.0, "", 1, 128)
    assert psnr(img, img_ref) >= 40
    findings = [[{"kind": "pleural_effusion", "side": "left", "severity": "moderate"}]]
    ref_scores, scores = generation_scorer()(img, PROMPTS[:1], findings), ort_pipe.scorer()(img, PROMPTS[:1], findings)
    assert max(abs(scores[0][k] - ref_scores[0][k]) for k in ref_scores[0]) <= 1e-3


# ------------------------------------------------------------------- cxrgen generate --backend


def read_log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "generation.jsonl").read_text().splitlines()]


def pngs(folder: Path) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(p), dtype=np.float32) / 255 for p in sorted(folder.glob("*.png"))])


def test_generate_cli_same_outputs_for_every_backend(micro, tmp_path, capsys):
    ckpt, rewards, out = micro
    common = ["generate", "--prompt", PROMPTS[0], "--finding", "cardiomegaly", "--n", "2", "--steps", "2",
              "--guidance", "3", "--score"]
    assert cli([*common, "--model", str(ckpt), "--reward-dir", str(rewards), "--out", str(tmp_path / "t")]) == 0
    assert cli([*common, "--model", str(out), "--backend", "onnxruntime", "--out", str(tmp_path / "o")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["backend"] == "onnxruntime"
    a, b = read_log(tmp_path / "t"), read_log(tmp_path / "o")
    assert [r["file"] for r in a] == [r["file"] for r in b] and len(a) == 4
    for ra, rb in zip(a, b):
        assert {k: ra[k] for k in ("prompt", "seed", "steps", "findings", "model_version")} == \
               {k: rb[k] for k in ("prompt", "seed", "steps", "findings", "model_version")}
        assert set(ra["scores"]) == set(rb["scores"]) and "combined" in rb["scores"]
        assert max(abs(ra["scores"][k] - rb["scores"][k]) for k in ra["scores"]) <= 1e-3
    assert psnr(pngs(tmp_path / "t"), pngs(tmp_path / "o")) >= 40
    # an export folder alone picks onnxruntime; --backend torch on it runs the checkpoint it names
    assert cli(["generate", "--prompt", "x", "--steps", "1", "--model", str(out), "--out", str(tmp_path / "d")]) == 0
    assert cli(["generate", "--prompt", "x", "--steps", "1", "--model", str(out), "--backend", "torch",
                "--out", str(tmp_path / "e")]) == 0
    assert psnr(pngs(tmp_path / "d"), pngs(tmp_path / "e")) >= 40


@pytest.mark.slow
def test_generate_compile_gives_the_eager_images(micro, tmp_path):
    """--compile (torch.compile of the U-Net, issue 10 section 5): the same images as eager, within float noise."""
    ckpt, _, _ = micro
    common = ["generate", "--prompt", PROMPTS[0], "--n", "2", "--steps", "2", "--model", str(ckpt)]
    assert cli([*common, "--out", str(tmp_path / "eager")]) == 0
    assert cli([*common, "--compile", "--out", str(tmp_path / "compiled")]) == 0
    assert psnr(pngs(tmp_path / "eager"), pngs(tmp_path / "compiled")) >= 40


def broken_export(micro, tmp_path) -> Path:
    bad = tmp_path / "broken"
    shutil.copytree(micro[2], bad)
    (bad / "unet.onnx").unlink()
    return bad


@pytest.mark.parametrize("case, message", [
    ("missing_graph", "unet.onnx is missing"),
    ("checkpoint", "is a torch checkpoint, not an export folder"),
    ("unknown_backend", "unknown --backend 'tvm'"),
    ("no_tensorrt", "tensorrt"),
    ("gpu_provider", "CUDAExecutionProvider"),
    ("compile_not_torch", "--compile applies to the torch backend only"),
])
def test_generate_bad_backend_input_is_a_clear_error(micro, tmp_path, capsys, case, message):
    ckpt, _, out = micro
    if case == "gpu_provider" and torch.cuda.is_available():
        pytest.skip("this machine may have a CUDA provider")
    args = {"missing_graph": ["--model", str(broken_export(micro, tmp_path)), "--backend", "onnxruntime"],
            "checkpoint": ["--model", str(ckpt), "--backend", "onnxruntime"],
            "unknown_backend": ["--model", str(out), "--backend", "tvm"],
            "no_tensorrt": ["--model", str(out), "--backend", "tensorrt", "--device", "cuda"],
            "gpu_provider": ["--model", str(out), "--backend", "onnxruntime", "--device", "cuda"],
            "compile_not_torch": ["--model", str(out), "--compile"]}[case]
    rc = cli(["generate", "--prompt", "x", "--steps", "1", "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.startswith("cxrgen generate: error:") and message.lower() in err.lower()


def test_export_cli_refuses_a_non_empty_folder_and_a_low_opset(micro, tmp_path, capsys):
    ckpt, _, out = micro
    assert cli(["export", "onnx", str(ckpt), str(out), "--no-rewards"]) == 2
    assert "--force" in capsys.readouterr().err
    assert cli(["export", "onnx", str(ckpt), str(tmp_path / "x"), "--opset", "13"]) == 2
    assert "--opset must be >= 17" in capsys.readouterr().err
    assert cli(["export", "onnx", str(tmp_path / "nothing"), str(tmp_path / "y")]) == 2
    assert "cannot load" in capsys.readouterr().err
