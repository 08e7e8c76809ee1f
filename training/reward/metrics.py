"""Losses and held-out metrics of the reward models (pure functions; tested against hand computations)."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F


def bradley_terry_loss(f_a: torch.Tensor, f_b: torch.Tensor, target: torch.Tensor,
                       weight: torch.Tensor | None = None) -> torch.Tensor:
    """Bradley-Terry negative log-likelihood: P(a preferred over b) = sigmoid(f(a) - f(b)).

    ``target`` is 1 where a was preferred, 0 where b was, 0.5 for a tie, so the
    loss is ``-log sigmoid(f_a - f_b)`` for a win of a, ``-log sigmoid(f_b - f_a)``
    for a win of b and their mean for a tie (minimised at f_a = f_b). Weighted mean
    over pairs.
    """
    d = f_a - f_b
    per = -(target * F.logsigmoid(d) + (1 - target) * F.logsigmoid(-d))
    if weight is None:
        return per.mean()
    return (per * weight).sum() / weight.sum().clamp(min=1e-12)


def binary_nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean binary cross-entropy of sigmoid(logits / T) against (soft) targets."""
    return float(F.binary_cross_entropy_with_logits(logits.double() / temperature, targets.double()))


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, lo: float = 0.05, hi: float = 20.0) -> float:
    """Temperature scaling (Guo et al. 2017): the T minimising the NLL of sigmoid(logit / T) on held-out data.

    One parameter, so a golden-section search over log T (the NLL is unimodal in
    it) is exact enough and needs no optimiser state. T > 1 softens an
    overconfident model; the ranking (AUROC) is unchanged. Returns 1.0 for empty
    or one-class data (nothing to calibrate against).
    """
    logits, targets = logits.detach().double().flatten(), targets.detach().double().flatten()
    if logits.numel() == 0 or (targets.min() == targets.max() and targets.min() in (0.0, 1.0)):
        return 1.0
    a, b = math.log(lo), math.log(hi)
    gr = (math.sqrt(5) - 1) / 2
    c, d = b - gr * (b - a), a + gr * (b - a)
    for _ in range(60):
        if binary_nll(logits, targets, math.exp(c)) < binary_nll(logits, targets, math.exp(d)):
            b = d
        else:
            a = c
        c, d = b - gr * (b - a), a + gr * (b - a)
    return float(math.exp((a + b) / 2))


def fit_platt(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """Platt scaling (Platt 1999): the (T, b) minimising the NLL of sigmoid(logit / T + b) on held-out data.

    Temperature scaling plus a bias: the bias corrects a shifted base rate (e.g. weak positives that
    make the training set look more plausible than the rated generations are), which a temperature
    alone cannot. The ranking (AUROC) is unchanged since T > 0. Returns (1, 0) for empty or
    one-class data.
    """
    x, y = logits.detach().double().flatten(), targets.detach().double().flatten()
    if x.numel() == 0 or (y.min() == y.max() and y.min() in (0.0, 1.0)):
        return 1.0, 0.0
    log_t = torch.tensor(math.log(fit_temperature(x, y)), dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t, b], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x / log_t.exp() + b, y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0)), float(b.detach())


def expected_calibration_error(probs, targets, bins: int = 15) -> float:
    """ECE with ``bins`` equal-width confidence bins over P(positive) (Naeini et al. 2015; Guo et al. 2017).

    Sum over bins of (bin size / N) x |mean predicted probability - fraction of
    positives|. Probability 1.0 falls in the last bin. NaN for no samples.
    """
    p = np.asarray(probs, dtype=np.float64).ravel()
    y = np.asarray(targets, dtype=np.float64).ravel()
    if p.size == 0:
        return math.nan
    idx = np.minimum((p * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            ece += m.mean() * abs(p[m].mean() - y[m].mean())
    return float(ece)


def pearson(a, b) -> float:
    """Pearson correlation; NaN when either side is constant or there are fewer than 2 values."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def recall_at_k(similarity: torch.Tensor, truth: Sequence[int], ks: Iterable[int] = (1, 5, 10)) -> dict[str, float]:
    """Image -> text retrieval: fraction of rows whose true column ``truth[i]`` is among the top k."""
    sim = similarity.detach().float()
    truth_t = torch.as_tensor(list(truth), dtype=torch.long)
    true_score = sim[torch.arange(sim.shape[0]), truth_t]
    # rank = number of candidates scoring strictly higher (ties resolved in the image's favour)
    rank = (sim > true_score[:, None]).sum(1)
    return {f"recall@{k}": float((rank < k).float().mean()) for k in ks}


def pair_key(a: int, b: int) -> tuple[int, int]:
    return (a, b) if a <= b else (b, a)


def vote(comparison) -> str:
    """A comparison's verdict in the key's order: "lo" (smaller id won), "hi" or "tie"."""
    if comparison.preferred == "tie":
        return "tie"
    winner = comparison.generation_a if comparison.preferred == "a" else comparison.generation_b
    return "lo" if winner == min(comparison.generation_a, comparison.generation_b) else "hi"


def panel_pair_agreement(comparisons: Sequence) -> dict[str, float]:
    """How much the raters agree among themselves on the same pair: the ceiling of a pairwise reward.

    * ``rater_pair_agreement``: over pairs of *different raters'* non-tie votes on
      the same two images, the fraction that agree.
    * ``loo_majority_agreement``: each non-tie vote against the majority of the
      other raters' non-tie votes on that pair (leave one out; pairs where the
      others tie or are split are skipped). This is what a perfect model of "the
      panel" would score on single votes, the figure to set next to the
      Bradley-Terry accuracy.
    """
    votes: dict[tuple, list[tuple[str, str]]] = defaultdict(list)
    for c in comparisons:
        v = vote(c)
        if v != "tie":
            votes[pair_key(c.generation_a, c.generation_b)].append((str(c.rater_id), v))
    agree = total = loo_hit = loo_n = 0
    for vs in votes.values():
        for i in range(len(vs)):
            for j in range(i + 1, len(vs)):
                if vs[i][0] != vs[j][0]:
                    total += 1
                    agree += vs[i][1] == vs[j][1]
            others = [v for r, v in vs[:i] + vs[i + 1:] if r != vs[i][0]]
            lo = others.count("lo")
            if others and 2 * lo != len(others):
                loo_n += 1
                loo_hit += ("lo" if 2 * lo > len(others) else "hi") == vs[i][1]
    return {"rater_pair_agreement": agree / total if total else math.nan, "rater_pairs": total,
            "loo_majority_agreement": loo_hit / loo_n if loo_n else math.nan, "loo_votes": loo_n}
