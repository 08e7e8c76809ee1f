"""Reward checkpoints and the scoring commands (issue 7, sections 3-4): loading, corrupt files, score_all,
``cxrgen score DIR``, ``cxrgen generate --score``.

Plumbing only, so the checkpoints are untrained tiny networks saved with ``save_reward`` (no training: fast);
tests/test_reward_models.py trains them and checks what they learn.
"""

import contextlib
import csv
import io
import json
import shutil
import types

import numpy as np
import pytest
import torch

from training.findings import Finding
from training.reward import base as rb
from training.reward.config import RewardConfig
from training.reward.testing import toy_image

SIZE = 32
TINY = dict(image_size=SIZE, channels=(8, 16), features=16, embed_dim=16, text_buckets=256)
LEFT = Finding("pleural_effusion", "left", "moderate")


def cli(*args):
    """``cxrgen ARGS`` in this process (a subprocess would pay torch's import again): rc, stdout, stderr."""
    from training.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return types.SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Every kind, untrained, saved as a checkpoint folder under one model dir."""
    root = tmp_path_factory.mktemp("rewards")
    torch.manual_seed(0)
    for name in rb.REWARD_NAMES:
        cfg = RewardConfig(kind=name, out=str(root / name), **TINY)
        cls = rb.reward_class(name)
        net = cls.Net(**cfg.net, **({"embed_dim": 16, "text_buckets": 256} if name == "consistency" else {}))
        rb.save_reward(cls(net.eval()), root / name, config=cfg, metrics={"note": "untrained"},
                       data={"store_url": "postgresql+psycopg://u:***@db/fb", "store_cursor": 7})
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Toy images as cxrgen writes them: PNG and DICOM with provenance (prompt, findings), plus a bare JPEG."""
    from PIL import Image

    from training.provenance import Provenance, save_dicom, save_png

    out = tmp_path_factory.mktemp("images")
    for i, f in enumerate([[LEFT], []]):
        img = toy_image(SIZE, f, rng=np.random.default_rng(i))
        prov = Provenance(model_version="toy", model_path="toy", seed=i, prompt=f"toy study {i}", steps=1,
                          guidance_scale=1.0, scheduler="ddim", height=SIZE, width=SIZE,
                          findings=[x.to_dict() for x in f])
        save_dicom(img, save_png(img, out / f"{i:04d}.png", prov).with_suffix(".dcm"), prov)
    Image.fromarray((np.random.default_rng(0).random((40, 48)) * 255).astype(np.uint8)).save(out / "x.jpg")
    return out


def test_manifest_records_kind_version_data_config(models):
    m = json.loads((models / "plausibility" / rb.MANIFEST).read_text())
    assert m["kind"] == "plausibility" and m["version"].startswith("plausibility-") and m["format"] == 1
    assert m["data"] == {"store_url": "postgresql+psycopg://u:***@db/fb", "store_cursor": 7}
    assert m["config"]["channels"] == [8, 16] and m["net"]["image_size"] == SIZE
    assert m["weights"] == rb.WEIGHTS and len(m["weights_sha256"]) == 64


def test_load_by_name_or_path_round_trips_and_score_all_combines(models):
    x = torch.rand(5, 1, 48, 48) * 2 - 1  # another size: resized to the network's
    a, b = rb.load_reward(models / "diagnosis"), rb.load_reward("diagnosis", model_dir=models)
    assert a.version == b.version and torch.equal(a.score(x, None, [[LEFT]] * 5), b.score(x, None, [[LEFT]] * 5))
    scores = rb.score_all(x, [""] * 5, [[LEFT]] * 5, model_dir=models)
    assert list(scores) == [*rb.REWARD_NAMES, "combined"]
    assert all(v.shape == (5,) and ((v >= 0) & (v <= 1)).all() for v in scores.values())
    w = rb.DEFAULT_WEIGHTS
    expected = sum(scores[k] * w[k] for k in rb.REWARD_NAMES) / sum(w.values())
    assert torch.allclose(scores["combined"], expected)
    only = rb.score_all(x, None, None, names="posture,diagnosis", weights={"posture": 1.0}, model_dir=models)
    assert list(only) == ["posture", "diagnosis", "combined"] and torch.allclose(only["combined"], only["posture"])
    with pytest.raises(ValueError, match="4 images but 5 prompts"):
        a.score(x[:4], [""] * 5, None)


