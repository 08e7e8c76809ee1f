"""``RewardConfig``: how to train one reward (printed at start, saved in the reward manifest)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

# Here, not in base.py (which imports torch), so that the CLI builds its flags without loading torch.
REWARD_NAMES: tuple[str, ...] = ("plausibility", "comparative", "posture", "diagnosis", "consistency")
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent.parent / "models" / "rewards"

# Kinds that learn from the feedback store's ratings / comparisons; the other three learn from simulator data.
STORE_KINDS: tuple[str, ...] = ("plausibility", "comparative")
LABEL_MODES: tuple[str, ...] = ("majority", "soft")


@dataclasses.dataclass
class RewardConfig:
    """One config for every kind; fields a kind does not use are ignored (and still recorded)."""

    kind: str = "plausibility"  # which reward: plausibility | comparative | posture | diagnosis | consistency
    out: str = ""  # output folder; "" -> models/rewards/<kind>
    # simulated MIMIC-layout data set with ground_truth.jsonl (simulate --seed 3: the rewards' own eye);
    # training data of posture / diagnosis / consistency, weak positives of plausibility; "" -> none
    data: str = "runs/sim-reward"
    store: str = ""  # feedback store URL (plausibility, comparative); "" -> $CXRGEN_STORE, else the default file
    blobs: str = ""  # the store's image folder; "" -> the store's default
    # --- network
    image_size: int = 128  # side in pixels the network sees (inputs are resized); 64-128 keeps scoring cheap
    channels: tuple[int, ...] = (16, 32, 64, 128)  # trunk width per stride-2 stage
    features: int = 256  # trunk output features
    embed_dim: int = 128  # consistency: joint image / text embedding size
    text_buckets: int = 8192  # consistency: hashed unigram + bigram vocabulary of the text encoder
    # --- optimisation
    epochs: int = 10  # passes over the training set
    batch_size: int = 32  # valid images per step (plus as many corrupted ones for the validity head)
    lr: float = 2e-3  # AdamW learning rate (from scratch), cosine-annealed to 0
    weight_decay: float = 1e-4  # AdamW decoupled weight decay
    jitter: float = 0.1  # intensity augmentation of valid images: contrast x(1 +- jitter), brightness +- jitter/2
    validity_weight: float = 1.0  # weight of the valid-vs-corrupted BCE next to the task loss
    seed: int = 0  # weight init, shuffling, augmentation, corruptions, splits: same seed, same model (CPU)
    device: str = "cpu"  # "cpu", "cuda" or "auto"
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    max_train: int = 0  # use at most this many training images / pairs (0: all): quick runs and tests
    # --- held-out splits of store data (by prompt: held-out prompts are never seen in training)
    val_fraction: float = 0.15  # prompts for calibration (temperature) and model selection
    test_fraction: float = 0.15  # prompts for the reported metrics
    # --- plausibility (Sun et al. 2023)
    label_mode: str = "majority"  # per image: "majority" of the panel (ties 0.5), or "soft" (fraction plausible)
    weak_positive_weight: float = 0.3  # loss weight of real simulated images as positives (weak: never rated)
    max_weak_positives: int = 2000  # at most this many real images from --data as weak positives (0: none)
    # --- comparative (Bradley-Terry)
    tie_weight: float = 1.0  # loss weight of tied comparisons (target 0.5)
    # --- posture (CXRL): reward = exp(-0.5 * sum((pose_k / scale_k)^2)) over rotations and shifts
    rotation_scale_deg: float = 5.0  # a 5 degree roll / yaw / pitch alone gives exp(-0.5) = 0.61
    shift_scale_mm: float = 20.0  # a 20 mm off-centre patient alone gives 0.61
    # --- consistency (CXRL, CXR-CLIP-like)
    retrieval_pool: int = 1000  # held-out images for recall@k (their distinct report texts are the candidates)

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        if self.kind not in REWARD_NAMES:
            raise ValueError(f"unknown reward kind {self.kind!r}; known: {list(REWARD_NAMES)}")
        if not self.out:
            self.out = str(DEFAULT_MODEL_DIR / self.kind)
        for name in ("image_size", "epochs", "batch_size", "features", "embed_dim", "text_buckets"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not 32 <= self.image_size <= 512:
            raise ValueError(f"image_size must be in [32, 512], got {self.image_size}")
        if not self.channels or min(self.channels) < 1:
            raise ValueError(f"channels must be positive ints, got {self.channels}")
        if self.label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode must be one of {list(LABEL_MODES)}, got {self.label_mode!r}")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"device must be cpu, cuda or auto, got {self.device!r}")
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1
                and self.val_fraction + self.test_fraction < 1):
            raise ValueError(f"need 0 <= val_fraction, test_fraction and their sum < 1; got "
                             f"{self.val_fraction}, {self.test_fraction}")
        if not (self.lr > 0 and self.weight_decay >= 0 and self.validity_weight >= 0 and 0 <= self.jitter < 1):
            raise ValueError("need lr > 0, weight_decay >= 0, validity_weight >= 0, 0 <= jitter < 1")
        if not (self.rotation_scale_deg > 0 and self.shift_scale_mm > 0):
            raise ValueError("rotation_scale_deg and shift_scale_mm must be > 0")
        if self.max_train < 0 or self.max_weak_positives < 0 or self.weak_positive_weight < 0 or self.tie_weight < 0:
            raise ValueError("max_train, max_weak_positives, weak_positive_weight and tie_weight must be >= 0")

    @property
    def net(self) -> dict:
        """The trunk's constructor arguments."""
        return {"image_size": self.image_size, "channels": list(self.channels), "features": self.features}

    @property
    def out_path(self) -> Path:
        return Path(self.out)
