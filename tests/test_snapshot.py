"""benchmarks/snapshot.py (a run's EMA weights mid-run) and benchmarks/device_look.py (device prompts, with and
without the device sentence)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from micro_model import micro_checkpoint

from training.model.checkpoint import load_pipeline

REPO = Path(__file__).resolve().parent.parent


def bench(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO)


@pytest.mark.parametrize("grown", [{}, {"unet_attention": ("cross", "none"), "image_size": 64}],
                         ids=["same-layout", "relaid-out-at-64px"])
def test_snapshot_of_a_finished_run_is_its_checkpoint(tmp_path, grown):
    """Also for a run that relaid its U-Net out and changed its side (--unet-attention, --image-size): the
    snapshot builds the run's layout before it takes the EMA weights."""
    from training.simulator.dataset import SimulateConfig, simulate
    from training.train.config import FinetuneConfig
    from training.train.loop import train

    data = tmp_path / "sim"
    simulate(SimulateConfig(out=str(data), n=12, size=128, seed=4, workers=1), progress=False)
    parent = micro_checkpoint(tmp_path / "parent")
    run = tmp_path / "run"
    final = train(FinetuneConfig(data=str(data), out=str(run), model=str(parent), steps=3, batch_size=4,
                                 num_workers=0, sample_every=0, checkpoint_every=0, warmup_steps=1, lr=1e-3,
                                 version="micro-ft", **grown), progress=False)
    proc = bench("benchmarks/snapshot.py", str(parent), str(run), str(tmp_path / "snap"))
    assert proc.returncode == 0, proc.stderr
    a, _ = load_pipeline(final)
    b, manifest = load_pipeline(tmp_path / "snap")
    for part in ("unet", "text_encoder"):
        for (n, p), (_, q) in zip(getattr(a, part).named_parameters(), getattr(b, part).named_parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    assert manifest.version == "micro-ft-step3" and manifest.stage == "snapshot"
    assert b.unet.config.down_block_types == a.unet.config.down_block_types
    assert b.vae.config.sample_size == a.vae.config.sample_size == grown.get("image_size", 32)
    assert manifest.parent_version == "micro-v1" and manifest.config["step"] == 3
    again = bench("benchmarks/snapshot.py", str(parent), str(run), str(tmp_path / "snap"))
    assert again.returncode == 2 and "exists: give a new folder" in again.stderr
    bad = bench("benchmarks/snapshot.py", str(parent), str(tmp_path), str(tmp_path / "x"))
    assert bad.returncode == 2 and "no saved state with EMA weights" in bad.stderr and "Traceback" not in bad.stderr


def test_device_look_draws_with_without_and_the_difference(tmp_path):
    folder = micro_checkpoint(tmp_path / "m")
    out = tmp_path / "look.png"
    proc = bench("benchmarks/device_look.py", f"micro={folder}", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "micro mean abs difference per pair:" in proc.stdout
    from PIL import Image

    size = load_pipeline(folder)[0].vae.config.sample_size
    assert Image.open(out).size == (4 * size, 3 * size)
    assert bench("benchmarks/device_look.py", "micro=/nonexistent").returncode == 2