def test_score_is_independent_of_batch_size(models):
    r = rb.load_reward(models / "plausibility")
    x = torch.rand(6, 1, SIZE, SIZE) * 2 - 1
    whole = r.score(x, None, [[LEFT]] * 6)
    parts = torch.cat([r.score(x[i:i + 1], None, [[LEFT]]) for i in range(6)])
    assert torch.allclose(whole, parts, atol=1e-6)


def test_combined_weights_come_from_the_model_dirs_config(models, tmp_path):
    shutil.copytree(models, tmp_path / "m")
    (tmp_path / "m" / rb.WEIGHTS_CONFIG).write_text(json.dumps({"combined": {"posture": 1.0}}))
    s = rb.score_all(torch.zeros(2, 1, SIZE, SIZE), model_dir=tmp_path / "m")
    assert torch.allclose(s["combined"], s["posture"])
    (tmp_path / "m" / rb.WEIGHTS_CONFIG).write_text(json.dumps({"combined": {"beauty": 1.0}}))
    with pytest.raises(ValueError, match=r"rewards.json: expected .*unknown reward\(s\) \['beauty'\]"):
        rb.score_all(torch.zeros(2, 1, SIZE, SIZE), model_dir=tmp_path / "m")


def test_corrupt_checkpoints_are_clear_errors(models, tmp_path):
    bad = tmp_path / "posture"
    shutil.copytree(models / "posture", bad)
    (bad / rb.WEIGHTS).write_bytes((bad / rb.WEIGHTS).read_bytes()[:100])
    with pytest.raises(ValueError, match=r"reward.safetensors: corrupt or unreadable reward weights"):
        rb.load_reward(bad)
    (bad / rb.MANIFEST).write_text("{not json")
    with pytest.raises(ValueError, match=r"reward_manifest.json: corrupt reward manifest"):
        rb.load_reward(bad)
    (bad / rb.MANIFEST).write_text(json.dumps({"format": 1, "kind": "beauty", "net": {}, "weights": "w"}))
    with pytest.raises(ValueError, match=r"unknown reward kind 'beauty'"):
        rb.load_reward(bad)
    shutil.copy(models / "posture" / rb.MANIFEST, bad / rb.MANIFEST)
    (bad / rb.WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="reward weights not found: .*reward.safetensors"):
        rb.load_reward(bad)
    shutil.copy(models / "diagnosis" / rb.WEIGHTS, bad / rb.WEIGHTS)  # another kind's weights
    with pytest.raises(ValueError, match="weights do not fit the posture network"):
        rb.load_reward(bad)


