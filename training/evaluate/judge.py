"""Judge models of the evaluation harness (issue 3, section 5).

A judge is a chest X-ray classifier trained on (simulated or real) MIMIC-CXR-JPG
data that reads generated images back: its 14 CheXpert logits say whether an
image shows what its prompt asked for, its posture head measures the patient's
pose, and its pooled features are the FID feature space (RoentGen computed FID
with a CXR DenseNet-121, not ImageNet Inception, whose features know no anatomy).

Conventions:

- Input: (N, 1, H, W), square, in [-1, 1] (``MimicCXRDataset(normalize="unit")``,
  the generator's range). Other sides are resized to ``image_size`` inside the model.
- Findings: 14 logits in ``training.findings.OBSERVATIONS`` order.
- Posture: 7 values in ``POSE_KEYS`` order, in physical units (degrees, mm,
  ratios). The head predicts standardised values; the model de-standardises
  with the training set's mean / std, stored as buffers so they travel with the
  weights.
- Artifacts of ``train_judge``: ``judge.safetensors`` (``judge.pt`` when
  safetensors is not installed), ``judge.json`` (config, pose statistics, final
  metrics) and ``log.jsonl`` (one object per epoch).

Weights are always randomly initialised (``weights=None``): nothing can be
downloaded where cxrgen is built, and ImageNet features would be a poor fit for
one-channel radiographs anyway.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.artifacts import jsonable as _jsonable, read_meta, trim_log
from training.evaluate.config import ARCHS, POOLINGS, PRECISIONS
from training.findings import OBSERVATIONS, oversample_indices

log = logging.getLogger(__name__)

# The simulator's ``Pose`` fields (training.simulator.projector.Pose), in head order.
POSE_KEYS: tuple[str, ...] = ("roll_deg", "yaw_deg", "pitch_deg", "shift_x_mm", "shift_z_mm",
                              "inspiration", "width_scale")
ROTATION_KEYS: tuple[str, ...] = ("roll_deg", "yaw_deg", "pitch_deg")
DEVICES: tuple[str, ...] = ("cpu", "cuda", "auto")
FORMAT_VERSION = 1  # of judge.json; bumped when the artifact layout changes
META_FILE = "judge.json"
LOG_FILE = "log.jsonl"
MIN_IMAGE_SIZE = 32  # both backbones downsample 32x; smaller inputs leave no spatial extent


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown judge arch {arch!r}; known: {list(ARCHS)}")


def _check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"unknown judge pooling {pooling!r}; known: {list(POOLINGS)}")


@dataclasses.dataclass
class JudgeConfig:
    """How to build and train a judge (stored in judge.json)."""

    arch: str = "densenet121"  # backbone: "densenet121" (RoentGen's FID network) or "resnet18" (fast: tests)
    image_size: int = 128  # side in pixels the model sees; other inputs are resized to it
    epochs: int = 10  # passes over the training set
    batch_size: int = 32  # images per optimisation step
    lr: float = 1e-3  # AdamW learning rate (training from scratch, so higher than for fine-tuning)
    weight_decay: float = 1e-4  # AdamW decoupled weight decay
    lr_schedule: str = "cosine"  # "cosine": anneal lr to 0 over all steps; "constant": keep it
    seed: int = 0  # seeds weight init, shuffling and augmentation: same seed, same run (on CPU)
    num_workers: int = 0  # DataLoader processes; 0 decodes in the main process
    posture: bool = True  # also train the posture head (needs ground-truth poses: simulator data)
    posture_weight: float = 1.0  # weight of the posture MSE (standardised units) next to the findings BCE
    jitter: float = 0.1  # intensity augmentation: contrast x(1 +- jitter), brightness +- jitter / 2
    device: str = "auto"  # "cpu", "cuda" or "auto" (cuda when available)
    # "bf16": the training forward under bfloat16 autocast (weights, optimiser and evaluation stay fp32): ~2.5x
    # faster on CPUs with AVX512-BF16 and on GPUs; "fp32" everywhere else
    precision: str = "fp32"
    # {simulator kind or CheXpert label: K}: training images that show it appear K times per epoch, e.g.
    # {"nodule": 4, "mass": 4} so the Lung Lesion head is not taught by granulomas alone (kinds need simulator data)
    oversample: dict = dataclasses.field(default_factory=dict)
    # the findings head's pooling, one of config.POOLINGS: "avgmax" adds the global max of every feature map
    pooling: str = "avg"
    # simulator kinds the spot head learns to find (SPOT_STRIDE cells of the backbone, supervised by the data set's
    # finding masks, training.simulator.masks); its most confident cell is one more input of the findings head,
    # so one small dot can decide a label instead of being averaged away. Empty: no spot head (simulator data only)
    spot_kinds: list = dataclasses.field(default_factory=list)
    spot_weight: float = 1.0  # weight of the spot head's per-cell BCE next to the findings BCE
    spot_pos_weight: float = 10.0  # BCE weight of a cell that holds a finding (they are a few cells in 256)
    spot_masks: str = ""  # finding_masks.npz to learn from; "" = the training data set's own (DATA/finding_masks.npz)

    def __post_init__(self) -> None:
        _check_arch(self.arch)
        _check_pooling(self.pooling)
        from training.findings import KINDS

        self.spot_kinds = list(self.spot_kinds)
        bad = [k for k in self.spot_kinds if k not in KINDS]
        if bad:
            raise ValueError(f"spot_kinds: unknown simulator kind(s) {bad}; known: {sorted(KINDS)}")
        if self.spot_weight < 0 or not self.spot_pos_weight > 0:
            raise ValueError(f"need spot_weight >= 0 and spot_pos_weight > 0; got {self.spot_weight}, "
                             f"{self.spot_pos_weight}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        from training.findings import check_oversample

        check_oversample(self.oversample, kinds=True)
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {list(DEVICES)}, got {self.device!r}")
        for name in ("image_size", "epochs", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {self.image_size}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if not self.lr > 0 or self.weight_decay < 0 or self.posture_weight < 0:
            raise ValueError(f"need lr > 0, weight_decay >= 0, posture_weight >= 0; got "
                             f"{self.lr}, {self.weight_decay}, {self.posture_weight}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; asking for cuda without one is an error, not a silent cpu run."""
    if name not in DEVICES:
        raise ValueError(f"device must be one of {list(DEVICES)}, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' requested but torch sees no CUDA device")
    return torch.device(name)


