"""cxrgen evaluate end to end on tiny components: every metric key, report files, manifest."""

import json
import math
import subprocess
import sys

import pytest
import torch

from training.evaluate.harness import EvalConfig, evaluate, mean_pairwise_msssim, youden_threshold
from training.model.checkpoint import Manifest, save_checkpoint
from training.model.components import TinyModelConfig, build_pipeline, train_tokenizer

KEYS = ("conditioning_auroc_mean", "conditioning_auroc", "effusion_detection_rate", "fid", "fid_floor", "kid",
        "ms_ssim_generated", "ms_ssim_real", "posture_error_deg", "augmentation_auroc_real_only",
        "augmentation_auroc_real_plus_synthetic")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from training.data.reports import load_reports
    from training.simulator.dataset import SimulateConfig, simulate

    root = tmp_path_factory.mktemp("eval")
    simulate(SimulateConfig(out=str(root / "data"), n=40, size=128, seed=11, workers=1), progress=False)
    cfg = TinyModelConfig(image_size=32, vae_channels=(8, 8, 16, 16), unet_channels=(16, 32), unet_head_dim=4,
                          text_hidden=16, text_layers=1, text_heads=2, text_intermediate=32, max_length=32,
                          vocab_size=500)
    tok = train_tokenizer([r.prompt for r in load_reports()[:400]], cfg.vocab_size, cfg.max_length)
    torch.manual_seed(0)
    save_checkpoint(build_pipeline(cfg, tok), root / "model", Manifest(version="micro", stage="init"))
    return root


def test_evaluate_writes_every_metric(setup):
    root = setup
    # Tiny data: every split is the whole set, so each finding has both classes somewhere.
    cfg = EvalConfig(out=str(root / "report"), model=str(root / "model"), data=str(root / "data"),
                     judge_arch="resnet18", judge_size=32, judge_epochs=1, n_prompts=24, diversity_prompts=2,
                     augment_real=12, augment_synthetic=8, augment_epochs=1, steps=2, batch_size=8, scheduler="euler_a",
                     train_split="train", val_split="train", test_split="train")
    held = root / "held.jsonl"
    held.write_text('{"prompt": "Large right pleural effusion.", "findings": [{"kind": "pleural_effusion", '
                    '"side": "right", "severity": "large"}]}\n{"prompt": "Clear lungs.", "findings": []}\n')
    cfg.prompts_file = str(held)
    m = evaluate(cfg)
    for k in KEYS + ("auroc_ratio", "auroc_ratio_mean", "judge_auroc_vae", "panel_plausible_rate",
                     "panel_plausible_rate_real", "positives", "pneumothorax_lucency", "fid_ratio_to_floor"):
        assert k in m, k
    assert m["n_prompts"] == 24 and m["n_prompts_extra"] == 2
    assert m["positives"]["Pleural Effusion"] >= 1 and 0 <= m["panel_plausible_rate"] <= 1
    for k, r in m["auroc_ratio"].items():
        assert r == pytest.approx(m["conditioning_auroc"][k] / m["judge_auroc_real"][k])
    for k in ("fid", "fid_floor", "fid_vae_reconstruction", "ms_ssim_generated", "ms_ssim_real", "posture_error_deg"):
        assert m[k] is not None and math.isfinite(m[k]), k
    assert 0 <= m["ms_ssim_generated"] <= 1 and m["fid"] >= 0
    saved = json.loads((root / "report" / "metrics.json").read_text())
    assert saved["fid"] == m["fid"] and saved["scheduler"] == "euler_a"
    for f in ("report.md", "samples.png", "auroc.png", "judge/judge.json"):
        assert (root / "report" / f).is_file(), f
    assert "panel plausible rate" in (root / "report" / "report.md").read_text()


