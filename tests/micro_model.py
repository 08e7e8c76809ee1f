"""The micro Stable-Diffusion-architecture checkpoint several test modules build (32 px, random weights)."""

from __future__ import annotations

from pathlib import Path

import torch

from training.model.checkpoint import Manifest, save_checkpoint
from training.model.components import TinyModelConfig, build_pipeline, train_tokenizer

MICRO = TinyModelConfig(image_size=32, vae_channels=(8, 8, 16, 16), unet_channels=(16, 32), unet_head_dim=4,
                        text_hidden=16, text_layers=1, text_heads=2, text_intermediate=32, max_length=32,
                        vocab_size=500)


def micro_checkpoint(folder: Path, version: str = "micro-v1", reports: int = 400,
                     config: TinyModelConfig = MICRO) -> Path:
    """A saved micro checkpoint (tokenizer trained on the first ``reports`` IU reports, seed 0)."""
    from training.data.reports import load_reports

    tok = train_tokenizer([r.prompt for r in load_reports()[:reports]], config.vocab_size, config.max_length)
    torch.manual_seed(0)
    save_checkpoint(build_pipeline(config, tok), folder, Manifest(version=version, stage="init"))
    return folder