def test_score_cli_writes_a_csv_for_png_jpeg_and_dicom(models, folder, tmp_path):
    proc = cli("score", str(folder), "--model-dir", str(models), "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "1 of 5 images carry no prompt" in proc.stderr  # the JPEG
    with (tmp_path / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["file", *rb.REWARD_NAMES, "combined"]
    assert [r["file"] for r in rows] == ["0000.dcm", "0000.png", "0001.dcm", "0001.png", "x.jpg"]
    assert rows[0] == {**rows[1], "file": "0000.dcm"}  # DICOM and PNG of one image agree
    assert all(0 <= float(v) <= 1 for r in rows for k, v in r.items() if k != "file")
    assert "plausibility" in proc.stdout and "mean" in proc.stdout
    assert not (folder / "scores.csv").exists()

    proc = cli("score", str(folder), "--model-dir", str(models), "--rewards", "posture,diagnosis",
               "--prompt", "Small right pleural effusion.")
    assert proc.returncode == 0 and "carry no prompt" not in proc.stderr, proc.stderr
    assert (folder / "scores.csv").read_text().splitlines()[0] == "file,posture,diagnosis,combined"
    (folder / "scores.csv").unlink()


def test_findings_come_from_provenance_or_the_prompt(folder):
    from training.reward.folder import list_images, prompts_and_findings

    files = list_images(folder)
    prompts, findings, missing = prompts_and_findings(files, None)
    assert prompts[:2] == ["toy study 0", "toy study 0"] and findings[0] == [LEFT] and findings[2] == []
    assert missing == 1 and prompts[4] == ""
    prompts, findings, missing = prompts_and_findings(files, "Small right pleural effusion.")
    assert missing == 0 and all(f[0].kind == "pleural_effusion" and f[0].side.value == "right" for f in findings)


@pytest.mark.parametrize("args, message", [
    (["{missing}"], "no such folder"),
    (["{empty}"], "no images (PNG, JPEG or DICOM) in"),
    (["{images}", "--rewards", "posture,beauty"], "unknown reward(s) ['beauty']; known: ['plausibility'"),
    (["{images}", "--model-dir", "{corrupt}"], "corrupt reward manifest"),
    (["{images}", "--model-dir", "{empty}"], "no trained rewards under"),
])
def test_score_cli_errors_are_one_line_exit_2(folder, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt" / "posture").mkdir(parents=True)
    (tmp_path / "corrupt" / "posture" / rb.MANIFEST).write_text("{")
    paths = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "images": folder,
             "corrupt": tmp_path / "corrupt"}
    proc = cli("score", *[a.format(**paths) for a in args])
    assert proc.returncode == 2, proc.stdout
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_reward_train_cli_errors(tmp_path):
    proc = cli("reward", "train", "--kind", "beauty")
    assert proc.returncode == 2 and "unknown reward kind 'beauty'; known: ['plausibility'" in proc.stderr
    proc = cli("reward", "train", "--kind", "posture", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "data set not found" in proc.stderr


# ------------------------------------------------------------------ generate --score


@pytest.fixture(scope="module")
def generated(models, tmp_path_factory):
    """A folder written by ``cxrgen generate --score`` with a micro generator (untrained: noise-like images)."""
    from training.data.reports import load_reports
    from training.model.checkpoint import Manifest, save_checkpoint
    from training.model.components import TinyModelConfig, build_pipeline, train_tokenizer

    micro = TinyModelConfig(image_size=SIZE, vae_channels=(8, 8, 16, 16), unet_channels=(16, 32), unet_head_dim=4,
                            text_hidden=16, text_layers=1, text_heads=2, text_intermediate=32, max_length=32,
                            vocab_size=500)
    tok = train_tokenizer([r.prompt for r in load_reports()[:400]], micro.vocab_size, micro.max_length)
    torch.manual_seed(0)
    model = tmp_path_factory.mktemp("micro") / "ckpt"
    save_checkpoint(build_pipeline(micro, tok), model, Manifest(version="micro-v1", stage="init"))
    out = tmp_path_factory.mktemp("gen")
    proc = cli("generate", "--model", str(model), "--finding", "pleural_effusion:left:moderate", "--n", "2",
               "--steps", "2", "--dicom", "--score", "--reward-dir", str(models), "--out", str(out),
               "--batch-size", "2")
    assert proc.returncode == 0, proc.stderr
    return {"model": model, "out": out}


def test_generate_score_records_every_reward(generated):
    from training.provenance import read_dicom_provenance, read_png_provenance

    rows = [json.loads(line) for line in (generated["out"] / "generation.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert set(row["scores"]) == {*rb.REWARD_NAMES, "combined"}
        assert all(0 <= v <= 1 for v in row["scores"].values())
        assert row["findings"] == [LEFT.to_dict()]
        png = generated["out"] / row["file"]
        assert read_png_provenance(png).scores == pytest.approx(row["scores"])
        assert read_dicom_provenance(png.with_suffix(".dcm")).scores == pytest.approx(row["scores"])


def test_score_cli_on_a_folder_written_by_the_tiny_model(models, generated, tmp_path):
    from PIL import Image

    Image.new("L", (300, 120)).save(generated["out"] / "grid.png")  # generate --grid's contact sheet: skipped
    proc = cli("score", str(generated["out"]), "--model-dir", str(models), "--out", str(tmp_path))
    assert proc.returncode == 0 and "carry no prompt" not in proc.stderr, proc.stderr
    rows = list(csv.DictReader((tmp_path / "scores.csv").open()))
    assert len(rows) == 4  # 2 PNG + 2 DICOM
    logged = {json.loads(x)["file"]: json.loads(x)["scores"] for x in
              (generated["out"] / "generation.jsonl").read_text().splitlines()}
    for r in rows:  # the same image, prompt and findings: the score at generation, up to 8-bit rounding
        if r["file"].endswith(".png"):
            for k in rb.REWARD_NAMES:
                assert float(r[k]) == pytest.approx(logged[r["file"]][k], abs=0.02), (k, r)


def test_generate_score_without_rewards_fails_before_generating(generated, tmp_path):
    proc = cli("generate", "--model", str(generated["model"]), "--prompt", "x", "--steps", "1", "--score",
               "--reward-dir", str(tmp_path / "none"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "no trained rewards under" in proc.stderr
    assert not (tmp_path / "out").exists()