def test_cli_writes_metrics_into_the_manifest(setup, tmp_path):
    root = setup
    held = tmp_path / "held.jsonl"
    held.write_text('{"prompt": "Small left pneumothorax.", "findings": [{"kind": "pneumothorax", "side": "left", '
                    '"severity": "small"}]}\n')
    proc = subprocess.run([sys.executable, "-m", "training.cli", "evaluate", "--out", str(tmp_path),
                           "--model", str(root / "model"), "--data", str(root / "data"),
                           "--judge", str(root / "report" / "judge"), "--n-prompts", "16", "--diversity-prompts", "2",
                           "--augment-real", "8", "--augment-synthetic", "8", "--augment-epochs", "1",
                           "--steps", "2", "--augment-arch", "resnet18", "--val-split", "train",
                           "--test-split", "train", "--write-manifest",
                           # `str | None` options take their value from the command line
                           "--prompts-file", str(held), "--panel", "none"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = Manifest.read(root / "model")
    assert "conditioning_auroc_mean" in manifest.metrics and "fid_floor" in manifest.metrics
    assert manifest.metrics["n_prompts_extra"] == 1 and manifest.metrics.get("panel_plausible_rate") is None


def test_unknown_scheduler_is_a_clear_error(setup, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "training.cli", "evaluate", "--out", str(tmp_path),
                           "--model", str(setup / "model"), "--data", str(setup / "data"), "--scheduler", "foo"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown --scheduler 'foo'" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_input_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "training.cli", "evaluate", "--out", str(tmp_path),
                           "--model", str(tmp_path / "none"), "--data", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "no model at" in proc.stderr and "Traceback" not in proc.stderr


def test_vae_roundtrip_keeps_shape_and_range(setup):
    from training.evaluate.harness import vae_roundtrip
    from training.model.checkpoint import load_pipeline

    pipe, _ = load_pipeline(setup / "model")
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    y = vae_roundtrip(pipe, x, batch_size=2)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1 and not torch.equal(x, y)


def test_youden_threshold_and_msssim():
    scores = torch.tensor([0.1, 0.2, 0.8, 0.9])
    assert youden_threshold(scores, torch.tensor([0.0, 0.0, 1.0, 1.0])) == pytest.approx(0.8)
    x = torch.rand(1, 1, 64, 64) * 2 - 1
    assert mean_pairwise_msssim([torch.cat([x, x])]) == pytest.approx(1.0, abs=1e-4)
    noise = torch.rand(2, 1, 64, 64) * 2 - 1
    assert mean_pairwise_msssim([noise]) < 0.5


def test_pneumothorax_lucency_tells_a_lucent_space_from_an_opacity():
    """Real films define the region; a generator drawing a dark smooth space scores like them, one drawing
    a bright patch scores the opposite way."""
    from training.evaluate.lucency import pneumothorax_lucency

    g = torch.Generator().manual_seed(0)
    base = lambda n: (torch.rand(n, 1, 64, 64, generator=g) - 0.5) * 0.4  # noqa: E731  (textured "lung")
    rows = [{"findings": []}] * 8 + [{"findings": [{"kind": "pneumothorax", "side": "right"}]}] * 8
    real = base(16)
    real[8:, :, 6:26, 4:24] = -0.9  # dark, without texture, at the right apex (image left)
    opaque = base(16)
    opaque[8:, :, 6:26, 4:24] += 0.6
    r = pneumothorax_lucency(real, rows, real, rows, real, rows, share=0.05)
    assert r["real"]["delta_intensity"] < -0.5 and r["real"]["texture_ratio"] < 0.1
    assert r["region_pixels"]["right"] == int(0.05 * 64 * 64) and "left" not in r["region_pixels"]
    o = pneumothorax_lucency(real, rows, real, rows, opaque, rows, share=0.05)["generated"]
    assert o["delta_intensity"] > 0.3 and o["texture_ratio"] > 0.5


def test_generated_images_are_reused_only_for_the_same_model_prompts_and_settings(setup, tmp_path, monkeypatch):
    """Evaluating again (another judge, an interruption) reuses OUT/generated/NAME.pt; anything that changes the
    images (weights, prompts, seed, sampler settings) samples again, and so does an unreadable file."""
    import shutil

    import training.generation as G
    from training.evaluate.harness import generate_images
    from training.model.checkpoint import load_pipeline

    model = tmp_path / "model"
    shutil.copytree(setup / "model", model)
    pipe, _ = load_pipeline(model)
    cfg = EvalConfig(out=str(tmp_path / "out"), model=str(model), data=str(setup / "data"), steps=2, batch_size=4)
    calls = []
    real_generate = G.generate
    monkeypatch.setattr(G, "generate", lambda *a, **k: calls.append(a[1]) or real_generate(*a, **k))
    prompts = ["Large left pleural effusion.", "No acute cardiopulmonary process."]
    first = generate_images(pipe, prompts, cfg, 0, "heldout")
    assert len(calls) == 1 and (tmp_path / "out" / "generated" / "heldout.pt").is_file()
    assert torch.equal(generate_images(pipe, prompts, cfg, 0, "heldout"), first) and len(calls) == 1
    generate_images(pipe, prompts, cfg, 1, "heldout")  # another seed
    generate_images(pipe, prompts[:1], cfg, 1, "heldout")  # other prompts
    generate_images(pipe, prompts[:1], EvalConfig(**{**cfg.__dict__, "guidance": 2.0}), 1, "heldout")
    assert len(calls) == 4
    unet = next((model / "unet").glob("*.safetensors"))
    unet.write_bytes(unet.read_bytes() + b" ")  # other weights (the key hashes the files)
    generate_images(pipe, prompts[:1], EvalConfig(**{**cfg.__dict__, "guidance": 2.0}), 1, "heldout")
    assert len(calls) == 5
    (tmp_path / "out" / "generated" / "heldout.pt").write_bytes(b"not a tensor file")
    assert generate_images(pipe, prompts, cfg, 0, "heldout").shape == first.shape and len(calls) == 6
    generate_images(pipe, prompts, cfg, 0)  # no name: never cached
    assert len(calls) == 7


def test_an_interrupted_generation_resumes_from_its_last_chunk(setup, tmp_path, monkeypatch):
    """Images are sampled and kept in chunks: an evaluation killed mid-way samples only the chunks it had not
    finished, and the images are those of one uninterrupted run (image i from seed + i)."""
    import training.generation as G
    from training.evaluate.harness import generate_images
    from training.model.checkpoint import load_pipeline

    pipe, _ = load_pipeline(setup / "model")
    cfg = EvalConfig(out=str(tmp_path / "out"), model=str(setup / "model"), data=str(setup / "data"), steps=2,
                     batch_size=2)
    prompts = ["Large left pleural effusion.", "No acute cardiopulmonary process.", "Right apical pneumothorax.",
               "Cardiomegaly.", "Left lower lobe consolidation."]
    whole = generate_images(pipe, prompts, cfg, 3)  # not cached: one run
    calls = []
    real_generate = G.generate

    def dies_on_the_third_chunk(*a, **k):
        calls.append(len(a[1]))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_generate(*a, **k)

    monkeypatch.setattr(G, "generate", dies_on_the_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        generate_images(pipe, prompts, cfg, 3, "heldout", chunk=2)
    folder = tmp_path / "out" / "generated"
    assert sorted(p.name for p in folder.glob("heldout.part*.pt")) == ["heldout.part0000.pt", "heldout.part0001.pt"]
    monkeypatch.setattr(G, "generate", lambda *a, **k: calls.append(len(a[1])) or real_generate(*a, **k))
    again = generate_images(pipe, prompts, cfg, 3, "heldout", chunk=2)
    assert calls == [2, 2, 1, 1]  # only the last chunk sampled again
    assert torch.allclose(again, whole, atol=1e-5)
    assert (folder / "heldout.pt").is_file() and not list(folder.glob("heldout.part*"))


def test_generate_only_keeps_the_images_and_a_later_evaluation_scores_them_without_sampling(setup, tmp_path,
                                                                                              monkeypatch):
    """--generate-only samples the held-out and diversity images with no judge and writes no metrics; the same
    evaluation with a judge then samples nothing."""
    import training.generation as G

    out = tmp_path / "gen"
    proc = subprocess.run([sys.executable, "-m", "training.cli", "evaluate", "--out", str(out),
                           "--model", str(setup / "model"), "--data", str(setup / "data"), "--n-prompts", "16",
                           "--diversity-prompts", "2", "--steps", "2", "--test-split", "train", "--generate-only"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"generated": str(out / "generated"), "heldout": 16,
                                                                "diversity": 8}
    assert (out / "generated" / "heldout.pt").is_file() and (out / "generated" / "diversity.pt").is_file()
    assert not (out / "metrics.json").exists() and not (out / "judge").exists()
    calls = []
    monkeypatch.setattr(G, "generate", lambda *a, **k: calls.append(a[1]) or pytest.fail("sampled again"))
    cfg = EvalConfig(out=str(out), model=str(setup / "model"), data=str(setup / "data"),
                     judge=str(setup / "report" / "judge"), n_prompts=16, diversity_prompts=2, steps=2,
                     augment_real=0, test_split="train", val_split="train", panel="none")
    m = evaluate(cfg)
    assert calls == [] and math.isfinite(m["fid"]) and 0 <= m["ms_ssim_generated"] <= 1
