"""The panel's two networks: a reader CNN and a low-capacity realism critic.

Both take (N, 1, H, W) images in [-1, 1] and resize them to their own side (antialiased), so
a 128 px or 256 px film reads the same. They are small on purpose: the panel is trained on two CPU
cores in minutes and its folder is committed (models/panel, a few MB).

The reader keeps a coarse 4 x 4 spatial map before its heads rather than pooling globally: left
and right are positions, and a globally pooled feature would have to smuggle laterality through
padding effects.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import GRADED_KINDS, KIND_NAMES, SEVERITIES, SIDED_KINDS
from training.evaluate.judge import POSE_KEYS


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Check (N, 1, H, W) square input; antialiased bilinear resize to ``size``."""
    if x.ndim != 4 or x.shape[1] != 1 or x.shape[2] != x.shape[3]:
        raise ValueError(f"expected square (N, 1, H, W) images in [-1, 1], got shape {tuple(x.shape)}")
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


def _conv(cin: int, cout: int, stride: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Reader(nn.Module):
    """Presence of the 12 kinds, left / right per sided kind, severity per graded kind, pose.

    ``forward(x)`` returns logits ``presence`` (N, 12), ``side`` (N, 9, 2) [left, right],
    ``severity`` (N, 5, 3) [small, moderate, large] and standardised ``pose_z`` (N, 7), plus
    ``pose`` in physical units (the training poses' mean / std travel as buffers).
    """

    def __init__(self, size: int = 128, width: int = 16) -> None:
        super().__init__()
        self.size, self.width = int(size), int(width)
        w = self.width
        self.trunk = nn.Sequential(
            _conv(1, w, 2, k=5),  # 1/2
            _conv(w, 2 * w, 2), _conv(2 * w, 2 * w, 1),  # 1/4
            _conv(2 * w, 4 * w, 2), _conv(4 * w, 4 * w, 1),  # 1/8
            _conv(4 * w, 8 * w, 2), _conv(8 * w, 8 * w, 1),  # 1/16
            nn.AdaptiveAvgPool2d(4), nn.Flatten(1),
            nn.Linear(8 * w * 16, 128), nn.ReLU(), nn.Dropout(0.2),
        )
        self.presence = nn.Linear(128, len(KIND_NAMES))
        self.side = nn.Linear(128, 2 * len(SIDED_KINDS))
        self.severity = nn.Linear(128, len(SEVERITIES) * len(GRADED_KINDS))
        self.pose = nn.Linear(128, len(POSE_KEYS))
        self.register_buffer("pose_mean", torch.zeros(len(POSE_KEYS)))
        self.register_buffer("pose_std", torch.ones(len(POSE_KEYS)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(resize(x, self.size))
        z = self.pose(h)
        return {
            "presence": self.presence(h),
            "side": self.side(h).view(-1, len(SIDED_KINDS), 2),
            "severity": self.severity(h).view(-1, len(GRADED_KINDS), len(SEVERITIES)),
            "pose_z": z,
            "pose": z * self.pose_std + self.pose_mean,
        }

    @torch.no_grad()
    def set_pose_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.pose_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.pose_std.copy_(torch.as_tensor(std, dtype=torch.float32))


class Critic(nn.Module):
    """Realism critic: one logit, > 0 leaning "not a real radiograph" (generated or corrupted).

    Reads the film at ``size`` (64 px by default), blurred by a fixed Gaussian of ``sigma`` pixels
    and standardised per image, through four strided convolutions of at most 32 channels and a
    4 x 4 map: enough to see layout (a duplicated heart, a blank band, a smear). The fixed blur
    takes away what it must not learn: the simulator's quantum noise and the tiny generator's
    fine-scale softness (measured elsewhere, by the VAE reconstruction FID), since every film,
    real or not, reaches the network equally soft.
    """

    def __init__(self, size: int = 64, sigma: float = 1.0) -> None:
        super().__init__()
        self.size, self.sigma = int(size), float(sigma)
        self.net = nn.Sequential(
            _conv(1, 8, 2), _conv(8, 16, 2), _conv(16, 32, 2), _conv(32, 32, 2),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(1), nn.Dropout(0.3), nn.Linear(32 * 16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .corrupt import blur

        return self.net(standardize(blur(resize(x, self.size), self.sigma)))[:, 0]


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Per-image zero mean, unit standard deviation: the critic reads structure, not exposure.

    A radiologist windows a film before reading it; a film that is merely brighter or flatter
    than usual is not an artefact (the anatomy checks' brightness / contrast bands flag a
    non-diagnostic exposure). Without this, the tiny generator's global brightness offset alone
    separates its images from real ones (AUROC ~0.85 from the mean grey level).
    """
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - m) / x.std(dim=(1, 2, 3), keepdim=True).clamp(min=1e-3)


def n_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
