"""cxrgen train: a 2-step smoke test per stage, exact resume, loss falls on a fixed batch."""

import argparse
import json
import subprocess
import sys
from unittest import mock

import pytest
import torch

from training.model.checkpoint import Manifest, load_pipeline
from training.train.config import FinetuneConfig
from training.train.loop import train

MICRO = {"image_size": 32, "vae_channels": [8, 8, 16, 16], "unet_channels": [16, 32], "unet_head_dim": 4,
         "text_hidden": 16, "text_layers": 1, "text_heads": 2, "text_intermediate": 32, "max_length": 16,
         "vocab_size": 500}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from training.simulator.dataset import SimulateConfig, simulate

    root = tmp_path_factory.mktemp("sim")
    simulate(SimulateConfig(out=str(root), n=16, size=128, seed=5, workers=1, real_fraction=0.5), progress=False)
    return str(root)


def cfg(data, out, **kw):
    base = dict(data=data, out=str(out), split="train", steps=2, batch_size=4, num_workers=0, sample_every=2,
                checkpoint_every=0, warmup_steps=1, lr=1e-3)
    return FinetuneConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def vae_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    train(cfg(data, out, init="tiny", model_config=MICRO, train=("vae",)), progress=False)
    return out


def test_vae_stage_writes_checkpoint_samples_and_log(vae_run):
    assert (vae_run / "checkpoint" / "model_index.json").is_file()
    assert (vae_run / "samples" / "step_000002.png").is_file() and (vae_run / "samples" / "final.png").is_file()
    rows = [json.loads(x) for x in (vae_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all("loss_vae" in r for r in rows)
    m = Manifest.read(vae_run / "checkpoint")
    assert m.stage == "finetune:vae" and m.data_fingerprint and m.config["finetune"]["train"] == ["vae"]
    assert m.metrics["latent_scaling_factor"] > 0


@pytest.mark.parametrize("stage, extra", [(("unet", "text_encoder"), {}), (("unet",), {"lora_rank": 4})])
def test_unet_stages_from_a_checkpoint(data, vae_run, tmp_path, stage, extra):
    folder = train(cfg(data, tmp_path, model=str(vae_run / "checkpoint"), train=stage, **extra), progress=False)
    pipe, manifest = load_pipeline(folder)
    assert manifest.parent_version == vae_run.name
    assert not any("lora" in n for n, _ in pipe.unet.named_parameters())  # adapters baked in
    assert (tmp_path / "samples" / "final.png").is_file()


def test_cached_latents_and_vae_crops(data, vae_run, tmp_path):
    folder = train(cfg(data, tmp_path / "u", model=str(vae_run / "checkpoint"), train=("unet", "text_encoder"),
                       cache_latents=True, oversample={"Pleural Effusion": 3}), progress=False)
    assert (folder / "model_index.json").is_file()
    train(cfg(data, tmp_path / "v", init="tiny", model_config=MICRO, train=("vae",), vae_crop=16), progress=False)
    rows = [json.loads(x) for x in (tmp_path / "v" / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    with pytest.raises(ValueError, match="needs a frozen VAE"):
        cfg(data, tmp_path, init="tiny", train=("vae",), cache_latents=True).validate()


def test_resume_is_exact(data, vae_run, tmp_path):
    """2 steps + resume to 4 == 4 steps straight (weights, optimiser, EMA, RNG and data order)."""
    common = dict(model=str(vae_run / "checkpoint"), train=("unet",), sample_every=0, checkpoint_every=2)
    straight = train(cfg(data, tmp_path / "a", steps=4, **common), progress=False)
    train(cfg(data, tmp_path / "b", steps=2, **common), progress=False)
    with (tmp_path / "b" / "log.jsonl").open("a") as f:  # killed after logging step 3, before its state save
        f.write(json.dumps({"step": 3, "loss_diffusion": 9.0}) + '\n{"step": 4, "lo')
    resumed = train(cfg(data, tmp_path / "b", steps=4, **common), progress=False)
    a, _ = load_pipeline(straight)
    b, _ = load_pipeline(resumed)
    for (n, p), (_, q) in zip(a.unet.named_parameters(), b.unet.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)
    log = [json.loads(x)["step"] for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4]


def test_until_pauses_on_the_full_schedule_and_continues_exactly(data, vae_run, tmp_path):
    """--until 2 of a 4-step cosine run, then the same run on: the 4-step run's weights (the schedule is --steps',
    not the pause's); a pause writes the state but no checkpoint, and pausing again there changes nothing."""
    common = dict(model=str(vae_run / "checkpoint"), train=("unet",), sample_every=0, checkpoint_every=0, steps=4,
                  lr_schedule="cosine", warmup_steps=0)
    straight = train(cfg(data, tmp_path / "a", **common), progress=False)
    assert train(cfg(data, tmp_path / "b", **common), progress=False, until=2) is None
    state = tmp_path / "b" / "state"
    assert json.loads((state / "progress.json").read_text())["step"] == 2
    assert not (tmp_path / "b" / "checkpoint").exists()
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    full = [json.loads(x)["lr"] for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert lrs == full[:2] and lrs[1] > 0  # step 2 of 4, not the end of a 2-step decay
    before = (state / "progress.json").stat().st_mtime_ns
    assert train(cfg(data, tmp_path / "b", **common), progress=False, until=2) is None
    assert (state / "progress.json").stat().st_mtime_ns == before
    resumed = train(cfg(data, tmp_path / "b", **common), progress=False)
    a, _ = load_pipeline(straight)
    b, _ = load_pipeline(resumed)
    for (n, p), (_, q) in zip(a.unet.named_parameters(), b.unet.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)
    with pytest.raises(ValueError, match="--until must be a step >= 1, got 0"):
        train(cfg(data, tmp_path / "c", **common), progress=False, until=0)


def test_a_model_continues_at_twice_its_side(data, vae_run, tmp_path):
    """--image-size 64 on a 32 px model: the same weights read 64 px films (8 x 8 latents), the checkpoint says
    64 and generates at 64; its U-Net is the parent's, trained on."""
    from training.generation import TorchBackend

    parent, _ = load_pipeline(vae_run / "checkpoint")
    assert parent.vae.config.sample_size == 32
    folder = train(cfg(data, tmp_path / "big", model=str(vae_run / "checkpoint"), train=("unet",), image_size=64,
                       cache_latents=True), progress=False)
    pipe, _ = load_pipeline(folder)
    assert pipe.vae.config.sample_size == 64 and pipe.unet.config.sample_size == 8
    assert Manifest.read(folder).config["finetune"]["image_size"] == 64
    backend = TorchBackend(folder, "cpu")
    assert backend.native_size == 64
    assert backend.generate(["Cardiomegaly."], 0, 2, 2.0, "", 1, backend.native_size).shape[-2:] == (64, 64)
    changed = [n for (n, p), (_, q) in zip(pipe.unet.named_parameters(), parent.unet.named_parameters())
               if not torch.equal(p, q)]
    assert changed and all(p.shape == q.shape for p, q in zip(pipe.unet.parameters(), parent.unet.parameters()))
    from training.train.loop import resize_model

    with pytest.raises(ValueError, match=r"multiple of the VAE's downsampling \(8\), got 36"):
        resize_model(pipe, 36)


def test_loss_falls_on_a_fixed_batch(data, vae_run):
    from diffusers import DDPMScheduler

    from training.train.loop import Parts, collate, diffusion_loss, make_dataset

    pipe, _ = load_pipeline(vae_run / "checkpoint")
    c = cfg(data, "unused", model="x", train=("unet", "text_encoder"), text_dropout=0.0)
    batch = collate([make_dataset(c, 32)[i] for i in range(4)])
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    params = list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(30):
        torch.manual_seed(0)  # same noise and timesteps every step: only the weights change
        loss = diffusion_loss(Parts(pipe, {}), sched, batch["image"], batch["prompt"], c)
        opt.zero_grad(), loss.backward(), opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("args, message", [
    (["--init", "tiny", "--train", "foo"], "--train takes a comma list"),
    (["--init", "tiny", "--model", "x"], "exactly one of --model PATH or --init tiny"),
    (["--model", "/nonexistent"], "cannot load /nonexistent"),
    (["--init", "tiny", "--lr-schedule", "linear"], "invalid choice: 'linear'"),
    (["--init", "tiny", "--oversample", "Devices=4"], "--oversample: unknown label or kind 'Devices'"),
    (["--init", "tiny", "--oversample", "Support Devices"], "expected LABEL=K"),
    (["--init", "tiny", "--oversample", "Support Devices=0"], "must be an integer >= 1"),
    (["--init", "tiny", "--snr-gamma", "-1"], "--snr-gamma: expected a positive number or 'off'"),
    (["--init", "tiny", "--snr-gamma", "high"], "--snr-gamma: expected a positive number or 'off'"),
    (["--init", "tiny", "--until", "0"], "--until: expected a step number >= 1, got '0'"),
    (["--init", "tiny", "--until", "half"], "--until: expected a step number >= 1, got 'half'"),
    (["--model", "m", "--vae-factor", "4"], "--vae-factor builds a fresh model's VAE: use it with --init tiny"),
    (["--init", "tiny", "--vae-factor", "2"], "invalid choice: 2"),
    (["--init", "tiny", "--unet-attention", "cross,sparse"], "(or true / false), got 'sparse'"),
    (["--init", "tiny", "--unet-attention", "cross"], "unet_attention needs one entry per U-Net level (3), got 1"),
    (["--init", "tiny", "--contrast", "Devices=1"], "--contrast: unknown label 'Devices'"),
    (["--init", "tiny", "--contrast", "Fracture=1"], "--contrast Fracture: cxrgen cannot find this label's sentences"),
    (["--init", "tiny", "--contrast", "Support Devices=0"], "the weight must be a number > 0, got 0.0"),
    (["--init", "tiny", "--contrast", "Support Devices=x"], "--contrast 'Support Devices=x': expected LABEL=W, e.g. 'Support Devices=20'"),
    (["--init", "tiny", "--contrast", "Support Devices=1", "--contrast-beta", "0"], "--contrast-beta must be > 0"),
    (["--init", "tiny", "--contrast", "Support Devices=1", "--train", "vae"], "--contrast is a term of the denoising"),
    (["--init", "tiny", "--image-size", "64"], "--image-size resizes a loaded --model"),
    (["--model", "m", "--image-size", "60"], "--image-size must be a multiple of 8 and >= 32, got 60"),
    (["--init", "tiny", "--contrast-films", "--cache-latents"], "--contrast-films changes how --contrast pairs films"),
    (["--init", "tiny", "--contrast", "Support Devices=1", "--contrast-films"], "--contrast-films encodes the "
                                                                                "counterfactual films once: add --cache-latents"),
])
def test_cli_errors_are_clear(data, tmp_path, args, message):
    proc = subprocess.run([sys.executable, "-m", "training.cli", "train", "--data", data, "--out", str(tmp_path),
                           "--num-workers", "0", *args], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_oversample_by_a_simulator_kind(data, tmp_path):
    """--oversample KIND=K repeats the films whose simulated exam has that kind (not every film of its label);
    on data without the simulator's ground truth it is a clear CLI error."""
    import shutil
    from collections import Counter

    from training.findings import oversample_indices
    from training.train.loop import make_dataset

    probe = make_dataset(cfg(data, tmp_path, init="tiny", oversample={"nodule": 1}), 32)
    kinds = [{f["kind"] for f in probe.ground_truth[d]["findings"]} for d in probe.frame["dicom_id"]]
    kind = Counter(k for ks in kinds for k in ks).most_common(1)[0][0]
    c = cfg(data, tmp_path, init="tiny", oversample={kind: 3})
    c.validate()
    counts = Counter(oversample_indices(make_dataset(c, 32), c.oversample))
    assert [counts[i] for i in range(len(kinds))] == [3 if kind in ks else 1 for ks in kinds]
    assert 0 < sum(kind in ks for ks in kinds) < len(kinds)
    bare = tmp_path / "real"
    shutil.copytree(data, bare)
    (bare / "ground_truth.jsonl").unlink()
    proc = subprocess.run([sys.executable, "-m", "training.cli", "train", "--data", str(bare), "--out",
                           str(tmp_path / "o"), "--init", "tiny", "--oversample", f"{kind}=3"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"--oversample {kind}: a simulator kind is read from ground_truth.jsonl" in proc.stderr


@pytest.mark.parametrize("flag, gamma", [([], 5.0), (["--snr-gamma", "2.5"], 2.5), (["--snr-gamma", "off"], None),
                                         (["--snr-gamma", "none"], None)])
def test_snr_gamma_flag(flag, gamma):
    from training.train.command import config_from_args, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    c = config_from_args(parser.parse_args(["train", "--data", "d", "--out", "o", "--init", "tiny", *flag]))
    assert c.snr_gamma == gamma
    c.validate()


def test_vae_factor_picks_the_4x_layout_and_a_config_file_wins(tmp_path):
    from training.model.components import VAE_FACTOR_PRESETS, TinyModelConfig
    from training.train.command import config_from_args, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    base = ["train", "--data", "d", "--out", "o", "--init", "tiny"]
    c = config_from_args(parser.parse_args([*base, "--vae-factor", "4"]))
    assert c.model_config == VAE_FACTOR_PRESETS[4] and TinyModelConfig.from_dict(c.model_config).vae_factor == 4
    assert config_from_args(parser.parse_args(base)).model_config == {}  # 8x, Stable Diffusion's
    (tmp_path / "c.json").write_text(json.dumps({"model_config": {"unet_channels": [16, 32, 64]}}))
    c = config_from_args(parser.parse_args([*base, "--vae-factor", "4", "--config", str(tmp_path / "c.json")]))
    assert c.model_config["unet_channels"] == [16, 32, 64] and c.model_config["vae_channels"] == (32, 64, 128)
    with pytest.raises(ValueError, match="unet_attention needs one entry per U-Net level"):
        c.validate()  # the preset's 4 attention flags do not fit the file's 3 levels: named before any data loads


def test_4x_vae_then_unet_on_cached_latents(data, tmp_path):
    micro4 = {**MICRO, "vae_channels": [8, 8, 16], "unet_channels": [16, 16, 32],
              "unet_attention": [False, True, False]}
    train(cfg(data, tmp_path / "vae", init="tiny", model_config=micro4, train=("vae",)), progress=False)
    folder = train(cfg(data, tmp_path / "unet", model=str(tmp_path / "vae" / "checkpoint"), cache_latents=True),
                   progress=False)
    pipe, _ = load_pipeline(folder)
    assert pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size == 8
    assert (tmp_path / "unet" / "samples" / "final.png").is_file()
    # --unet-attention on a trained model: cross-attention on the text added at the outer 8 x 8 level, trained, saved,
    # resumed (the state loads onto the relaid-out U-Net); the manifest records the new layout
    from training.model.components import unet_layout

    grow = dict(model=str(folder), cache_latents=True, unet_attention=("cross", "full", "none"), checkpoint_every=1)
    train(cfg(data, tmp_path / "grow", steps=1, **grow), progress=False)
    grown = train(cfg(data, tmp_path / "grow", steps=2, **grow), progress=False)
    pipe2, manifest = load_pipeline(grown)
    assert unet_layout(pipe2.unet) == ("cross", "full", "none") and unet_layout(pipe.unet) == ("none", "full", "none")
    assert pipe2.unet.down_blocks[0].attentions[0].proj_out.weight.abs().sum() > 0  # it trained
    assert list(manifest.config["model"]["only_cross_attention"]) == [True, False, False]
    assert [json.loads(x)["step"] for x in (tmp_path / "grow" / "log.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((tmp_path / "grow" / "config.json").read_text())["unet_attention"] == ["cross", "full", "none"]
    proc = subprocess.run([sys.executable, "-m", "training.cli", "train", "--data", data, "--out",
                           str(tmp_path / "bad"), "--model", str(folder), "--unet-attention", "cross,full",
                           "--num-workers", "0", "--steps", "1"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--unet-attention needs one entry per U-Net level (3), got 2" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_plain_mse_weighs_low_noise_steps_fully(data, vae_run):
    """min-SNR gives the t < 25 steps under 12 % of their plain-MSE weight; --snr-gamma off gives them all of it."""
    from diffusers import DDPMScheduler

    from training.train.loop import Parts, collate, diffusion_loss, make_dataset

    pipe, _ = load_pipeline(vae_run / "checkpoint")
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    batch = collate([make_dataset(cfg(data, "unused", model="x"), 32)[i] for i in range(2)])
    low = lambda *a, **k: torch.full((2,), 10, dtype=torch.long)  # noqa: E731
    losses = {}
    for gamma in (5.0, None):
        c = cfg(data, "unused", model="x", train=("unet", "text_encoder"), text_dropout=0.0, snr_gamma=gamma)
        torch.manual_seed(0)
        with mock.patch.object(torch, "randint", low):
            losses[gamma] = diffusion_loss(Parts(pipe, {}), sched, batch["image"], batch["prompt"], c).item()
    assert losses[5.0] < 0.12 * losses[None]


@pytest.mark.parametrize("schedule, last", [("constant", 1e-3), ("cosine", 0.0)])
def test_lr_schedule_after_warmup(schedule, last):
    from training.train.loop import make_optimizer

    c = FinetuneConfig(data="d", out="o", init="tiny", steps=10, warmup_steps=2, lr=1e-3, lr_schedule=schedule)
    opt, sched = make_optimizer({"m": torch.nn.Linear(2, 2)}, c)
    lrs = []
    for _ in range(10):
        opt.step(), sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[1] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(last, abs=1e-12)
    if schedule == "cosine":
        assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_unknown_lr_schedule_is_rejected():
    with pytest.raises(ValueError, match="--lr-schedule"):
        FinetuneConfig(data="d", out="o", init="tiny", lr_schedule="step").validate()


def test_vae_decoder_only_keeps_the_latent_space(data, vae_run, tmp_path):
    before, _ = load_pipeline(vae_run / "checkpoint")
    folder = train(cfg(data, tmp_path, model=str(vae_run / "checkpoint"), train=("vae",), vae_decoder_only=True,
                       vae_crop=16, ema=False), progress=False)
    after, manifest = load_pipeline(folder)
    enc = lambda p: torch.cat([t.flatten() for t in p.vae.encoder.state_dict().values()])  # noqa: E731
    dec = lambda p: torch.cat([t.flatten() for t in p.vae.decoder.state_dict().values()])  # noqa: E731
    assert torch.equal(enc(before), enc(after)) and not torch.equal(dec(before), dec(after))
    assert after.vae.config.scaling_factor == before.vae.config.scaling_factor
    assert manifest.stage == "finetune:vae_decoder" and "latent_scaling_factor" not in manifest.metrics


def test_vae_decoder_only_needs_the_vae_stage():
    with pytest.raises(ValueError, match="--vae-decoder-only"):
        FinetuneConfig(data="d", out="o", init="tiny", train=("unet",), vae_decoder_only=True).validate()


def test_oversampling_repeats_the_images_positive_for_a_label():
    """Each image appears max(factor of its positive labels) times; negatives and uncertain ones once."""
    import numpy as np

    from training.findings import OBSERVATIONS
    from training.findings import oversampled

    labels = np.zeros((4, len(OBSERVATIONS)), np.float32)
    dev, eff = OBSERVATIONS.index("Support Devices"), OBSERVATIONS.index("Pleural Effusion")
    labels[1, dev] = 1.0
    labels[2, [dev, eff]] = 1.0
    labels[3, dev] = np.nan  # unknown: not positive
    assert oversampled(labels, {"Support Devices": 3, "Pleural Effusion": 2}) == [0, 1, 1, 1, 2, 2, 2, 3]
    assert oversampled(labels, {}) == [0, 1, 2, 3]


def test_cached_latents_are_kept_and_read_back_on_resume(data, vae_run, tmp_path):
    """--cache-latents keeps the posteriors in OUT/latents.pt: a resumed run reads them back (no encoding), and
    they are the ones a fresh encoding gives."""
    from training.train import loop as L

    kw = dict(model=str(vae_run / "checkpoint"), train=("unet",), cache_latents=True, checkpoint_every=1)
    train(cfg(data, tmp_path, **kw), progress=False)
    cache = tmp_path / "latents.pt"
    stamp = cache.stat().st_mtime_ns
    blob = torch.load(cache, weights_only=True)
    pipe, _ = load_pipeline(vae_run / "checkpoint")
    ds = L.make_dataset(cfg(data, tmp_path), pipe.vae.config.sample_size)
    fresh = L.cache_latents(pipe.vae, ds, cfg(data, tmp_path), progress=False, out=tmp_path / "fresh")  # encoded
    assert torch.allclose(blob["value"]["dists"], fresh.dists, atol=1e-5)
    assert blob["value"]["prompts"] == fresh.prompts and blob["key"]["size"] == 32
    with mock.patch.object(pipe.vae, "encode", side_effect=AssertionError("encoded again")):
        again = L.cache_latents(pipe.vae, ds, cfg(data, tmp_path), progress=False, out=tmp_path)
    assert torch.equal(again.dists, blob["value"]["dists"])
    train(cfg(data, tmp_path, **{**kw, "steps": 3}), progress=False)  # resumed
    assert cache.stat().st_mtime_ns == stamp


def test_encoder_fingerprint_follows_the_encoder_not_the_decoder(vae_run):
    from training.train.loop import encoder_fingerprint

    pipe, _ = load_pipeline(vae_run / "checkpoint")
    before = encoder_fingerprint(pipe.vae)
    with torch.no_grad():
        next(pipe.vae.decoder.parameters()).add_(1.0)
    assert encoder_fingerprint(pipe.vae) == before  # a decoder-only finetune keeps the cache valid
    with torch.no_grad():
        next(pipe.vae.encoder.parameters()).add_(1.0)
    assert encoder_fingerprint(pipe.vae) != before


@pytest.fixture(scope="module")
def masked(data, tmp_path_factory):
    """The training data with the simulator's finding masks of the lesion kinds (16 x 16 grid)."""
    import shutil

    from training.simulator.masks import finding_masks

    root = tmp_path_factory.mktemp("masked") / "sim"
    shutil.copytree(data, root)
    finding_masks(root, ("calcified_granuloma", "nodule", "mass"), grid=16, workers=1, progress=False)
    return str(root)


def test_focus_weights_are_one_plus_w_on_a_kinds_cells(masked):
    import numpy as np

    from training.simulator.masks import load_masks
    from training.train.loop import focus_weights, make_dataset

    ids = [str(d) for d in make_dataset(cfg(masked, "unused", init="tiny"), 32).frame["dicom_id"]]
    tables = {k: load_masks(masked, (k,))[0] for k in ("calcified_granuloma", "nodule", "mass")}
    kinds = [k for k, t in tables.items() if any(t.get(d, np.zeros(1)).any() for d in ids)]
    assert kinds, "the fixture should hold at least one lesion"
    w = focus_weights(masked, ids, {k: 4.0 + i for i, k in enumerate(kinds)}, (8, 8))
    assert w.shape == (len(ids), 8, 8)
    for n, d in enumerate(ids):
        want = torch.ones(8, 8)
        for i, k in enumerate(kinds):
            if d in tables[k]:
                on = torch.nn.functional.adaptive_max_pool2d(
                    torch.from_numpy(tables[k][d].astype(np.float32))[None, None], 8)[0, 0] > 0
                want = torch.where(on, torch.clamp(want, min=5.0 + i), want)
        torch.testing.assert_close(w[n], want)
    assert (w > 1).any() and (w == 1).all(dim=(1, 2)).any()  # lesion cells weighed, lesion-free films not


def test_focus_scales_the_denoising_error_cell_by_cell(data, vae_run):
    from diffusers import DDPMScheduler

    from training.train.loop import Parts, collate, diffusion_loss, make_dataset

    pipe, _ = load_pipeline(vae_run / "checkpoint")
    c = cfg(data, "unused", model="x", train=("unet",), text_dropout=0.0, snr_gamma=None)
    batch = collate([make_dataset(c, 32)[i] for i in range(4)])
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    h = 32 // 8

    def loss(focus=None):
        torch.manual_seed(0)
        keep = []
        with torch.no_grad():
            out = diffusion_loss(Parts(pipe, {}), sched, batch["image"], batch["prompt"], c, keep=keep, focus=focus)
        return out, keep[0].per

    plain, per = loss()
    doubled, per2 = loss(torch.full((4, h, h), 2.0))
    torch.testing.assert_close(doubled, 2 * plain)
    torch.testing.assert_close(per2, per)  # the contrast's per-image errors stay unweighted
    one_cell = torch.ones(4, h, h)
    one_cell[:, 0, 0] = 11.0
    assert loss(one_cell)[0] > plain


def test_focus_trains_on_cached_latents_and_errors_are_clear(data, masked, vae_run, tmp_path):
    folder = train(cfg(masked, tmp_path / "f", model=str(vae_run / "checkpoint"), train=("unet",),
                       cache_latents=True, focus={"mass": 20.0, "nodule": 10.0}), progress=False)
    assert (folder / "model_index.json").is_file()
    assert Manifest.read(folder).config["finetune"]["focus"] == {"mass": 20.0, "nodule": 10.0}
    for args, message in [
        (["--focus", "mass=20"], "--focus attaches each film's finding mask to its cached latent: add --cache-latents"),
        (["--focus", "blob=20", "--cache-latents"], "--focus: unknown simulator kind 'blob'"),
        (["--focus", "mass=0", "--cache-latents"], "--focus mass: the weight must be a number > 0"),
        (["--focus", "mass", "--cache-latents"], "expected KIND=W, e.g. 'mass=20'"),
        (["--focus", "pneumothorax=5", "--cache-latents"], "holds masks of"),
    ]:
        proc = subprocess.run([sys.executable, "-m", "training.cli", "train", "--data", masked, "--out",
                               str(tmp_path / "o"), "--init", "tiny", "--num-workers", "0", *args],
                              capture_output=True, text=True)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert message in proc.stderr, (message, proc.stderr)
    proc = subprocess.run([sys.executable, "-m", "training.cli", "train", "--data", data, "--out", str(tmp_path / "o"),
                           "--init", "tiny", "--focus", "mass=5", "--cache-latents"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "--focus reads the simulator's finding masks:" in proc.stderr and "has no finding_masks.npz" in proc.stderr


def test_ground_trains_on_cached_latents_and_errors_are_clear(masked, tmp_path):
    """--ground: a run on masked data logs the grounding term wherever a batch holds a grounded (film, word) pair,
    records the kinds in the manifest, and leaves the saved U-Net with its own attention processors."""
    kinds = {"mass": 1.0, "nodule": 1.0, "calcified_granuloma": 1.0}
    # a fresh micro model whose tokenizer learns these reports and reads 64 tokens: the granuloma films' words
    # fall inside the prompt it reads; those films are shown 4 times an epoch
    folder = train(cfg(masked, tmp_path / "g", init="tiny", model_config={**MICRO, "max_length": 64},
                       train=("unet",), cache_latents=True, ground=kinds, oversample={"calcified_granuloma": 4},
                       steps=6, batch_size=4, text_dropout=0.0), progress=False)
    assert Manifest.read(folder).config["finetune"]["ground"] == kinds
    rows = [json.loads(x) for x in (tmp_path / "g" / "log.jsonl").read_text().splitlines()]
    grounded = [r for r in rows if "loss_ground" in r]
    assert grounded and all(0.0 <= r["ground_share"] <= 1.0 and r["loss_ground"] >= 0 for r in grounded)
    pipe, _ = load_pipeline(folder)
    assert not any(type(p).__name__ == "GroundingProcessor" for p in pipe.unet.attn_processors.values())
    for args, message in [
        (["--ground", "mass=1"], "--ground attaches each film's finding mask to its cached latent: add --cache-latents"),
        (["--ground", "consolidation=1", "--cache-latents"], "--ground: no report words are known for ['consolidation']"),
        (["--ground", "mass=0", "--cache-latents"], "--ground mass: the weight must be a number > 0"),
        (["--ground", "mass", "--cache-latents"], "--ground 'mass': expected KIND=W, e.g. 'mass=1'"),
        (["--ground", "mass=1", "--cache-latents", "--train", "text_encoder"],
         "--ground trains the U-Net's cross-attention: include unet in --train"),
    ]:
        proc = subprocess.run([sys.executable, "-m", "training.cli", "train", "--data", masked, "--out",
                               str(tmp_path / "o"), "--init", "tiny", "--num-workers", "0", *args],
                              capture_output=True, text=True)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert message in proc.stderr, (message, proc.stderr)


def test_noise_shift_divides_the_snr_and_travels_with_the_checkpoint(data, vae_run, tmp_path):
    """--noise-shift 4: the trained model's schedule has a quarter of its parent's SNR at every timestep, saved in
    its scheduler config, so every sampler built from it (and a second shift on top) follows it."""
    from training.generation import make_scheduler
    from training.model.components import shift_noise_schedule

    parent, _ = load_pipeline(vae_run / "checkpoint")
    folder = train(cfg(data, tmp_path / "s", model=str(vae_run / "checkpoint"), train=("unet",), noise_shift=4.0),
                   progress=False)
    pipe, manifest = load_pipeline(folder)
    assert manifest.config["finetune"]["noise_shift"] == 4.0
    snr = lambda ac: ac.double() / (1 - ac.double())  # noqa: E731
    torch.testing.assert_close(snr(pipe.scheduler.alphas_cumprod), snr(parent.scheduler.alphas_cumprod) / 4,
                               rtol=1e-4, atol=0)
    assert type(pipe.scheduler) is type(parent.scheduler)
    assert pipe.scheduler.config.set_alpha_to_one == parent.scheduler.config.set_alpha_to_one
    for name in ("ddpm", "dpm", "euler"):
        torch.testing.assert_close(make_scheduler(name, pipe.scheduler.config).alphas_cumprod,
                                   pipe.scheduler.alphas_cumprod)
    twice = shift_noise_schedule(shift_noise_schedule(parent.scheduler, 2.0), 2.0)
    torch.testing.assert_close(twice.alphas_cumprod, pipe.scheduler.alphas_cumprod, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(shift_noise_schedule(parent.scheduler, 1.0).alphas_cumprod,
                               parent.scheduler.alphas_cumprod, rtol=1e-6, atol=1e-8)
    # Ramped: no shift at the first timestep, half the shift (in log SNR) midway, all of it at the last.
    ramp = shift_noise_schedule(parent.scheduler, 4.0, ramp=True).alphas_cumprod
    ratio = snr(ramp) / snr(parent.scheduler.alphas_cumprod)
    n = len(ratio) - 1
    torch.testing.assert_close(ratio[[0, n // 2, n]].float(), torch.tensor([1.0, 4 ** -((n // 2) / n), 0.25]),
                               rtol=1e-4, atol=0)
    assert bool((ratio[1:] <= ratio[:-1]).all())
    # A run without the flag keeps its parent's schedule as it is.
    plain, _ = load_pipeline(train(cfg(data, tmp_path / "p", model=str(vae_run / "checkpoint"), train=("unet",)),
                                   progress=False))
    assert torch.equal(plain.scheduler.alphas_cumprod, parent.scheduler.alphas_cumprod)


@pytest.mark.parametrize("args", [["--noise-shift", "0"], ["--noise-shift", "-2"], ["--noise-shift", "nan"],
                                  ["--noise-shift", "four"], ["--noise-shift-ramp"]])
def test_a_bad_noise_shift_is_refused_by_name(args, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "training.cli", "train", "--data", str(tmp_path), "--out",
                           str(tmp_path / "o"), "--init", "tiny", *args],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "--noise-shift" in proc.stderr
