"""``diagnosis`` (CXRL, Han et al. 2024): does a CheXpert classifier find what the prompt declares?

A multi-label classifier (the 14 ``training.findings.OBSERVATIONS``) trained on
simulator data (runs/sim-reward: its own eye, not the evaluation judge's or the
panel's). The reward is the agreement of its probabilities p with the prompt's
labels y (``training.findings.labels(findings)``): p where y = 1, 1 - p where y = 0,
averaged over the positive labels and over the negative labels separately and the
two averages weighted equally. A plain mean over the 14 labels would let the 13
absent findings of a one-finding prompt drown the one that was asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from training.findings import OBSERVATIONS, Finding, labels

from .base import Reward, RewardNet, save_reward
from .config import RewardConfig
from .data import SimData, load_sim
from .train import data_info, features, fit, guard_report, matched_vs_shuffled, setup, trunk_with_validity


class DiagnosisNet(RewardNet):
    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.findings = nn.Linear(self.trunk.features, len(OBSERVATIONS))


def label_matrix(findings: Sequence[Sequence[Finding]]) -> torch.Tensor:
    """(N, 14) 0 / 1 labels of the declared findings, in OBSERVATIONS order."""
    return torch.tensor([[labels(f)[o] for o in OBSERVATIONS] for f in findings], dtype=torch.float32).reshape(
        len(findings), len(OBSERVATIONS))


def agreement(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Balanced agreement of probabilities p with 0 / 1 labels y, per row (see the module docstring)."""
    agree = y * p + (1 - y) * (1 - p)
    n_pos, n_neg = y.sum(1), (1 - y).sum(1)
    pos = (y * agree).sum(1) / n_pos.clamp(min=1)
    neg = ((1 - y) * agree).sum(1) / n_neg.clamp(min=1)
    return torch.where(n_pos == 0, neg, torch.where(n_neg == 0, pos, 0.5 * (pos + neg)))


class DiagnosisReward(Reward):
    name = "diagnosis"
    Net = DiagnosisNet

    def base(self, h, prompts, findings):
        p = torch.sigmoid(self.net.findings(h))
        return agreement(p, label_matrix(findings).to(p.device))


def masked_bce(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(y, nan=0.0), reduction="none")
    return (bce * mask).sum() / mask.sum().clamp(min=1)


def held_out(net: DiagnosisNet, data: SimData, prefix: str) -> dict:
    from training.evaluate.judge import auroc_per_finding, mean_auroc

    if len(data) == 0:
        return {}
    probs = torch.sigmoid(net.findings(features(net, data.images).to(next(net.parameters()).device))).cpu()
    per = auroc_per_finding(probs, data.labels, data.mask)
    return {f"{prefix}mean_auroc": mean_auroc(per), f"{prefix}auroc": per, f"{prefix}n": len(data)}


def train(cfg: RewardConfig, store=None) -> Path:
    """Train on --data's train split; metrics: mean AUROC on its test split; hack guard on test images."""
    device, g = setup(cfg)
    data = load_sim(cfg.data, cfg.image_size, cfg.max_train, cfg.seed)
    tr, va, te = data.split("train"), data.split("validate"), data.split("test")
    net = DiagnosisNet(**cfg.net).to(device)

    def step(idx, g):
        h, vloss = trunk_with_validity(net, tr.images[idx], cfg, g)
        bce = masked_bce(net.findings(h), tr.labels[idx].to(device), tr.mask[idx].to(device))
        return bce + vloss, {"bce": float(bce.detach()), "validity": float(vloss.detach())}

    def evaluate():
        m = held_out(net, va, "val_")
        return {"val_mean_auroc": m["val_mean_auroc"]} if m else {}

    fit(net, len(tr), step, cfg, g, evaluate)
    reward = DiagnosisReward(net)
    metrics = {**held_out(net, te, "test_"), "guard": guard_report(reward, te.images, te.prompts, te.findings),
               "conditioning": matched_vs_shuffled(reward, te.images, te.prompts, te.findings, cfg.seed)}
    return save_reward(reward, cfg.out, config=cfg, metrics=metrics,
                       data=data_info(cfg, n_train=len(tr), n_val=len(va), n_test=len(te)))


REWARD = DiagnosisReward  # the plug-in this module registers under its name


@torch.no_grad()
def finding_agreement(reward: DiagnosisReward, images: torch.Tensor,
                      findings: Sequence[Sequence[Finding]]) -> list[dict[str, float]]:
    """Per image, per CheXpert observation: the classifier's agreement with the prompt (p where the
    findings declare the observation, 1 - p where they do not); what the service reports beside the
    scores so a client sees *which* finding an image fails to show."""
    from .nets import prepare

    net = reward.net
    device = next(net.parameters()).device
    p = torch.sigmoid(net.findings(net.trunk(prepare(images, net.image_size).to(device)))).float().cpu()
    y = label_matrix(findings)
    agree = y * p + (1 - y) * (1 - p)
    return [{o: round(float(agree[i, j]), 4) for j, o in enumerate(OBSERVATIONS)} for i in range(len(findings))]