# -------------------------------------------------------------------------- model


def _build_trunk(arch: str) -> tuple[nn.Module, int]:
    """A randomly initialised torchvision backbone mapping (N, 1, H, W) to pooled (N, F) features."""
    import torchvision

    _check_arch(arch)
    if arch == "densenet121":
        net = torchvision.models.densenet121(weights=None)
        # One grey channel: a new stem conv, rather than feeding the image three times as RGB.
        net.features.conv0 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(net.features.conv0.weight)  # as torchvision initialises DenseNet convs
        n_features = net.classifier.in_features
        # DenseNet.forward applies ReLU after .features (which ends in norm5), then pools.
        trunk = nn.Sequential(net.features, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    else:
        net = torchvision.models.resnet18(weights=None)
        net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's ResNet init
        n_features = net.fc.in_features
        net.fc = nn.Identity()  # ResNet.forward already pools and flattens before fc
        trunk = net
    return trunk, n_features


SPOT_STRIDE = 16  # the spot head reads the backbone at 1/16 of the input side (16 x 16 cells at 256 px)
MID_CHANNELS = {"densenet121": 1024, "resnet18": 256}  # channels of that stride-16 map


def _feature_maps(trunk: nn.Module, arch: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the stride-16 map, the trunk's last (N, F, h, w) map before its global average pool): the same modules
    and weights as ``trunk(x)``, which is the last map's spatial mean."""
    if arch == "densenet121":
        mid = trunk[0][:9](x)  # conv0 .. denseblock3 (before transition3 halves it)
        return mid, trunk[1](trunk[0][9:](mid))  # ... norm5, ReLU
    x = trunk.maxpool(trunk.relu(trunk.bn1(trunk.conv1(x))))
    mid = trunk.layer3(trunk.layer2(trunk.layer1(x)))
    return mid, trunk.layer4(mid)


def _feature_map(trunk: nn.Module, arch: str, x: torch.Tensor) -> torch.Tensor:
    """The trunk's last (N, F, h, w) feature map (see ``_feature_maps``)."""
    return _feature_maps(trunk, arch, x)[1]


class CXRJudge(nn.Module):
    """Backbone + two linear heads on the pooled features: ``findings`` (14) and ``posture`` (7).

    ``pooling="avgmax"`` gives the findings head the global max of the last feature maps beside their
    average (POOLINGS); the posture head and ``features`` use the average alone. ``spot=True`` adds the spot
    head: a small conv head on the stride-16 map giving one logit per cell (is a finding of the spot kinds
    here?); the findings head also reads its largest cell.

    ``forward(x)`` returns ``{"logits": (N, 14), "posture": (N, 7) in physical units,
    "posture_z": (N, 7) standardised}`` (with ``spot``, also ``"spot": (N, 1, h, w)`` cell logits);
    ``features(x)`` the pooled (N, F) features (F = 1024 for densenet121, 512 for resnet18), the FID
    feature space.
    """

    def __init__(self, arch: str = "densenet121", image_size: int = 128, pooling: str = "avg",
                 spot: bool = False) -> None:
        super().__init__()
        _check_arch(arch)
        _check_pooling(pooling)
        self.arch, self.image_size, self.pooling, self.spot = arch, int(image_size), pooling, bool(spot)
        self.trunk, self.n_features = _build_trunk(arch)
        if self.spot:
            c = MID_CHANNELS[arch]
            self.spot_head = nn.Sequential(nn.Conv2d(c, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 1, 1))
        # "avgmax": the findings head reads the average and the max of every map (2F inputs); spot: + 1
        self.findings = nn.Linear(self.n_features * (2 if pooling == "avgmax" else 1) + int(self.spot),
                                  len(OBSERVATIONS))
        self.posture = nn.Linear(self.n_features, len(POSE_KEYS))
        # Buffers, not attributes: saved and loaded with the weights, moved by .to(device).
        self.register_buffer("pose_mean", torch.zeros(len(POSE_KEYS)))
        self.register_buffer("pose_std", torch.ones(len(POSE_KEYS)))
        self.meta: dict = {}  # judge.json's content when loaded with load_judge

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Check (N, 1, H, W) square input and resize it to ``image_size`` (antialiased bilinear)."""
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[2] != x.shape[3]:
            raise ValueError(f"expected square (N, 1, H, W) images in [-1, 1], got shape {tuple(x.shape)}")
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              antialias=True, align_corners=False)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (N, F): the FID feature extractor (always the global average)."""
        return self.trunk(self.prepare(x))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        mid, fmap = _feature_maps(self.trunk, self.arch, self.prepare(x))
        h = fmap.mean((2, 3))  # = features(x)
        pooled = torch.cat([h, fmap.amax((2, 3))], dim=1) if self.pooling == "avgmax" else h
        out = {}
        if self.spot:
            out["spot"] = self.spot_head(mid)
            pooled = torch.cat([pooled, out["spot"].amax((2, 3))], dim=1)
        z = self.posture(h)
        return {"logits": self.findings(pooled), "posture": z * self.pose_std + self.pose_mean, "posture_z": z,
                **out}

    def standardize(self, pose: torch.Tensor) -> torch.Tensor:
        """Physical pose (N, 7) -> the standardised units the posture head is trained in."""
        return (pose - self.pose_mean) / self.pose_std

    @torch.no_grad()
    def set_pose_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.pose_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.pose_std.copy_(torch.as_tensor(std, dtype=torch.float32))


# ------------------------------------------------------------------------- data


def pose_vector(ground_truth: dict | None, dicom_id: Any = None) -> torch.Tensor:
    """The 7 pose values of one ground-truth row, in POSE_KEYS order; a clear error if absent."""
    pose = ground_truth.get("pose") if isinstance(ground_truth, dict) else None
    missing = [k for k in POSE_KEYS if not isinstance(pose, dict) or k not in pose]
    if missing:
        raise ValueError(f"ground truth of dicom_id {dicom_id!r} has no pose value(s) {missing}; "
                         f"posture needs simulator data loaded with return_ground_truth=True")
    return torch.tensor([float(pose[k]) for k in POSE_KEYS], dtype=torch.float32)


def collate(samples: Sequence[dict]) -> dict:
    """Batch ``MimicCXRDataset`` samples, including ones with ``ground_truth``.

    torch's default collate cannot batch the raw ground-truth objects (their
    findings lists differ in length), so they stay a list under
    ``ground_truth`` and the numeric part the judge learns is pulled out as
    ``pose`` (N, 7). Everything else is default-collated (strings become lists).
    """
    from torch.utils.data import default_collate

    batch = default_collate([{k: v for k, v in s.items() if k != "ground_truth"} for s in samples])
    if any("ground_truth" in s for s in samples):
        batch["ground_truth"] = [s.get("ground_truth") for s in samples]
        batch["pose"] = torch.stack([pose_vector(s.get("ground_truth"), s.get("dicom_id")) for s in samples])
    return batch


def augment(x: torch.Tensor, jitter: float, generator: torch.Generator) -> torch.Tensor:
    """Per-image contrast and brightness jitter, clamped to [-1, 1].

    Intensity only, on purpose: a horizontal flip would swap left and right (a
    left effusion would be shown as a right one under the same label, the heart
    on the wrong side), and shifts, rotations or crops would change the very
    pose the posture head is asked to measure.
    """
    if jitter <= 0:
        return x
    shape = (x.shape[0], 1, 1, 1)
    contrast = 1.0 + (torch.rand(shape, generator=generator) * 2 - 1) * jitter
    brightness = (torch.rand(shape, generator=generator) * 2 - 1) * (jitter / 2)
    return (x * contrast.to(x.device) + brightness.to(x.device)).clamp(-1.0, 1.0)


def pose_stats(ds) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the training poses (population std; 1 where a key is constant).

    Read from ``ds.ground_truth`` (``MimicCXRDataset`` keeps the selected rows
    there) without decoding images; other data sets are asked sample by sample.
    A constant key (a pose variation the simulator did not use) gets std 1 so it
    does not divide by zero.
    """
    table = getattr(ds, "ground_truth", None)
    rows = list(table.items()) if isinstance(table, dict) else \
        [(ds[i].get("dicom_id"), ds[i].get("ground_truth")) for i in range(len(ds))]
    if not rows:
        raise ValueError("cannot compute pose statistics of an empty data set")
    poses = torch.stack([pose_vector(gt, dicom) for dicom, gt in rows]).double()
    mean, std = poses.mean(0), poses.std(0, unbiased=False)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return mean.float(), std.float()


# ----------------------------------------------------------------------- training


def spot_targets(batch: dict, masks: dict[str, np.ndarray], kinds: Sequence[str]) -> torch.Tensor:
    """(N, 1, g, g) float targets of the spot head for a batch with ground truth: the stored mask of an exam
    that shows one of ``kinds``, zeros for one that shows none (nothing to find). An exam that shows one
    but has no stored mask is a ValueError (masks made for another data set, or before it grew)."""
    gts = batch.get("ground_truth")
    if gts is None or any(g is None for g in gts):
        raise ValueError("the spot head needs simulator data loaded with return_ground_truth=True")
    grid = next(iter(masks.values())).shape[-1] if masks else 1
    out = torch.zeros(len(gts), 1, grid, grid)
    for i, (dicom, gt) in enumerate(zip(batch["dicom_id"], gts)):
        if not any(f["kind"] in kinds for f in gt.get("findings", [])):
            continue
        if dicom not in masks:
            raise ValueError(f"dicom_id {dicom} shows one of {list(kinds)} but the finding masks have no entry "
                             "for it: make them again for this data set (cxrgen simulate ... --finding-masks)")
        out[i, 0] = torch.from_numpy(np.asarray(masks[dicom], dtype=np.float32))
    return out


def spot_loss(spot_logits: torch.Tensor, targets: torch.Tensor, pos_weight: float) -> torch.Tensor:
    """Per-cell BCE of the spot head, targets max-pooled from the masks' grid onto the head's cells."""
    t = F.adaptive_max_pool2d(targets.to(spot_logits.device), spot_logits.shape[-2:])
    return F.binary_cross_entropy_with_logits(spot_logits, t, pos_weight=torch.tensor(pos_weight,
                                                                                       device=t.device))


def judge_loss(judge: CXRJudge, batch: dict, images: torch.Tensor | None = None, posture: bool = True,
               posture_weight: float = 1.0, spot: torch.Tensor | None = None, spot_weight: float = 1.0,
               spot_pos_weight: float = 10.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Masked BCE over the known labels (+ posture_weight x MSE on standardised pose, + spot_weight x the
    spot head's per-cell BCE against ``spot`` targets when given).

    The BCE is the mean over entries where ``label_mask`` is True, so unknown
    (NaN: uncertain or unmentioned) labels neither push towards 0 nor count in
    the denominator. ``images`` replaces ``batch["image"]`` (e.g. augmented).
    """
    device = judge.pose_mean.device
    out = judge((batch["image"] if images is None else images).to(device))
    out = {k: v.float() for k, v in out.items()}  # the losses in fp32 under autocast
    labels, mask = batch["labels"].to(device), batch["label_mask"].to(device)
    bce = F.binary_cross_entropy_with_logits(out["logits"], torch.nan_to_num(labels, nan=0.0), reduction="none")
    bce = (bce * mask).sum() / mask.sum().clamp(min=1)
    loss, parts = bce, {"bce": float(bce.detach())}
    if posture:
        if "pose" not in batch:
            raise ValueError("posture=True needs ground-truth poses: load simulator data with "
                             "return_ground_truth=True, or set posture=False")
        mse = F.mse_loss(out["posture_z"], judge.standardize(batch["pose"].to(device)))
        loss = loss + posture_weight * mse
        parts["posture_mse"] = float(mse.detach())
    if spot is not None:
        if "spot" not in out:
            raise ValueError("spot targets given to a judge without a spot head")
        sl = spot_loss(out["spot"], spot, spot_pos_weight)
        loss = loss + spot_weight * sl
        parts["spot_bce"] = float(sl.detach())
    parts["loss"] = float(loss.detach())
    return loss, parts


def train_step(judge: CXRJudge, batch: dict, optimizer: torch.optim.Optimizer, cfg: JudgeConfig,
               generator: torch.Generator, masks: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """One augmented optimisation step; returns the loss parts (before the update). ``masks``: the finding
    masks the spot head learns from (needed when ``cfg.spot_kinds``)."""
    judge.train()
    device = judge.pose_mean.device
    images = augment(batch["image"].to(device), cfg.jitter, generator)
    spot = None
    if cfg.spot_kinds:
        if masks is None:
            raise ValueError("cfg.spot_kinds needs the finding masks")
        spot = spot_targets(batch, masks, cfg.spot_kinds)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        loss, parts = judge_loss(judge, batch, images, cfg.posture, cfg.posture_weight, spot, cfg.spot_weight,
                                 cfg.spot_pos_weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return parts


def make_optimizer(judge: CXRJudge, cfg: JudgeConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(judge.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_judge(train_ds, val_ds, cfg: JudgeConfig, out_dir: str | Path) -> CXRJudge:
    """Train a judge from scratch; write log.jsonl, judge weights and judge.json to ``out_dir``.

    Data sets yield ``MimicCXRDataset`` samples (with ``return_ground_truth=True``
    when ``cfg.posture``); load them at ``cfg.image_size`` to save decoding.
    ``val_ds`` may be None (no validation metrics). Each epoch logs the mean
    training loss parts and, with validation, AUROC per finding, their mean and
    the posture errors. The returned model (in eval mode) is the last epoch's. With ``cfg.spot_kinds`` the
    spot head learns from the finding masks (``cfg.spot_masks``, else the training data folder's
    finding_masks.npz) and the training set needs ground truth.
    """
    from torch.utils.data import DataLoader

    if len(train_ds) == 0:
        raise ValueError("train_ds is empty")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)  # weight init
    judge = CXRJudge(cfg.arch, cfg.image_size, cfg.pooling, spot=bool(cfg.spot_kinds))
    masks = _spot_masks(train_ds, cfg) if cfg.spot_kinds else None
    if cfg.posture:
        judge.set_pose_stats(*pose_stats(train_ds))
    judge.to(device)
    optimizer = make_optimizer(judge, cfg)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    if cfg.oversample:
        train_ds = torch.utils.data.Subset(train_ds, oversample_indices(train_ds, cfg.oversample))
    loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.num_workers,
                        collate_fn=collate, generator=shuffle, pin_memory=device.type == "cuda")
    aug = torch.Generator().manual_seed(cfg.seed + 1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs * len(loader)) \
        if cfg.lr_schedule == "cosine" else None
    start = _resume(out, cfg, judge, optimizer, sched, shuffle, aug)
    if start == 0:
        (out / LOG_FILE).write_text("")  # a fresh log: it describes this model only
    else:  # an epoch logged after the state's last save is logged again below
        trim_log(out / LOG_FILE, "epoch", start)
    metrics: dict = {}
    for epoch in range(start + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        parts = []
        for batch in loader:
            parts.append(train_step(judge, batch, optimizer, cfg, aug, masks))
            if sched is not None:
                sched.step()
        metrics = {"epoch": epoch, **{f"train_{k}": float(np.mean([p[k] for p in parts])) for k in parts[0]}}
        if val_ds is not None and len(val_ds) > 0:
            metrics.update(evaluate_judge(judge, val_ds, cfg.batch_size, cfg.posture, cfg.num_workers))
        metrics["lr"] = optimizer.param_groups[0]["lr"]  # at the end of the epoch
        metrics["seconds"] = round(time.perf_counter() - t0, 3)
        with (out / LOG_FILE).open("a") as f:
            f.write(json.dumps(_jsonable(metrics)) + "\n")
        log.info("judge epoch %d/%d: loss %.4f, val mean AUROC %s", epoch, cfg.epochs,
                 metrics["train_loss"], metrics.get("val_mean_auroc"))
        _save_epoch(out, cfg, epoch, judge, optimizer, sched, shuffle, aug, metrics)
    if not metrics and start:  # resumed after the last epoch: its metrics are in the state
        metrics = torch.load(out / STATE_FILE, weights_only=False)["metrics"]
    save_judge(judge, cfg, out, metrics)
    (out / STATE_FILE).unlink(missing_ok=True)
    return judge.eval()


def _spot_masks(ds, cfg: JudgeConfig) -> dict[str, np.ndarray]:
    """The finding masks of ``cfg.spot_kinds`` for the training set: ``cfg.spot_masks``, else its data folder's."""
    from training.simulator.masks import load_masks

    path = cfg.spot_masks
    if not path:
        root = getattr(getattr(ds, "config", None), "root", None)
        if root is None:
            raise ValueError("spot_kinds: the training set has no data folder to read finding masks from; "
                             "set spot_masks")
        path = root
    masks, facts = load_masks(path, tuple(cfg.spot_kinds))
    log.info("judge: spot head learns %s from %d stored masks (%d px grid)", facts["kinds"], len(masks),
             facts["grid"])
    return masks


STATE_FILE = "state.pt"  # the last finished epoch of an interrupted training: run it again to resume


def _save_epoch(out: Path, cfg: JudgeConfig, epoch: int, judge, optimizer, sched, shuffle, aug, metrics) -> None:
    blob = {"config": dataclasses.asdict(cfg), "epoch": epoch, "model": judge.state_dict(),
            "optimizer": optimizer.state_dict(), "sched": sched.state_dict() if sched else None,
            "shuffle": shuffle.get_state(), "aug": aug.get_state(), "metrics": _jsonable(metrics)}
    tmp = out / (STATE_FILE + ".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, out / STATE_FILE)  # a kill mid-save keeps the previous epoch's state


def _resume(out: Path, cfg: JudgeConfig, judge, optimizer, sched, shuffle, aug) -> int:
    """Epochs finished by an interrupted training of the same config in ``out`` (0: start afresh)."""
    path = out / STATE_FILE
    if not path.is_file():
        return 0
    blob = torch.load(path, weights_only=False, map_location="cpu")
    same = {k: v for k, v in blob["config"].items() if k not in ("device", "num_workers")} == \
        {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("device", "num_workers")}
    if not same:
        raise ValueError(f"{out} holds an interrupted judge training with another config; use another folder "
                         f"or delete {path}")
    judge.load_state_dict(blob["model"])
    optimizer.load_state_dict(blob["optimizer"])
    if sched is not None:
        sched.load_state_dict(blob["sched"])
    shuffle.set_state(blob["shuffle"])
    aug.set_state(blob["aug"])
    log.info("judge: resuming after epoch %d in %s", blob["epoch"], out)
    return int(blob["epoch"])


# ------------------------------------------------------------------------ metrics


def _cat(parts: list[torch.Tensor], width: int, dtype=torch.float32) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.zeros((0, width), dtype=dtype)


@torch.no_grad()
def predict(judge: CXRJudge, ds, batch_size: int = 64, num_workers: int = 0) -> tuple[torch.Tensor, ...]:
    """Run the judge over a data set, in order, in eval mode.

    Returns CPU tensors ``(probs (N, 14), labels (N, 14) with NaN = unknown,
    mask (N, 14) bool, posture_pred (N, 7), posture_true (N, 7))``; posture
    values are in physical units and ``posture_true`` is NaN where the data set
    has no ground truth (real MIMIC-CXR). The judge's train/eval mode is restored.
    """
    from torch.utils.data import DataLoader

    device = judge.pose_mean.device
    was_training = judge.training
    judge.eval()
    probs, labels, masks, pred, true = [], [], [], [], []
    for batch in DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate):
        out = judge(batch["image"].to(device))
        probs.append(torch.sigmoid(out["logits"]).float().cpu())
        pred.append(out["posture"].float().cpu())
        labels.append(batch["labels"].float())
        masks.append(batch["label_mask"].bool())
        n = batch["image"].shape[0]
        true.append(batch["pose"] if "pose" in batch else torch.full((n, len(POSE_KEYS)), math.nan))
    judge.train(was_training)
    k, p = len(OBSERVATIONS), len(POSE_KEYS)
    return _cat(probs, k), _cat(labels, k), _cat(masks, k, torch.bool), _cat(pred, p), _cat(true, p)


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def binary_auroc(scores, targets) -> float:
    """ROC AUC by the Mann-Whitney U statistic (tied scores count one half).

    ``targets`` >= 0.5 are positives. NaN when only one class is present: the
    AUROC is undefined there (torchmetrics would return 0 with a warning, which
    would silently drag a mean down).
    """
    s = _numpy(scores).astype(np.float64).ravel()
    y = _numpy(targets).astype(np.float64).ravel() >= 0.5
    if s.shape != y.shape:
        raise ValueError(f"scores and targets differ in size: {s.size} vs {y.size}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinity")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    mean_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based mean rank of each group of tied scores
    ranks = mean_rank[inverse.ravel()]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auroc_per_finding(probs, labels, mask) -> dict[str, float]:
    """AUROC of each of the 14 observations over the samples where its label is known.

    Known means ``mask`` True and the label not NaN. An observation with only
    one class among its known labels (e.g. no positive in a small validation
    set) gets NaN rather than a number; ``mean_auroc`` skips those.
    """
    probs, labels, mask = _numpy(probs), _numpy(labels).astype(np.float64), _numpy(mask).astype(bool)
    shape = (probs.shape[0], len(OBSERVATIONS)) if probs.ndim == 2 else None
    if shape is None or labels.shape != shape or mask.shape != shape or probs.shape != shape:
        raise ValueError(f"expected probs, labels and mask of shape (N, {len(OBSERVATIONS)}), got "
                         f"{probs.shape}, {labels.shape}, {mask.shape}")
    known = mask & ~np.isnan(labels)
    return {name: binary_auroc(probs[known[:, j], j], labels[known[:, j], j]) for j, name in enumerate(OBSERVATIONS)}


def mean_auroc(aurocs: dict[str, float]) -> float:
    """Mean over the observations with a defined (non-NaN) AUROC; NaN when none has one."""
    values = [v for v in aurocs.values() if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def posture_error(pred, true) -> dict[str, float]:
    """Mean absolute error per POSE_KEYS key, plus ``rotation_deg``.

    ``rotation_deg`` is the mean of the absolute errors pooled over roll, yaw
    and pitch (the mean of their three MAEs when all are known). Rows whose
    truth is NaN (no ground truth) are skipped per key; a key with no known row
    is NaN.
    """
    pred, true = _numpy(pred).astype(np.float64), _numpy(true).astype(np.float64)
    if pred.shape != true.shape or pred.ndim != 2 or pred.shape[1] != len(POSE_KEYS):
        raise ValueError(f"expected pred and true of shape (N, {len(POSE_KEYS)}), got {pred.shape}, {true.shape}")
    err = np.abs(pred - true)
    out = {k: float(np.nanmean(err[:, j])) if np.isfinite(err[:, j]).any() else math.nan
           for j, k in enumerate(POSE_KEYS)}
    rot = err[:, [POSE_KEYS.index(k) for k in ROTATION_KEYS]]
    out["rotation_deg"] = float(np.nanmean(rot)) if np.isfinite(rot).any() else math.nan
    return out


def evaluate_judge(judge: CXRJudge, ds, batch_size: int = 64, posture: bool = True,
                   num_workers: int = 0, prefix: str = "val_") -> dict:
    """AUROC per finding, their mean and (with ``posture``) the posture errors of ``judge`` on ``ds``."""
    probs, labels, mask, pose_pred, pose_true = predict(judge, ds, batch_size, num_workers)
    aurocs = auroc_per_finding(probs, labels, mask)
    out = {f"{prefix}mean_auroc": mean_auroc(aurocs), f"{prefix}auroc": aurocs}
    if posture:
        out[f"{prefix}posture"] = posture_error(pose_pred, pose_true)
    return out


# ---------------------------------------------------------------------- artifacts


def save_judge(judge: CXRJudge, cfg: JudgeConfig, out_dir: str | Path, metrics: dict | None = None) -> Path:
    """Write the weights (safetensors when installed, else torch.save) and judge.json; returns judge.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in judge.state_dict().items()}
    try:
        from safetensors.torch import save_file
    except ImportError:
        weights = out / "judge.pt"
        torch.save(state, weights)
    else:
        weights = out / "judge.safetensors"
        save_file(state, str(weights))
    meta = {
        "format": FORMAT_VERSION, "weights": weights.name, "arch": judge.arch, "image_size": judge.image_size,
        "pooling": judge.pooling, "spot": judge.spot, "spot_kinds": list(cfg.spot_kinds),
        "n_features": judge.n_features, "observations": list(OBSERVATIONS), "pose_keys": list(POSE_KEYS),
        "pose_mean": judge.pose_mean.tolist(), "pose_std": judge.pose_std.tolist(),
        "config": dataclasses.asdict(cfg), "metrics": metrics or {},
    }
    path = out / META_FILE
    tmp = path.with_suffix(".json.tmp")  # written whole, then renamed: never a half-written judge.json
    tmp.write_text(json.dumps(_jsonable(meta), indent=2) + "\n")
    os.replace(tmp, path)
    judge.meta = _jsonable(meta)
    return path


def _read_meta(path: Path) -> dict:
    """judge.json, checked against this code's vocabulary: a judge for other labels must not load silently."""
    meta = read_meta(path, "judge.json", ("weights", "arch", "image_size", "observations", "pose_keys"),
                     FORMAT_VERSION)
    if list(meta["observations"]) != list(OBSERVATIONS) or list(meta["pose_keys"]) != list(POSE_KEYS):
        raise ValueError(f"{path}: the judge's observations / pose keys differ from training.findings / POSE_KEYS")
    if meta["arch"] not in ARCHS:
        raise ValueError(f"{path}: unknown judge arch {meta['arch']!r}; known: {list(ARCHS)}")
    if meta.get("pooling", "avg") not in POOLINGS:  # judges saved before pooling was a choice averaged
        raise ValueError(f"{path}: unknown judge pooling {meta['pooling']!r}; known: {list(POOLINGS)}")
    return meta


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch.save file; corrupt files are a ValueError naming them."""
    if not path.is_file():
        raise FileNotFoundError(f"judge weights not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except ImportError:
        raise
    except Exception as e:  # safetensors and torch raise assorted types for truncated / garbage files
        raise ValueError(f"{path}: corrupt or unreadable judge weights: {e}") from e


def load_judge(path: str | Path, device: str | torch.device = "cpu") -> CXRJudge:
    """Load a judge saved by ``train_judge`` / ``save_judge``, in eval mode on ``device``.

    ``path`` is the output folder, its judge.json, or a weights file next to a
    judge.json. A missing path or file is a FileNotFoundError naming it; a
    corrupt or incompatible one a ValueError naming it.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"judge not found: {p}")
    folder = p if p.is_dir() else p.parent
    meta = _read_meta(folder / META_FILE)
    weights = p if p.is_file() and p.name != META_FILE else folder / meta["weights"]
    state = _read_weights(weights)
    judge = CXRJudge(meta["arch"], int(meta["image_size"]), meta.get("pooling", "avg"), bool(meta.get("spot")))
    try:
        judge.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{weights}: weights do not fit a {meta['arch']} judge: {e}") from e
    judge.meta = meta
    return judge.to(device).eval()
