"""Tiny reward folders for the export tests and benchmarks (random weights; not used in production).

Every registered reward kind with a small trunk, saved exactly as ``training.reward.base.save_reward``
saves a trained one, so ``load_reward`` / ``generation_scorer`` and the exporter read them as they read
models/rewards. ``consistency`` gets a different image size than the others so that the host-side resize
(``training.reward.nets.prepare``) is exercised too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of images in [0, 1] (inf for identical images): the parity measure of every backend."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def micro_rewards(folder: str | Path, image_size: int = 32, seed: int = 0) -> Path:
    from training.reward.base import reward_class, save_reward
    from training.reward.config import REWARD_NAMES

    folder = Path(folder)
    torch.manual_seed(seed)
    for name in REWARD_NAMES:
        kw = {"image_size": image_size, "channels": (8, 16), "features": 32}
        if name == "consistency":
            kw.update(image_size=image_size + 16, embed_dim=16, text_buckets=64)
        cls = reward_class(name)
        net = cls.Net(**kw).eval()
        with torch.no_grad():  # move the buffers off their defaults, so the graphs must carry them
            for buf_name, buf in net.named_buffers():
                if buf.is_floating_point() and "running" not in buf_name:
                    buf.add_(torch.rand_like(buf) * 0.5)
        save_reward(cls(net), folder / name, config={"micro": True}, metrics={}, data={})
    return folder
