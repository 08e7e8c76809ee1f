"""The Triton path (issue 10, sections 4 and 6) against a real server.

The server is the ``tritonserver`` that the nvidia-pytriton wheel ships (python backend only), started by
the ``server`` fixture on free loopback ports with the repository ``cxrgen export triton`` wrote for the micro
model, and stopped at the end. A mock is never a test of Triton: every test here talks to that process.
Bounds are the issue's: images PSNR >= 40 dB against onnxruntime in this process, reward scores within 1e-3.
"""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest

from export.testing import psnr
from micro_model import micro_checkpoint
from training.cli import main as cli

PROMPTS = ["left pleural effusion", "no acute cardiopulmonary process", "cardiomegaly"]
FINDINGS = [[{"kind": "pleural_effusion", "side": "left", "severity": "moderate"}], [], [{"kind": "cardiomegaly"}]]


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """(checkpoint, rewards, export folder) of the micro model."""
    from export.folder import ExportConfig
    from export.onnx_export import export_onnx
    from export.testing import micro_rewards

    root = tmp_path_factory.mktemp("triton-micro")
    ckpt = micro_checkpoint(root / "ckpt", "micro-triton", reports=300)
    rewards = micro_rewards(root / "rewards")
    out = export_onnx(ExportConfig(checkpoint=str(ckpt), out=str(root / "onnx"), reward_dir=str(rewards)))
    return ckpt, rewards, out


@pytest.fixture(scope="module")
def repo(micro, tmp_path_factory):
    out = tmp_path_factory.mktemp("triton-repo") / "repo"
    assert cli(["export", "triton", str(micro[2]), str(out), "--max-batch", "4"]) == 0
    return out


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    from export.folder import ExportError
    from export.triton_server import start, wheel_dir

    try:
        wheel_dir()
    except ExportError as e:
        pytest.skip(f"no Triton server to test against: {e}")
    srv = start(repo, tmp_path_factory.mktemp("triton-log") / "server.log")
    yield srv
    srv.stop()
    assert srv.proc.poll() is not None, "the server outlived its fixture"


def ort(export_dir):
    from export.ort import load

    pipe = load(export_dir)
    pipe.set_scheduler("ddim")
    return pipe


def triton(repo, url):
    from export.triton_backend import load

    pipe = load(repo, url=url)
    pipe.set_scheduler("ddim")
    return pipe


# ------------------------------------------------------------------------------ the repository


