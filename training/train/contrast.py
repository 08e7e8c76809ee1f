"""Prompt contrast: a training term that isolates what a finding's words add (issue 8: support devices).

The denoising loss of a film is dominated by what fills it; a catheter is 0.4 % of the latent, so the words
"central line" earn 0.4 % of the error and the model learned them no better with 4x the device films or with
cross-attention at the finest level. The contrast asks the diffusion classifier's question (Li et al. 2023)
directly. For a film positive for a label, its report p and the same report without the sentences that assert
the label (``strip_mentions``) are two descriptions of the same noisy latent, at the same timestep and noise:

    margin = w(t) * [err(x_t, p without the sentences) - err(x_t, p)]

(err: the per-image denoising MSE; w(t): the loss's min-SNR weight). Everything the two readings share (the
99.6 % of the film) is the same error in both terms and cancels: the margin is what the sentences buy. For a
film negative for the label, its report p with a sentence asserting the label prepended (drawn from the
training positives' own sentences) must denoise worse: margin = w(t) * [err(x_t, sentence + p) - err(x_t, p)].
The term is W / beta * softplus(-beta * margin), averaged over the batch's pairs (its negatives are as many as
its positives) and added to the denoising loss. While a margin is small its pull on the margin is W / 2 times the
denoising loss's pull on one image's error (W, the label's weight, is strength alone); beta sets where it lets go:
past a margin of a few / beta the term earns nothing. That matters: a margin can also be won by denoising worse
(the wrong reading worse, and with it the shared weights), and an unbounded one was (W 1, beta 1,000, without the
1 / beta factor: within 50 steps margins of 1e-2, a sixth of the whole loss, and the denoising loss doubled). beta = 20,000 lets go
near 2e-4, about what a catheter's 0.4 % of the latent is worth. Both readings train (the cancellation needs
both); the denoising loss on the true reports anchors them.

Pairs are chosen from the labels and the text, so the term works on any data with CheXpert labels and report
text (real MIMIC-CXR as well as the simulator's). A prompt dropped to "" for classifier-free guidance is not
paired; a negative whose report already asserts the label (e.g. a label the labeller missed) is not used.
The negatives and their sentences are drawn by a generator seeded from the batch's reports: the same batch gets
the same pairs (on resume too), and the term draws nothing from the run's shared generators, so dropout, noise
and timesteps are draw for draw those of the same run without it.

A margin can also be won from the words alone. Where few distinct reports go round (the simulator's world: 500
for 845 device films), a sentence on a report body it never came with is a tell, and the model learned it: in
README's "A finer latent grid" the trained margin is the same on an exam rendered with and without the device.
``benchmarks/contrast_margins.py`` measures the part of the margin that reads the film; watch that, not
``contrast_acc``.

``--contrast-films`` (simulated data) takes the words' part out. Each positive film's exam is rendered again by
the simulator twice, as it was (x+) and without the label's findings (x-, every other draw kept, as
``align spin --losers counterfactual`` does), and the margin is the difference between the two films of what the
sentences buy, on the same noise and timestep:

    margin = w(t) * ([err(x+_t, stripped) - err(x+_t, p)] - [err(x-_t, stripped) - err(x-_t, p)])

A sentence that helps on every film alike (a text tell) cancels between the brackets, as does how hard each film
is to denoise (within a bracket): what is left grows only if the words make the model draw the device where the
film has one. A film without a device under the device sentence (x-) is the negative, so no report gets a foreign
sentence in this form. It costs four U-Net passes a positive film; the renders are kept in OUT/contrast_films.pt.
"""

from __future__ import annotations

import dataclasses
import random
import zlib
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.reports import MENTIONS, mention_sentences, strip_mentions
from ..findings import KINDS, OBSERVATIONS


def label_kinds(label: str) -> tuple[str, ...]:
    """The finding kinds whose report phrases assert ``label`` (Support Devices: endotracheal tube, central line)."""
    return tuple(k for k, spec in KINDS.items() if label in spec.observations and k in MENTIONS)


def check_contrast(weights: Mapping[str, float], beta: float) -> None:
    """A ValueError naming the flag and the entry for an unknown label, a label cxrgen cannot find in report
    text, a weight that is not a positive number, or a beta that is not positive."""
    for label, w in weights.items():
        if label not in OBSERVATIONS:
            raise ValueError(f"--contrast: unknown label {label!r}; known: {list(OBSERVATIONS)}")
        if not label_kinds(label):
            usable = [o for o in OBSERVATIONS if label_kinds(o)]
            raise ValueError(f"--contrast {label}: cxrgen cannot find this label's sentences in a report; "
                             f"labels it can: {usable}")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w < float("inf"):
            raise ValueError(f"--contrast {label}: the weight must be a number > 0, got {w!r}")
    if not 0 < beta < float("inf"):
        raise ValueError(f"--contrast-beta must be > 0, got {beta}")


