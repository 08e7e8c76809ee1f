"""``posture`` (CXRL, Han et al. 2024): how far is the patient from a canonical upright PA film?

CXRL's posture reward compares a predicted affine pose (scale, translation,
rotation) with a canonical one. Here a regressor trained on the simulator's exact
ground truth (runs/sim-reward) predicts the simulator's pose parameters
(``training.evaluate.judge.POSE_KEYS``: roll / yaw / pitch in degrees, shifts in
mm, inspiration, width scale), and the reward is

    exp(-0.5 * sum_k (pose_k / scale_k)^2)   over k in roll, yaw, pitch (scale 5 deg) and shift x, z (20 mm),

1 for a perfectly centred, unrotated patient. Inspiration and width are anatomy
and breathing, not positioning, so they are predicted (and reported) but not
penalised. The scales are buffers of the network, so a reward folder scores the
same whatever config later code defaults to.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.evaluate.judge import POSE_KEYS, ROTATION_KEYS

from .base import Reward, RewardNet, save_reward
from .config import RewardConfig
from .data import SimData, load_sim
from .metrics import pearson
from .train import data_info, features, fit, guard_report, setup, trunk_with_validity

SHIFT_KEYS = ("shift_x_mm", "shift_z_mm")


class PostureNet(RewardNet):
    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.pose = nn.Linear(self.trunk.features, len(POSE_KEYS))
        self.register_buffer("pose_mean", torch.zeros(len(POSE_KEYS)))
        self.register_buffer("pose_std", torch.ones(len(POSE_KEYS)))
        self.register_buffer("inv_scale", torch.zeros(len(POSE_KEYS)))  # 1 / tolerance; 0: not penalised

    def predict(self, h: torch.Tensor) -> torch.Tensor:
        """Pose (N, 7) in physical units."""
        return self.pose(h) * self.pose_std + self.pose_mean

    @torch.no_grad()
    def set_stats(self, poses: torch.Tensor, rotation_scale: float, shift_scale: float) -> None:
        std = poses.double().std(0, unbiased=False)
        self.pose_mean.copy_(poses.double().mean(0).float())
        self.pose_std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)).float())
        inv = torch.zeros(len(POSE_KEYS))
        for k in ROTATION_KEYS:
            inv[POSE_KEYS.index(k)] = 1.0 / rotation_scale
        for k in SHIFT_KEYS:
            inv[POSE_KEYS.index(k)] = 1.0 / shift_scale
        self.inv_scale.copy_(inv)


def posture_reward(pose: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    """exp(-0.5 * sum((pose * inv_scale)^2)) per row."""
    return torch.exp(-0.5 * ((pose * inv_scale.to(pose.device)) ** 2).sum(1))


class PostureReward(Reward):
    name = "posture"
    Net = PostureNet

    def base(self, h, prompts, findings):
        return posture_reward(self.net.predict(h), self.net.inv_scale)


@torch.no_grad()
def held_out(net: PostureNet, data: SimData, prefix: str) -> dict:
    """Pearson r of predicted vs true pose per key and of the rotation magnitude; MAE per key."""
    if len(data) < 2:
        return {}
    pred = net.predict(features(net, data.images).to(net.pose_mean.device)).cpu().numpy()
    true = data.pose.numpy()
    rot = [POSE_KEYS.index(k) for k in ROTATION_KEYS]
    out = {f"{prefix}rotation_magnitude_r": pearson(np.linalg.norm(pred[:, rot], axis=1),
                                                   np.linalg.norm(true[:, rot], axis=1)),
           f"{prefix}r": {k: pearson(pred[:, j], true[:, j]) for j, k in enumerate(POSE_KEYS)},
           f"{prefix}mae": {k: float(np.abs(pred[:, j] - true[:, j]).mean()) for j, k in enumerate(POSE_KEYS)},
           f"{prefix}n": len(data)}
    inv = net.inv_scale.cpu()
    out[f"{prefix}reward_r"] = pearson(posture_reward(torch.from_numpy(pred), inv),
                                       posture_reward(torch.from_numpy(true), inv))
    return out


def train(cfg: RewardConfig, store=None) -> Path:
    """Train on --data's train split (ground-truth poses); metrics on its test split."""
    device, g = setup(cfg)
    data = load_sim(cfg.data, cfg.image_size, cfg.max_train, cfg.seed, need_pose=True)
    tr, va, te = data.split("train"), data.split("validate"), data.split("test")
    net = PostureNet(**cfg.net)
    net.set_stats(tr.pose, cfg.rotation_scale_deg, cfg.shift_scale_mm)
    net.to(device)
    z = ((tr.pose - net.pose_mean.cpu()) / net.pose_std.cpu())  # standardised targets

    def step(idx, g):
        h, vloss = trunk_with_validity(net, tr.images[idx], cfg, g)
        mse = F.mse_loss(net.pose(h), z[idx].to(device))
        return mse + vloss, {"mse": float(mse.detach()), "validity": float(vloss.detach())}

    def evaluate():
        m = held_out(net, va, "val_")
        return {"val_rotation_magnitude_r": m["val_rotation_magnitude_r"]} if m else {}

    fit(net, len(tr), step, cfg, g, evaluate)
    reward = PostureReward(net)
    metrics = {**held_out(net, te, "test_"), "guard": guard_report(reward, te.images, te.prompts, te.findings)}
    return save_reward(reward, cfg.out, config=cfg, metrics=metrics,
                       data=data_info(cfg, n_train=len(tr), n_val=len(va), n_test=len(te)))


REWARD = PostureReward  # the plug-in this module registers under its name
