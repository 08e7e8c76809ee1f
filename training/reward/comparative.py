"""``comparative``: a Bradley-Terry reward on the store's pairwise comparisons.

Experts compare two generations of the same prompt (A, B or tie). Bradley-Terry
(1952) models P(A preferred) = sigmoid(f(A) - f(B)) with f the network's scalar;
the loss is ``-log sigmoid(f(winner) - f(loser))`` and a tie is a 0.5 target
(``training.reward.metrics.bradley_terry_loss``). The same conditional network as
``plausibility`` (image x declared findings), since "better" means better for
this prompt.

BT fixes f only up to a constant, so after training the mean f over the training
generations is stored as ``offset`` and the score is ``sigmoid(f - offset)``:
P(preferred over a typical generation). Held-out: accuracy on the test prompts'
non-tie votes, next to the panel's own agreement on the same pairs
(``panel_pair_agreement``: the ceiling).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .base import Reward, RewardNet, save_reward
from .config import RewardConfig
from .data import StoreSnapshot, open_store, prompt_split, read_snapshot, record_findings, store_images
from .metrics import bradley_terry_loss, panel_pair_agreement
from .nets import ConditionalHead, encode_findings
from .train import features, fit, guard_report, setup, trunk_with_validity

TARGET = {"a": 1.0, "b": 0.0, "tie": 0.5}


class ComparativeNet(RewardNet):
    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.head = ConditionalHead(self.trunk.features)
        self.register_buffer("offset", torch.zeros(()))

    def utility(self, h: torch.Tensor, findings) -> torch.Tensor:
        """The Bradley-Terry f (before the offset)."""
        return self.head(h, encode_findings(findings))


class ComparativeReward(Reward):
    name = "comparative"
    Net = ComparativeNet

    def base(self, h, prompts, findings):
        return torch.sigmoid(self.net.utility(h, findings) - self.net.offset)


class Pairs:
    """The snapshot's comparisons as index pairs into one image tensor, split by prompt."""

    def __init__(self, snap: StoreSnapshot, store, cfg: RewardConfig) -> None:
        comps = [c for c in snap.comparisons if c.generation_a in snap.generations
                 and c.generation_b in snap.generations and c.preferred in TARGET]
        self.gids = sorted({g for c in comps for g in (c.generation_a, c.generation_b)})
        row = {g: i for i, g in enumerate(self.gids)}
        recs = [snap.generations[g] for g in self.gids]
        self.images = store_images(store, self.gids, cfg.image_size)
        self.findings = [record_findings(r) for r in recs]
        self.comparisons = comps
        self.a = torch.tensor([row[c.generation_a] for c in comps], dtype=torch.long)
        self.b = torch.tensor([row[c.generation_b] for c in comps], dtype=torch.long)
        self.target = torch.tensor([TARGET[c.preferred] for c in comps])
        self.weight = torch.tensor([cfg.tie_weight if c.preferred == "tie" else 1.0 for c in comps])
        self.split = [prompt_split(snap.generations[c.generation_a].prompt, cfg.seed, cfg.val_fraction,
                                   cfg.test_fraction) for c in comps]

    def where(self, split: str) -> list[int]:
        return [i for i, s in enumerate(self.split) if s == split]


@torch.no_grad()
def utilities(net: ComparativeNet, pairs: Pairs) -> torch.Tensor:
    """f of every image of ``pairs`` (eval mode)."""
    h = features(net, pairs.images).to(net.offset.device)
    return net.utility(h, pairs.findings).cpu()


def accuracy(f: torch.Tensor, pairs: Pairs, idx: list[int]) -> dict:
    """Fraction of non-tie votes whose winner has the higher f (a zero difference counts as wrong)."""
    idx = [i for i in idx if pairs.comparisons[i].preferred != "tie"]
    if not idx:
        return {"accuracy": float("nan"), "n": 0}
    t = torch.tensor(idx)
    d = f[pairs.a[t]] - f[pairs.b[t]]
    won = torch.where(pairs.target[t] > 0.5, d > 0, d < 0)
    return {"accuracy": float(won.float().mean()), "n": len(idx)}


def train(cfg: RewardConfig, store=None) -> Path:
    """Bradley-Terry on the store's comparisons; accuracy on held-out prompts' pairs."""
    device, g = setup(cfg)
    store = store if store is not None else open_store(cfg.store, cfg.blobs)
    snap = read_snapshot(store, cfg.store)
    pairs = Pairs(snap, store, cfg)
    train_idx = pairs.where("train")
    if not train_idx:
        raise ValueError(f"the store ({snap.url}) holds no comparisons of training prompts up to cursor "
                         f"{snap.cursor}: collect A/B comparisons first (cxrgen expert, or the service)")
    if cfg.max_train and len(train_idx) > cfg.max_train:
        train_idx = sorted(np.random.default_rng(cfg.seed).choice(train_idx, cfg.max_train, replace=False).tolist())
    tr = torch.tensor(train_idx, dtype=torch.long)
    net = ComparativeNet(**cfg.net).to(device)

    def step(idx, g):
        p = tr[idx]
        a, b = pairs.a[p], pairs.b[p]
        h, vloss = trunk_with_validity(net, pairs.images[torch.cat([a, b])], cfg, g)
        f = net.utility(h, [pairs.findings[i] for i in torch.cat([a, b]).tolist()])
        n = p.numel()
        bt = bradley_terry_loss(f[:n], f[n:], pairs.target[p].to(device), pairs.weight[p].to(device))
        return bt + vloss, {"bt": float(bt.detach()), "validity": float(vloss.detach())}

    def evaluate():
        return {"val_accuracy": accuracy(utilities(net, pairs), pairs, pairs.where("val"))["accuracy"]}

    fit(net, len(tr), step, cfg, g, evaluate)
    return save(net, cfg, snap, pairs, train_idx)


def save(net: ComparativeNet, cfg: RewardConfig, snap: StoreSnapshot, pairs: Pairs, train_idx: list[int]) -> Path:
    f = utilities(net, pairs)
    used = sorted({int(i) for t in train_idx for i in (pairs.a[t], pairs.b[t])})
    net.offset.fill_(float(f[used].mean()))
    reward = ComparativeReward(net)
    metrics = {}
    for split, idx in (("train", train_idx), ("val", pairs.where("val")), ("test", pairs.where("test"))):
        acc = accuracy(f, pairs, idx)
        metrics[f"{split}_pair_accuracy"], metrics[f"{split}_pairs"] = acc["accuracy"], acc["n"]
    metrics["panel_agreement_test"] = panel_pair_agreement([pairs.comparisons[i] for i in pairs.where("test")])
    metrics["panel_agreement_all"] = panel_pair_agreement(pairs.comparisons)
    test_imgs = sorted({int(i) for t in pairs.where("test") for i in (pairs.a[t], pairs.b[t])})
    test_imgs = test_imgs or list(range(len(pairs.gids)))
    metrics["guard"] = guard_report(reward, pairs.images[test_imgs], [""] * len(test_imgs),
                                    [pairs.findings[i] for i in test_imgs])
    data = {"store_url": snap.url, "store_cursor": snap.cursor, "sim_data": None,
            "comparisons": len(pairs.comparisons), "generations": len(pairs.gids), "n_train": len(train_idx),
            "n_val": len(pairs.where("val")), "n_test": len(pairs.where("test"))}
    return save_reward(reward, cfg.out, config=cfg, metrics=metrics, data=data)


REWARD = ComparativeReward  # the plug-in this module registers under its name
