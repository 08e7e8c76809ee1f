"""``consistency`` (CXRL, Han et al. 2024): does the image match its report? A small CXR-CLIP.

An image encoder (the reward trunk + a projection) and a text encoder (hashed
unigrams and bigrams, ``training.reward.nets.TextEncoder``: no tokenizer to keep
in step with the generator's) trained with a symmetric InfoNCE loss (CLIP; CXR-CLIP
trains the same objective on image / report pairs) on the image / report pairs of
runs/sim-reward. Reports repeat (a normal study's impression is written the same
way many times), so every pair of a batch whose texts are identical counts as a
positive: the target of a row is uniform over the columns with its own text,
rather than a false negative.

Cosine similarities of CLIP models live in a narrow band, so the reward maps them
to a probability: ``sigmoid(a * cos + b)``, with a and b fitted by logistic
regression on held-out matched pairs against mismatched ones (different text):
P(this report belongs to this image).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import Reward, RewardNet, save_reward
from .config import RewardConfig
from .data import SimData, load_sim
from .metrics import recall_at_k
from .nets import TextEncoder
from .train import data_info, features, fit, guard_report, matched_vs_shuffled, setup, trunk_with_validity


class ConsistencyNet(RewardNet):
    def __init__(self, embed_dim: int = 128, text_buckets: int = 8192, **kw) -> None:
        super().__init__(**kw)
        self.config.update(embed_dim=int(embed_dim), text_buckets=int(text_buckets))
        self.image_proj = nn.Linear(self.trunk.features, embed_dim)
        self.text = TextEncoder(text_buckets, 128, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
        self.register_buffer("map_ab", torch.tensor([10.0, -5.0]))  # reward = sigmoid(a * cos + b)

    def embed_images(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(h), dim=1)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return F.normalize(self.text(list(texts)), dim=1)


class ConsistencyReward(Reward):
    name = "consistency"
    Net = ConsistencyNet

    def base(self, h, prompts, findings):
        cos = (self.net.embed_images(h) * self.net.embed_texts(prompts)).sum(1)
        a, b = self.net.map_ab
        return torch.sigmoid(a * cos + b)


def same_text_targets(texts: Sequence[str]) -> torch.Tensor:
    """Row-normalised (N, N) matrix: 1 where two texts are identical (the diagonal included)."""
    ids = {t: i for i, t in enumerate(dict.fromkeys(texts))}
    k = torch.tensor([ids[t] for t in texts])
    same = (k[:, None] == k[None, :]).float()
    return same / same.sum(1, keepdim=True)


def info_nce(zi: torch.Tensor, zt: torch.Tensor, scale: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
    """Symmetric InfoNCE with soft targets over duplicate texts."""
    logits = scale.exp().clamp(max=100.0) * zi @ zt.T
    target = same_text_targets(texts).to(logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target.T))


@torch.no_grad()
def cosines(net: ConsistencyNet, data: SimData, texts: Sequence[str]) -> torch.Tensor:
    """cos(image i, texts[i]) for every image."""
    zi = net.embed_images(features(net, data.images).to(net.map_ab.device))
    zt = torch.cat([net.embed_texts(texts[i:i + 512]) for i in range(0, len(texts), 512)])
    return (zi * zt).sum(1).cpu()


@torch.no_grad()
def fit_mapping(net: ConsistencyNet, data: SimData, seed: int) -> None:
    """Logistic regression of matched (1) vs mismatched-text (0) pairs on cos: sets ``map_ab``."""
    n = len(data)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    wrong = [data.prompts[j] for j in perm]
    keep = [i for i in range(n) if wrong[i] != data.prompts[i]]
    if n < 4 or not keep:
        return
    x = torch.cat([cosines(net, data, data.prompts), cosines(net, data.subset(keep), [wrong[i] for i in keep])])
    y = torch.cat([torch.ones(n), torch.zeros(len(keep))])
    w = torch.cat([torch.full((n,), 0.5 / n), torch.full((len(keep),), 0.5 / len(keep))])  # balanced classes
    ab = torch.tensor([10.0, -5.0], requires_grad=True)
    opt = torch.optim.LBFGS([ab], max_iter=200)

    def closure():
        opt.zero_grad()
        with torch.enable_grad():
            loss = (F.binary_cross_entropy_with_logits(ab[0] * x + ab[1], y, reduction="none") * w).sum()
            loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    a, b = ab.detach().tolist()
    # a < 0 would reward mismatched reports: an untrained or failed encoder. Then the honest map is "no idea".
    net.map_ab.copy_(torch.tensor([a, b] if a > 0 else [0.0, 0.0]))


@torch.no_grad()
def retrieval(net: ConsistencyNet, data: SimData, pool: int) -> dict:
    """Image -> report recall@1/5/10 over the distinct report texts of the first ``pool`` held-out images.

    Duplicates: identical report texts are one candidate, and an image's retrieval
    is a hit when its own text (by string equality) ranks in the top k; ranking a
    copy of the same text elsewhere is therefore impossible, not a miss.
    """
    data = data.subset(range(min(pool, len(data))))
    if len(data) < 2:
        return {}
    texts = list(dict.fromkeys(data.prompts))
    zi = net.embed_images(features(net, data.images).to(net.map_ab.device))
    zt = torch.cat([net.embed_texts(texts[i:i + 512]) for i in range(0, len(texts), 512)])
    index = {t: i for i, t in enumerate(texts)}
    out = recall_at_k((zi @ zt.T).cpu(), [index[t] for t in data.prompts], (1, 5, 10))
    return {**{f"test_{k}": v for k, v in out.items()}, "test_images": len(data), "test_candidate_texts": len(texts)}


def train(cfg: RewardConfig, store=None) -> Path:
    """InfoNCE on --data's train pairs; a, b fitted on validate; recall@k on test."""
    device, g = setup(cfg)
    data = load_sim(cfg.data, cfg.image_size, cfg.max_train, cfg.seed)
    data = data.subset([i for i, p in enumerate(data.prompts) if p.strip()])  # a pair needs a report
    tr, va, te = data.split("train"), data.split("validate"), data.split("test")
    net = ConsistencyNet(cfg.embed_dim, cfg.text_buckets, **cfg.net).to(device)

    def step(idx, g):
        h, vloss = trunk_with_validity(net, tr.images[idx], cfg, g)
        texts = [tr.prompts[i] for i in idx.tolist()]
        nce = info_nce(net.embed_images(h), net.embed_texts(texts), net.logit_scale, texts)
        return nce + vloss, {"info_nce": float(nce.detach()), "validity": float(vloss.detach())}

    def evaluate():
        r = retrieval(net, va, cfg.retrieval_pool)
        return {"val_recall@5": r["test_recall@5"]} if r else {}

    fit(net, len(tr), step, cfg, g, evaluate)
    fit_mapping(net, va if len(va) >= 4 else tr, cfg.seed)
    reward = ConsistencyReward(net)
    metrics = {**retrieval(net, te, cfg.retrieval_pool), "map_ab": net.map_ab.tolist(),
               "conditioning": matched_vs_shuffled(reward, te.images, te.prompts, te.findings, cfg.seed),
               "guard": guard_report(reward, te.images, te.prompts, te.findings),
               "duplicates": "identical report texts are one retrieval candidate; a hit is the image's own text "
                             "in the top k"}
    return save_reward(reward, cfg.out, config=cfg, metrics=metrics,
                       data=data_info(cfg, n_train=len(tr), n_val=len(va), n_test=len(te)))


REWARD = ConsistencyReward  # the plug-in this module registers under its name
