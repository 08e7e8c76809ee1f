"""benchmarks/contrast_margins.py: the contrast's margin, zero where the two readings are one."""

import sys
from pathlib import Path

import pytest
import torch
from micro_model import micro_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import contrast_margins as cm  # noqa: E402


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from diffusers import DDPMScheduler

    from training.model.checkpoint import load_pipeline

    p, _ = load_pipeline(micro_checkpoint(tmp_path_factory.mktemp("m")))
    return p, DDPMScheduler.from_config(p.scheduler.config)


def test_margin_is_zero_for_one_reading_and_signed_by_which_is_worse(pipe):
    p, sched = pipe
    images = torch.rand(3, 1, 32, 32) * 2 - 1
    texts = ["Endotracheal tube in place. Lungs clear.", "Right IJ central line. No effusion.", "Lungs clear."]
    assert torch.equal(cm.margins(p, sched, images, texts, texts), torch.zeros(3))
    stripped = ["Lungs clear.", "No effusion.", "Lungs clear."]
    forward, backward = cm.margins(p, sched, images, texts, stripped), cm.margins(p, sched, images, stripped, texts)
    torch.testing.assert_close(forward, -backward)  # same noise and timesteps: swapping the readings flips the sign
    assert forward[2] == 0 and forward[:2].abs().min() > 0
    s = cm.summary(forward)
    assert s["n"] == 3 and s["margin_x1e5"] == pytest.approx(float(forward.mean()) * 1e5) and 0 <= s["positive"] <= 1