@dataclasses.dataclass
class ContrastLabel:
    label: str
    column: int  # the label's column in the CheXpert label rows
    kinds: tuple[str, ...]  # finding kinds whose sentences assert it
    weight: float  # the term's weight for this label
    sentences: tuple[str, ...]  # the training positives' sentences asserting it: what a negative's report gets


def contrast_labels(weights: Mapping[str, float], prompts: Sequence[str], labels) -> list[ContrastLabel]:
    """One ``ContrastLabel`` per entry of ``weights``, its sentences read from the training positives' reports;
    a ValueError when no positive report asserts the label (nothing to strip, nothing to insert)."""
    labels = np.asarray(labels)
    out = []
    for label, w in weights.items():
        col, kinds = OBSERVATIONS.index(label), label_kinds(label)
        found = {s for p, y in zip(prompts, labels[:, col]) if y == 1.0 for s in mention_sentences(p, kinds)}
        if not found:
            raise ValueError(f"--contrast {label}: no training report positive for it asserts it in words "
                             f"({', '.join(kinds)}); nothing to contrast")
        out.append(ContrastLabel(label, col, kinds, float(w), tuple(sorted(found))))
    return out


def contrast_pairs(prompts: Sequence[str], read: Sequence[str], labels: torch.Tensor,
                   specs: Sequence[ContrastLabel], rng: random.Random | None = None) -> list[tuple[int, str, float]]:
    """(batch index, the other reading of its film, weight) for each pair of the batch.

    ``prompts`` are the reports, ``read`` what the U-Net read (after dropout), ``labels`` (B, 14). A positive's
    other reading is its report without the label's sentences (skipped if that changes nothing); as many
    negatives as positives (fewer if the batch has fewer), chosen at random, get a positive's sentence prepended.
    """
    rng = rng or random.Random(zlib.crc32("\n".join(prompts).encode()))
    out = []
    for spec in specs:
        pos, neg = [], []
        for i, (p, r) in enumerate(zip(prompts, read)):
            if not p or r != p:  # dropped to "" this step: no reading to contrast
                continue
            y = float(labels[i, spec.column])
            if y == 1.0:
                if mention_sentences(p, spec.kinds):
                    pos.append((i, strip_mentions(p, spec.kinds), spec.weight))
            elif y == 0.0 and not mention_sentences(p, spec.kinds):
                neg.append(i)
        chosen = sorted(rng.sample(neg, min(len(pos), len(neg))))
        out += pos + [(i, f"{rng.choice(spec.sentences)} {prompts[i]}", spec.weight) for i in chosen]
    return out


def contrast_loss(parts, noise_sched, denoised, batch: dict, specs: Sequence[ContrastLabel], beta: float,
                  snr_gamma: float | None) -> tuple[torch.Tensor | None, dict]:
    """The term over the batch's pairs (None if it has none) and its logs: pairs, the share of pairs whose
    margin is positive (the diffusion classifier's accuracy on them) and the mean margin. A batch carrying
    ``has_film`` / ``film_dist`` (``--contrast-films``) pairs its positives' counterfactual films (``film_pairs``,
    ``film_margins``) and uses no negatives; otherwise ``contrast_pairs`` on the denoising pass ``denoised``."""
    from .loop import encode_text, min_snr_weight

    films = "has_film" in batch  # --contrast-films: the counterfactual films' margins instead
    if films:
        pairs = film_pairs(batch["prompt"], batch["has_film"], batch["labels"], specs)
    else:
        pairs = contrast_pairs(batch["prompt"], denoised.prompts, batch["labels"], specs)
    if not pairs:
        return None, {"contrast_pairs": 0}
    dev = denoised.noisy.device
    idx = torch.tensor([i for i, _, _ in pairs], device=dev)
    weight = torch.tensor([w for _, _, w in pairs], device=dev)
    if films:  # its own draws, from a generator seeded by the batch's reports: the run's RNGs are untouched
        gen = torch.Generator().manual_seed(zlib.crc32("\n".join(batch["prompt"]).encode()))
        margin = film_margins(parts, noise_sched, batch, pairs, idx, denoised.t[idx], snr_gamma, gen)
    else:  # for positives and negatives alike the report is the right reading and the other text the wrong one
        other = parts.unet(denoised.noisy[idx], denoised.t[idx], encode_text(parts, [o for _, o, _ in pairs])).sample
        err_other = F.mse_loss(other.float(), denoised.target[idx].float(), reduction="none").mean(dim=(1, 2, 3))
        w_t = min_snr_weight(noise_sched, denoised.t[idx], snr_gamma) if snr_gamma else torch.ones_like(err_other)
        margin = w_t * (err_other - denoised.per[idx])
    loss = (weight * F.softplus(-beta * margin)).mean() / beta
    margin = margin.detach()
    return loss, {"contrast_pairs": len(pairs), "contrast_acc": float((margin > 0).float().mean()),
                  "contrast_margin": float(margin.mean())}


# --------------------------------------------------------------------------- the counterfactual films