def parse_config(path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_repository_is_written_for_every_platform(micro, repo, tmp_path):
    """Every config.pbtxt parses as Triton's ModelConfig; python and onnxruntime_onnx variants."""
    from export.folder import ExportError
    from export.triton import write_repository

    doc = json.loads((repo / "cxrgen_triton.json").read_text())
    names = {"cxrgen_text_encoder", "cxrgen_unet", "cxrgen_vae_decoder", "cxrgen_pipeline",
             *(f"cxrgen_reward_{r}" for r in ("plausibility", "comparative", "posture", "diagnosis", "consistency"))}
    assert set(doc["models"].values()) == names and doc["platform"] == "python"
    for name in names:
        cfg = parse_config(repo / name / "config.pbtxt")
        assert cfg.name == name and cfg.backend == "python" and cfg.HasField("dynamic_batching")
        assert (repo / name / "1" / "model.py").is_file()
        assert cfg.max_batch_size == (8 if name == "cxrgen_unet" else 4)  # guidance doubles the U-Net batch
    unet = parse_config(repo / "cxrgen_unet" / "config.pbtxt")
    assert [(i.name, list(i.dims)) for i in unet.input] == [("sample", [4, -1, -1]), ("timestep", [1]),
                                                            ("encoder_hidden_states", [32, 16])]
    pipe = parse_config(repo / "cxrgen_pipeline" / "config.pbtxt")
    assert pipe.parameters["export_sha256"].string_value == doc["export_sha256"]
    assert (repo / "cxrgen_pipeline" / "1" / "export" / "tokenizer" / "tokenizer_config.json").is_file()

    onnx_repo = write_repository(micro[2], tmp_path / "ort", platform="onnxruntime", kind="gpu")
    unet = parse_config(onnx_repo / "cxrgen_unet" / "config.pbtxt")
    assert unet.platform == "onnxruntime_onnx" and not (onnx_repo / "cxrgen_unet" / "1" / "model.py").exists()
    assert (onnx_repo / "cxrgen_unet" / "1" / "model.onnx").is_file()
    for r in (repo, onnx_repo):  # onnxruntime runs the export's fused U-Net in both (TensorRT: the plain one)
        assert (r / "cxrgen_unet" / "1" / "model.onnx").read_bytes() == (micro[2] / "unet.fused.onnx").read_bytes()
    timestep = next(i for i in unet.input if i.name == "timestep")
    assert list(timestep.dims) == [1] and timestep.HasField("reshape") and list(timestep.reshape.shape) == []
    assert unet.instance_group[0].kind == unet.instance_group[0].KIND_GPU
    assert parse_config(onnx_repo / "cxrgen_pipeline" / "config.pbtxt").backend == "python"
    with pytest.raises(ExportError, match="cxrgen export tensorrt"):
        write_repository(micro[2], tmp_path / "trt", platform="tensorrt")
    with pytest.raises(ExportError, match="--force"):
        write_repository(micro[2], onnx_repo)


def test_tensorrt_variant_takes_the_engines(micro, tmp_path):
    """--platform tensorrt: model.plan from EXPORT_DIR/tensorrt/, spatial axes fixed as the engines' profiles.
    (The engines here are stand-in bytes: building real ones needs a GPU, tests/test_export_tensorrt.py.)"""
    from export.triton import write_repository

    export = tmp_path / "onnx"
    shutil.copytree(micro[2], export)
    doc = json.loads((export / "export.json").read_text())
    for graph in [*doc["graphs"], *(f"rewards/{r}" for r in doc["rewards"])]:
        engine = export / "tensorrt" / f"{graph}.engine"
        engine.parent.mkdir(parents=True, exist_ok=True)
        engine.write_bytes(graph.encode())
    repo = write_repository(export, tmp_path / "repo", platform="tensorrt", kind="gpu")
    unet = parse_config(repo / "cxrgen_unet" / "config.pbtxt")
    assert unet.platform == "tensorrt_plan" and (repo / "cxrgen_unet" / "1" / "model.plan").read_bytes() == b"unet"
    assert [list(i.dims) for i in unet.input] == [[4, 4, 4], [1], [32, 16]]  # 32 px / 8 = 4 x 4 latents
    assert list(parse_config(repo / "cxrgen_vae_decoder" / "config.pbtxt").output[0].dims) == [1, 32, 32]
    assert (repo / "cxrgen_reward_posture" / "1" / "model.plan").read_bytes() == b"rewards/posture"


# ------------------------------------------------------------------------------ the real server


def test_server_loads_every_model(server, repo):
    import tritonclient.http as http

    client = http.InferenceServerClient(server.http_url.removeprefix("http://"))
    assert client.is_server_ready()
    index = {m["name"]: m.get("state") for m in client.get_model_repository_index()}
    expected = set(json.loads((repo / "cxrgen_triton.json").read_text())["models"].values())
    assert set(index) == expected and set(index.values()) == {"READY"}


def test_images_and_scores_match_onnxruntime_over_http_and_grpc(server, micro, repo):
    """The end-to-end check of the fast suite: one real server, both protocols, parity with onnxruntime."""
    ref_pipe = ort(micro[2])
    ref = ref_pipe.generate(PROMPTS, 5, 3, 3.0, "pneumothorax", 2, 32)
    ref_scores = ref_pipe.scorer()(ref, PROMPTS, FINDINGS)
    for url in (server.http_url, server.grpc_url):
        pipe = triton(repo, url)
        assert (pipe.name, pipe.version, pipe.native_size) == ("triton", "micro-triton", 32)
        got = pipe.generate(PROMPTS, 5, 3, 3.0, "pneumothorax", 2, 32)
        assert got.shape == ref.shape == (3, 32, 32) and got.std() > 0
        assert psnr(got, ref) >= 40, url
        scores = pipe.scorer()(got, PROMPTS, FINDINGS)
        assert [set(s) for s in scores] == [set(s) for s in ref_scores] and "combined" in scores[0]
        assert max(abs(s[k] - r[k]) for s, r in zip(scores, ref_scores) for k in r) <= 1e-3, url
    # a seed is a seed: image 1 alone, from seed 6, is image 1 of the batch
    assert psnr(triton(repo, server.grpc_url).generate(PROMPTS[1:2], 6, 3, 3.0, "pneumothorax", 1, 32), ref[1:2]) >= 40


def test_concurrent_requests_give_the_same_images(server, micro, repo):
    """Requests that the pipeline model's dynamic batcher may merge (and guidance off, another size) still give
    each image of its own seed."""
    ref_pipe = ort(micro[2])
    jobs = [(PROMPTS[:2], 1, 2, 3.0, 32), (PROMPTS[2:], 7, 2, 3.0, 32), (PROMPTS[:1], 3, 2, 1.0, 48)]
    refs = [ref_pipe.generate(p, seed, steps, g, "", 2, size) for p, seed, steps, g, size in jobs]
    results: dict = {}

    def worker(i, job):
        p, seed, steps, g, size = job
        results[i] = triton(repo, server.http_url).generate(p, seed, steps, g, "", 2, size)

    threads = [threading.Thread(target=worker, args=(i, job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == [0, 1, 2]
    for i, ref in enumerate(refs):
        assert results[i].shape == ref.shape and psnr(results[i], ref) >= 40, i


def test_bad_requests_are_clear_errors(server, micro, repo, tmp_path):
    from export.folder import ExportError
    from export.triton import PIPELINE_MODEL, encode_texts
    from export.triton_backend import TritonClient, load
    from export.triton_server import free_ports

    pipe = triton(repo, server.grpc_url)
    with pytest.raises(ExportError, match="unknown scheduler 'magic'"):
        pipe.run_batch(["x"], [""], [0], 2, 3.0, "magic", 32)
    with pytest.raises(ExportError, match="size must be a multiple of 8, got 36"):
        pipe.run_batch(["x"], [""], [0], 2, 3.0, "ddim", 36)
    with pytest.raises(ExportError, match="steps must be in"):
        pipe.run_batch(["x"], [""], [0], 0, 3.0, "ddim", 32)
    client = TritonClient(server.http_url)
    with pytest.raises(ExportError, match="seed"):  # Triton itself names the missing input
        client.infer(PIPELINE_MODEL, {"prompt": encode_texts(["x"])}, ["image"])
    with pytest.raises(ExportError, match="cxrgen_unet"):  # a wrong shape reaches a component model
        client.infer("cxrgen_unet", {"sample": np.zeros((1, 3, 4, 4), np.float32),
                                     "timestep": np.zeros((1, 1), np.float32),
                                     "encoder_hidden_states": np.zeros((1, 32, 16), np.float32)}, ["noise_pred"])
    other = tmp_path / "other"
    shutil.copytree(micro[2], other)
    doc = json.loads((other / "export.json").read_text())
    doc["source"]["version"] = "someone-else"
    (other / "export.json").write_text(json.dumps(doc))
    with pytest.raises(ExportError, match="from another export"):
        load(other, url=server.http_url)
    with pytest.raises(ExportError, match="cannot reach Triton"):
        load(repo, url=f"http://127.0.0.1:{free_ports(1)[0]}")
    with pytest.raises(ExportError, match="neither a Triton repository"):
        load(tmp_path, url=server.http_url)
    # the server is still serving after all that
    assert triton(repo, server.http_url).generate(PROMPTS[:1], 0, 1, 3.0, "", 1, 32).shape == (1, 32, 32)


def test_generate_cli_with_backend_triton(server, micro, repo, tmp_path, monkeypatch, capsys):
    from PIL import Image

    common = ["generate", "--prompt", PROMPTS[0], "--finding", "cardiomegaly", "--n", "2", "--steps", "2",
              "--guidance", "3", "--score"]
    assert cli([*common, "--model", str(micro[2]), "--out", str(tmp_path / "o")]) == 0
    monkeypatch.setenv("CXRGEN_TRITON_URL", server.grpc_url)
    assert cli([*common, "--model", str(repo), "--out", str(tmp_path / "t")]) == 0  # a repository picks triton
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["backend"] == "triton"
    logs = [[json.loads(x) for x in (tmp_path / d / "generation.jsonl").read_text().splitlines()] for d in "ot"]
    for a, b in zip(*logs):
        assert (a["file"], a["seed"], a["model_version"]) == (b["file"], b["seed"], b["model_version"])
        assert max(abs(a["scores"][k] - b["scores"][k]) for k in a["scores"]) <= 1e-3
        pa, pb = (np.asarray(Image.open(tmp_path / d / a["file"]), dtype=np.float32) / 255 for d in "ot")
        assert psnr(pa, pb) >= 40


def test_service_engine_on_triton_matches_onnxruntime(server, micro, repo, tmp_path):
    """The service's engine (micro-batcher, warm-up, reload) with CXRGEN_BACKEND=triton: the same images and
    scores as with onnxruntime, and its backend named."""
    from service.config import ServeConfig
    from service.engine import Engine

    engines = {}
    for backend, model in (("onnxruntime", micro[2]), ("triton", repo)):
        eng = Engine(ServeConfig(model=str(model), backend=backend, triton_url=server.http_url, device="cpu",
                                 reward_dir=str(micro[1]), warmup=True, warmup_steps=1,
                                 data_dir=str(tmp_path / backend)))  # a reload writes active-model.json there
        eng.start()
        engines[backend] = eng
    try:
        out = {}
        for backend, eng in engines.items():
            settings = eng.settings(2, 3.0, "ddim", None)
            out[backend] = eng.generate_sync(PROMPTS[:2], ["", "pneumothorax"], [4, 9], settings, FINDINGS[:2])
        (a, ma, sa), (b, mb, sb) = out["onnxruntime"], out["triton"]
        assert (ma.backend, mb.backend) == ("onnxruntime", "triton") and mb.info()["backend_url"] == server.http_url
        assert psnr(a, b) >= 40 and ma.version == mb.version == "micro-triton"
        assert max(abs(x[0][k] - y[0][k]) for x, y in zip(sa, sb) for k in x[0]) <= 1e-3
        reloaded = engines["triton"].reload(str(repo))
        assert reloaded["model_version"] == "micro-triton"
    finally:
        for eng in engines.values():
            eng.stop()


def test_service_over_http_on_triton(server, micro, repo, tmp_path):
    """The real service (``bentoml serve``) with CXRGEN_BACKEND=triton over gRPC: POST /generate answers with
    onnxruntime's images for the same seeds and with every reward score; /models and the metrics name triton."""
    from export.ort import load
    from service_support import png_pixels, start_live

    live = start_live(tmp_path / "svc", workers=1, CXRGEN_MODEL=repo, CXRGEN_BACKEND="triton",
                      CXRGEN_TRITON_URL=server.grpc_url, CXRGEN_REWARD_DIR=micro[1])
    try:
        with live.client("client") as c:
            r = c.post("/generate", json={"prompt": PROMPTS[0], "n": 2, "seed": 4, "steps": 2, "guidance": 3.0})
            assert r.status_code == 200, r.text
            models = c.get("/models")
            metrics = c.get("/metrics").text
        d = r.json()
        assert d["model_version"] == "micro-triton" and [im["seed"] for im in d["images"]] == [4, 5]
        assert all({"plausibility", "combined"} <= set(im["scores"]) for im in d["images"])
        served = np.stack([png_pixels(im["image"]) for im in d["images"]]).astype(np.float32) / 255
        ort = load(micro[2])
        ort.set_scheduler("ddim")
        ref = ort.generate([PROMPTS[0]] * 2, 4, 2, 3.0, "", 2, ort.native_size)
        assert psnr(served, np.asarray(ref, dtype=np.float32)) >= 40
        assert models.status_code == 200 and "triton" in json.dumps(models.json())
        assert 'backend="triton"' in metrics
    finally:
        live.stop()


@pytest.mark.slow
def test_triton_serve_command_serves_the_repository(server, repo, tmp_path):
    """`cxrgen export triton-serve` (the bundled server in the foreground) on loopback ports, then Ctrl-C."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    from export.triton_server import free_ports

    http, grpc, metrics = free_ports(3)
    log = tmp_path / "serve.log"
    cmd = [str(Path(sys.executable).parent / "cxrgen"), "export", "triton-serve", str(repo), "--http-port", str(http),
           "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, ready = time.monotonic() + 120, False
        while time.monotonic() < deadline and proc.poll() is None and not ready:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=2) as r:
                    ready = r.status == 200
            except OSError:
                time.sleep(0.5)
        assert ready, log.read_text()[-3000:]
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as r:
            assert b"nv_inference_count" in r.read()
        assert triton(repo, f"grpc://127.0.0.1:{grpc}").generate(PROMPTS[:1], 0, 1, 3.0, "", 1, 32).shape == (1, 32, 32)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
