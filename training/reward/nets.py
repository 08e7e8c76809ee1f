"""Small networks shared by the reward kinds: image trunk, finding embedding, text encoder.

Each reward owns its own instance (its own weights): they are small on purpose.
Scoring runs on every generated image, and issue 7 caps it at 20% of generation
time at batch 8 on CPU (0.38 s / image there), so all five rewards together get
about 0.07 s per image. A trunk is a plain strided CNN (conv-BN-ReLU) that keeps a
4 x 4 grid of features before the head, so laterality (left vs right effusion)
and position (a shifted or rotated patient) survive pooling.
"""

from __future__ import annotations

import re
import zlib
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from training.findings import KINDS, Finding, Laterality, Severity

KIND_NAMES: tuple[str, ...] = tuple(KINDS)
# Per kind: present, on the left, on the right, severity level (0, 1/3, 2/3, 1 for none/small/moderate/large).
FINDING_SLOTS = 4
FINDING_DIM = len(KIND_NAMES) * FINDING_SLOTS
_SEVERITY = {None: 0.0, Severity.SMALL: 1 / 3, Severity.MODERATE: 2 / 3, Severity.LARGE: 1.0}


def prepare(images: torch.Tensor, size: int) -> torch.Tensor:
    """Check (N, 1, H, W) input, letterbox non-square images with black, resize to ``size``, clamp to [-1, 1]."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 1:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected images as a float tensor (N, 1, H, W) in [-1, 1], got {shape}")
    x = images.float()
    h, w = x.shape[-2:]
    if h != w:
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        x = F.pad(x, (left, side - w - left, top, side - h - top), value=-1.0)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(-1.0, 1.0)


class Trunk(nn.Module):
    """(N, 1, S, S) -> (N, features): stages of stride-2 conv (+ one stride-1 conv from stage 2 on), BN, ReLU.

    The first stage has a single conv: at full resolution a second one would cost
    as much as the rest of the network. The last feature map is average-pooled to
    4 x 4 (not 1 x 1), flattened and projected, so the head still knows where
    things are.
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 64, 128), features: int = 256) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            if i > 0:
                layers += [nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.proj = nn.Sequential(nn.Flatten(1), nn.Linear(c_in * 16, features), nn.ReLU(inplace=True))
        self.features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pool(self.body(x)))


def encode_findings(findings: Sequence[Sequence[Finding]]) -> torch.Tensor:
    """Declared findings -> (N, 48) multi-hot: per kind present, left, right, severity level.

    Bilateral sets both sides; a lobar finding's side comes from its lobe
    (``Finding`` fills it in). This is the class-conditioning of Sun et al.'s
    reward model, extended from one class to CheXpert-style finding sets.
    """
    out = torch.zeros((len(findings), FINDING_DIM))
    for i, fs in enumerate(findings):
        for f in fs:
            if not isinstance(f, Finding):
                raise ValueError(f"findings must be lists of training.findings.Finding, got {f!r}")
            j = KIND_NAMES.index(f.kind) * FINDING_SLOTS
            out[i, j] = 1.0
            out[i, j + 1] = max(out[i, j + 1], float(f.side in (Laterality.LEFT, Laterality.BILATERAL)))
            out[i, j + 2] = max(out[i, j + 2], float(f.side in (Laterality.RIGHT, Laterality.BILATERAL)))
            out[i, j + 3] = max(out[i, j + 3], _SEVERITY[f.severity])
    return out


class ConditionalHead(nn.Module):
    """Image features + declared findings -> one logit (Sun et al.'s class-conditional reward head).

    The findings' embedding is concatenated with the image features and with their
    elementwise product (a FiLM-like interaction: "is there an effusion *where the
    prompt says*"), then an MLP gives the logit.
    """

    def __init__(self, features: int, embed: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(FINDING_DIM, embed), nn.ReLU(inplace=True), nn.Linear(embed, features))
        self.mlp = nn.Sequential(nn.Linear(3 * features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        e = self.embed(cond.to(h.device))
        return self.mlp(torch.cat([h, e, h * e], dim=1)).squeeze(1)


# ---------------------------------------------------------------------------- text

_WORD = re.compile(r"[a-z]+")


def text_features(text: str, buckets: int) -> list[int]:
    """Hashed unigrams and bigrams of lower-cased words (CRC32 mod ``buckets``: stable across runs).

    Bigrams keep the negations and sides that bags of words lose ("no effusion",
    "left pleural"). Never empty: a text with no words maps to bucket 0.
    """
    words = _WORD.findall(text.lower())
    grams = words + [a + " " + b for a, b in zip(words, words[1:])]
    return [zlib.crc32(g.encode()) % buckets for g in grams] or [0]


class TextEncoder(nn.Module):
    """A bag of hashed n-grams -> (N, dim) embedding: mean of learned vectors, then an MLP."""

    def __init__(self, buckets: int = 8192, width: int = 128, dim: int = 128) -> None:
        super().__init__()
        self.buckets = buckets
        self.bag = nn.EmbeddingBag(buckets, width, mode="mean")
        self.mlp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.ReLU(inplace=True),
                                 nn.Linear(width, dim))

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        ids = [text_features(t, self.buckets) for t in texts]
        offsets = torch.tensor([0] + [len(i) for i in ids[:-1]]).cumsum(0)
        flat = torch.tensor([j for i in ids for j in i], dtype=torch.long)
        dev = self.bag.weight.device
        return self.mlp(self.bag(flat.to(dev), offsets.to(dev)))