def film_kinds(truth: dict, labels, specs: Sequence[ContrastLabel]) -> frozenset[str]:
    """The finding kinds to take out of a simulated exam (``truth``: its ground_truth.jsonl object, ``labels``
    its CheXpert row) for its counterfactual film: those of every contrast label it is positive for."""
    have = {f["kind"] for f in truth.get("findings", [])}
    return frozenset(k for s in specs if float(labels[s.column]) == 1.0 for k in s.kinds if k in have)


def render_films(root, dicom_ids: Sequence[str], labels, specs: Sequence[ContrastLabel], size: int,
                 progress: bool = False, workers: int = 1) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """(rows, with, without) for the films of a simulated data folder ``root`` (``dicom_ids`` and ``labels`` in
    dataset order) that have a contrast label's findings: each exam drawn again from its (seed, index) and
    rendered as it was and without those findings (``simulator.dataset.render_again``), (N, 1, size, size) in
    [-1, 1]; ``rows`` their dataset indices; rendered in ``workers`` processes. A ValueError when the folder is
    not simulated (no ground truth) or no film has the findings."""
    from pathlib import Path

    from ..data.mimic import GROUND_TRUTH, load_ground_truth
    from ..simulator.dataset import render_again

    root = Path(root)
    if not (root / GROUND_TRUTH).is_file():
        raise ValueError(f"--contrast-films renders the training exams again: {root} has no {GROUND_TRUTH} "
                         "(simulated data only)")
    labels = np.asarray(labels)
    wanted = [i for i in range(len(dicom_ids)) if any(labels[i, s.column] == 1.0 for s in specs)]
    truth = load_ground_truth(root / GROUND_TRUTH, {str(dicom_ids[i]) for i in wanted})
    kinds = {i: film_kinds(truth[str(dicom_ids[i])], labels[i], specs) for i in wanted}
    rows = [i for i in wanted if kinds[i]]  # a positive drawn without the findings has nothing to take out
    if not rows:
        raise ValueError(f"--contrast-films: no film of {root} has the findings of {[s.label for s in specs]}")
    plus, minus = render_again(root, [truth[str(dicom_ids[i])] for i in rows], [kinds[i] for i in rows], size,
                               progress, workers)
    return rows, plus, minus


def film_pairs(prompts: Sequence[str], has_film: torch.Tensor, labels: torch.Tensor,
               specs: Sequence[ContrastLabel]) -> list[tuple[int, str, float]]:
    """(batch index, its report without the sentences of the labels it is positive for, weight) for each film of
    the batch that has a counterfactual and a sentence to strip (the weight: the largest of its labels')."""
    out = []
    for i, p in enumerate(prompts):
        if not bool(has_film[i]):
            continue
        mine = [s for s in specs if float(labels[i, s.column]) == 1.0 and mention_sentences(p, s.kinds)]
        if mine:
            kinds = tuple(k for s in mine for k in s.kinds)
            out.append((i, strip_mentions(p, kinds), max(s.weight for s in mine)))
    return out


def film_margins(parts, noise_sched, batch: dict, pairs, idx: torch.Tensor, t: torch.Tensor,
                 snr_gamma: float | None, gen: torch.Generator) -> torch.Tensor:
    """The difference-in-differences margin of each pair (module docstring): the films' latents sampled from
    their cached posteriors with one draw for both, one noise draw for both, timesteps ``t``; one U-Net pass."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from .loop import config_of, encode_text, min_snr_weight

    n = len(pairs)
    dists = batch["film_dist"][idx.cpu()].to(t.device)  # (P, 2, 2C, h, w): with, without
    post = DiagonalGaussianDistribution(dists.transpose(0, 1).flatten(0, 1))  # with x P, without x P
    eps = torch.randn(post.mean[:n].shape, generator=gen).to(t.device)
    zz = (post.mean + post.std * eps.repeat(2, 1, 1, 1)) * config_of(parts.vae).scaling_factor
    noise = torch.randn(eps.shape, generator=gen).to(t.device)
    tt, nn = t.repeat(2), noise.repeat(2, 1, 1, 1)
    noisy = noise_sched.add_noise(zz, nn, tt)
    target = nn if noise_sched.config.prediction_type == "epsilon" else noise_sched.get_velocity(zz, nn, tt)
    reports = [batch["prompt"][i] for i, _, _ in pairs]
    stripped = [o for _, o, _ in pairs]
    emb_p, emb_s = encode_text(parts, reports + stripped).split(n)  # each text encoded once, read by both films
    emb = torch.cat([emb_p, emb_p, emb_s, emb_s])  # (film, text): (+, p), (-, p), (+, stripped), (-, stripped)
    pred = parts.unet(noisy.repeat(2, 1, 1, 1), tt.repeat(2), emb).sample
    err = F.mse_loss(pred.float(), target.repeat(2, 1, 1, 1).float(), reduction="none").mean(dim=(1, 2, 3))
    plus_p, minus_p, plus_s, minus_s = err.view(4, n)
    w_t = min_snr_weight(noise_sched, t, snr_gamma) if snr_gamma else torch.ones_like(plus_p)
    return w_t * ((plus_s - plus_p) - (minus_s - minus_p))
