"""The panel's vocabulary and its training configuration.

The criteria are the feedback store's fixed list (``training.feedback.store.CRITERIA``, issue 7,
section 1); they are repeated here so the panel's logic does not need a database driver, and a test
checks that both lists agree.
"""

from __future__ import annotations

import dataclasses

from training.findings import KINDS

CRITERIA: tuple[str, ...] = ("finding_absent", "wrong_side", "wrong_size", "unprompted_finding", "anatomy",
                             "posture", "artefact")
KIND_NAMES: tuple[str, ...] = tuple(KINDS)  # presence head order
# Kinds that have a side (sided kinds, and lobar kinds through their lobe): laterality head order.
SIDED_KINDS: tuple[str, ...] = tuple(k for k, s in KINDS.items() if s.sided or s.lobar)
GRADED_KINDS: tuple[str, ...] = tuple(k for k, s in KINDS.items() if s.graded)  # severity head order
SEVERITIES: tuple[str, ...] = ("small", "moderate", "large")
# A calcified granuloma is an incidental, benign finding: a reader would not fail a film for an
# unreported one. Everything else (a pneumothorax, a mass, a line nobody asked for) is major.
MAJOR_KINDS: tuple[str, ...] = tuple(k for k in KINDS if k != "calcified_granuloma")
# Kinds that look alike on a film (lobar opacities; round lesions): when one is prompted, reading
# another of its group is not an "unprompted" finding.
RELATED: tuple[frozenset[str], ...] = (
    frozenset({"consolidation", "pneumonia", "atelectasis"}),
    frozenset({"nodule", "mass", "calcified_granuloma"}),
)
DEVICES: tuple[str, ...] = ("cpu", "cuda", "auto")
PANEL_FILE = "panel.json"
WEIGHTS_FILE = "panel.safetensors"
FORMAT_VERSION = 1  # of panel.json


def related(kind: str) -> frozenset[str]:
    """The kinds that ``kind`` may be mistaken for (itself included)."""
    out = {kind}
    for group in RELATED:
        if kind in group:
            out |= group
    return frozenset(out)


@dataclasses.dataclass
class PanelConfig:
    """How to train the panel's networks and calibrate its checks (stored in panel.json)."""

    reader_size: int = 128  # side the reader CNN sees (the generator's size)
    critic_size: int = 64  # side the critic sees: gestalt and structure, not fine-scale texture
    width: int = 16  # reader channels of the first stage (doubling to 8x); 16: ~0.56 M parameters, 2.2 MB
    epochs: int = 12  # reader passes over the training split
    critic_epochs: int = 6  # critic passes over the training split
    batch_size: int = 32  # images per optimisation step
    lr: float = 2e-3  # AdamW learning rate, cosine-annealed to 0
    weight_decay: float = 1e-4  # AdamW decoupled weight decay
    pos_weight_max: float = 10.0  # presence BCE positive weight sqrt(neg / pos) per kind, capped (<= 1: off)
    side_weight: float = 0.5  # laterality BCE weight next to the presence BCE
    severity_weight: float = 0.5  # severity cross-entropy weight
    pose_weight: float = 0.5  # pose MSE (standardised units) weight
    jitter: float = 0.1  # contrast x(1 +- jitter), brightness +- jitter/2 (intensity only: no flips)
    critic_sigma: float = 1.0  # fixed Gaussian blur (pixels at critic size) inside the critic: no texture cues
    critic_blur: float = 1.5  # max extra blur sigma (pixels at reader size), a training augmentation for all
    generated_holdout: float = 0.2  # share of --generated images held out for the critic's AUROC
    anatomy_band: tuple[float, float] = (0.5, 99.5)  # percentiles of real films bounding each anatomy feature
    limit: int = 0  # read at most this many films of each split (0: all); for smoke tests
    seed: int = 0  # weight init, shuffling, augmentation and corruptions: same seed, same panel (CPU)
    threads: int = 1  # torch CPU threads: small convolutions gain little from 2; a shared machine punishes thread sync
    device: str = "cpu"  # "cpu", "cuda" or "auto"

    def __post_init__(self) -> None:
        for name in ("reader_size", "critic_size", "width", "epochs", "critic_epochs", "batch_size", "threads"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.reader_size < 32 or self.critic_size < 32:
            raise ValueError(f"reader_size and critic_size must be >= 32 (the nets downsample 16x), got "
                             f"{self.reader_size}, {self.critic_size}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(f"need lr > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")
        if not 0.0 <= self.jitter < 1.0 or self.critic_blur < 0 or self.critic_sigma < 0:
            raise ValueError(f"need 0 <= jitter < 1, critic_blur >= 0, critic_sigma >= 0; got {self.jitter}, "
                             f"{self.critic_blur}, {self.critic_sigma}")
        if not 0.0 < self.generated_holdout < 1.0:
            raise ValueError(f"generated_holdout must be in (0, 1), got {self.generated_holdout}")
        lo, hi = self.anatomy_band = tuple(float(v) for v in self.anatomy_band)
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"anatomy_band must be two percentiles lo < hi in [0, 100], got {self.anatomy_band}")
        if self.limit < 0 or self.seed < 0:
            raise ValueError(f"limit and seed must be >= 0, got {self.limit}, {self.seed}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {list(DEVICES)}, got {self.device!r}")
