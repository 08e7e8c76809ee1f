"""The offline alignment methods (issue 8): reward-weighted likelihood, Diffusion-DPO and self-play DPO.

They learn from images already generated (and judged), not from fresh samples each round:

* ``rwl`` (Sun et al. 2023, pathologist-in-the-loop): each round, a batch of real training images and a
  batch of stored generations; loss = beta * L(real) + mean(r * L(generated)), with r the generation's
  share of "plausible" ratings in the feedback store (beta = 0.3 as in the paper).
* ``dpo`` (Wallace et al. 2023): each round, a batch of the store's expert comparisons (ties left out);
  the winner's and the loser's denoising errors at the same t and noise, for the model and its frozen
  starting point, go into ``objectives.dpo_loss``. No reward model in between.
* ``spin`` (self-play Diffusion-DPO; Yuan et al. 2024, SPIN-Diffusion): the same loss with a real training
  film as the winner and the starting model's own image of that film's report as the loser, sampled once at
  the start of the run. It teaches what real films show and the model leaves out (support devices), with the
  frozen starting model as the reference that keeps it close. ``--real-oversample 'Support Devices=4'``
  picks the films of a finding K times as often. ``--losers mismatched``: the loser is another real film
  whose findings disagree with the winner's report, so both images are real and the pair differs only in
  what the report says (beyond the seed papers). ``--losers counterfactual`` (simulated data): the winner is
  the simulated exam rendered again, the loser the same exam rendered without one of its findings (a normal
  exam: with one added), every other random draw kept, so the pair differs in that finding's pixels alone.

L is the per-image denoising MSE at a random timestep (``errors``). Feedback comes from a store URL or an
NDJSON export (imported into a scratch store in the run folder).
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import torch

from ..artifacts import cached_tensors
from .objectives import dpo_loss, rwl_loss


@dataclasses.dataclass
class Feedback:
    rated: list  # (generation id, prompt, share of plausible ratings)
    pairs: list  # (winner id, loser id, prompt)
    cursor: int  # the store's feed cursor when read (goes into the manifest)
    store: object  # the FeedbackStore the images come from


def open_feedback(source: str, scratch: Path, blobs: str | None = None):
    """A store from a URL / path, or an NDJSON export imported into ``scratch`` (idempotent)."""
    from training.feedback.store import open_store

    if source.endswith((".ndjson", ".jsonl")):
        from training.feedback.exchange import import_events

        store = open_store(f"sqlite:///{scratch / 'feedback.db'}", scratch / "images")
        with open(source) as f:
            import_events(store, f, source)
        return store
    return open_store(source, blobs)


def read_feedback(store) -> Feedback:
    """Plausibility shares per rated generation and decisive pairwise comparisons, as of now."""
    votes: dict[int, list[bool]] = {}
    for r in store.ratings():
        votes.setdefault(r.generation_id, []).append(bool(r.plausible))
    gens = {g.id: g for g in store.generations(list(votes))} if votes else {}
    rated = [(gid, gens[gid].prompt, sum(v) / len(v)) for gid, v in sorted(votes.items())]
    comps = [c for c in store.comparisons() if c.preferred in ("a", "b")]
    ids = sorted({c.generation_a for c in comps} | {c.generation_b for c in comps})
    prompts = {g.id: g.prompt for g in store.generations(ids)} if ids else {}
    pairs = [((c.generation_a, c.generation_b) if c.preferred == "a" else (c.generation_b, c.generation_a))
             + (prompts[c.generation_a],) for c in comps]
    return Feedback(rated, pairs, store.cursor(), store)


def stored_images(store, ids, size: int) -> torch.Tensor:
    """Stored generations as (N, 1, size, size) in [-1, 1] (the reward models' loader, as floats)."""
    from training.reward.data import store_images

    return store_images(store, ids, size).float() / 127.5 - 1


def latents_of(pipe, images: torch.Tensor) -> torch.Tensor:
    from training.model.components import to_model_channels

    with torch.no_grad():
        x = to_model_channels(images.to(pipe.device, pipe.vae.dtype), pipe.vae.config.in_channels)
        return pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor


def errors(unet, sched, latents: torch.Tensor, embeds: torch.Tensor, t: torch.Tensor,
           noise: torch.Tensor) -> torch.Tensor:
    """Per-image denoising MSE ||target - unet(x_t, t)||^2 (epsilon or v target)."""
    noisy = sched.add_noise(latents, noise, t)
    pred = unet(noisy, t, encoder_hidden_states=embeds).sample
    target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
    return ((pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3))


def _noise_t(latents: torch.Tensor, sched, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    noise = torch.randn(latents.shape, generator=gen).to(latents.device, latents.dtype)
    t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=gen).to(latents.device)
    return noise, t


def embed(pipe, prompts) -> torch.Tensor:
    return pipe.encode_prompt(list(prompts), pipe.device, 1, False, None)[0]


def real_errors(pipe, batch: list, latents: torch.Tensor, sched, gen: torch.Generator) -> torch.Tensor:
    """Per-image denoising errors of real (image, prompt) ``batch`` (its ``latents``): the likelihood anchor."""
    noise, t = _noise_t(latents, sched, gen)
    return errors(pipe.unet, sched, latents, embed(pipe, [p for _, p in batch]), t, noise)


def real_batch(pipe, real: list, cfg, it: int) -> tuple[list, torch.Tensor, torch.Generator]:
    """Round ``it``'s real (image, prompt) batch, its latents and the generator its noise comes from."""
    rng = random.Random(cfg.seed * 1_000_033 + it)
    batch = rng.sample(real, min(cfg.prompts_per_iter * cfg.images_per_prompt, len(real)))
    return batch, latents_of(pipe, torch.stack([x for x, _ in batch])), torch.Generator().manual_seed(
        cfg.seed * 1_000_033 + it)


def rwl_round(pipe, opt, fb: Feedback, real: list, sched, cfg, it: int) -> dict:
    """One reward-weighted likelihood step on ``batch`` real and ``batch`` generated images."""
    rng = random.Random(cfg.seed * 1_000_003 + it)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + it)
    n = cfg.prompts_per_iter * cfg.images_per_prompt
    size = cfg.size or pipe.vae.config.sample_size
    gb = rng.sample(fb.rated, min(n, len(fb.rated)))
    rb = rng.sample(real, min(n, len(real)))
    g_lat = latents_of(pipe, stored_images(fb.store, [g for g, _, _ in gb], size))
    r_lat = latents_of(pipe, torch.stack([x for x, _ in rb]))
    gn, gt = _noise_t(g_lat, sched, gen)
    l_real = real_errors(pipe, rb, r_lat, sched, gen)
    l_gen = errors(pipe.unet, sched, g_lat, embed(pipe, [p for _, p, _ in gb]), gt, gn)
    rewards = torch.tensor([r for _, _, r in gb], device=l_gen.device)
    loss = rwl_loss(l_real, l_gen, rewards, cfg.rwl_beta)
    opt.backward(loss)
    opt.step()
    return {"reward": rewards.mean().item(), "loss": loss.item(), "real_loss": l_real.mean().item(),
            "generated_loss": l_gen.mean().item()}


def dpo_round(pipe, opt, fb: Feedback, reference, sched, cfg, it: int) -> dict:
    """One Diffusion-DPO step on a batch of the store's (winner, loser) pairs."""
    rng = random.Random(cfg.seed * 1_000_003 + it)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + it)
    size = cfg.size or pipe.vae.config.sample_size
    batch = rng.sample(fb.pairs, min(cfg.prompts_per_iter * cfg.images_per_prompt, len(fb.pairs)))
    w = latents_of(pipe, stored_images(fb.store, [a for a, _, _ in batch], size))
    lo = latents_of(pipe, stored_images(fb.store, [b for _, b, _ in batch], size))
    return dpo_step(pipe, opt, reference, sched, cfg, w, lo, [p for _, _, p in batch], gen)


def dpo_step(pipe, opt, reference, sched, cfg, w: torch.Tensor, lo: torch.Tensor, prompts: list[str],
             gen: torch.Generator) -> dict:
    """Diffusion-DPO on winner latents ``w`` and loser latents ``lo`` of ``prompts``: the same t and noise
    for both images and both models (the trained one and the frozen ``reference``)."""
    noise, t = _noise_t(w, sched, gen)
    emb = embed(pipe, prompts)
    mw, ml = errors(pipe.unet, sched, w, emb, t, noise), errors(pipe.unet, sched, lo, emb, t, noise)
    with torch.no_grad():
        ref_emb = embed(reference, prompts)
        rw = errors(reference.unet, sched, w, ref_emb, t, noise)
        rl = errors(reference.unet, sched, lo, ref_emb, t, noise)
    loss = dpo_loss(mw, ml, rw, rl, cfg.dpo_beta, cfg.dpo_positive)
    opt.backward(loss)
    opt.step()
    # Implicit reward accuracy: how often the model already prefers the winner more than the reference does.
    acc = (((mw - rw) - (ml - rl)) < 0).float().mean().item()
    return {"reward": acc, "loss": loss.item(), "winner_error": mw.mean().item(), "loser_error": ml.mean().item()}


def real_images(cfg, size: int, with_labels: bool = False, with_rows: bool = False) -> list:
    """(image (1, H, W) in [-1, 1], prompt[, labels (14,)[, simulator row]]) of ``cfg.limit`` distinct films of the
    real training split (``--real-data``): rwl's and draft's anchor term, spin's winners. With
    ``cfg.real_oversample`` ({label: K}) a film positive for a label is K times as likely to be picked.
    ``with_rows`` (simulated data): each film's ground_truth.jsonl object too (implies ``with_labels``)."""
    from training.data.mimic import LoaderConfig, MimicCXRDataset

    ds = MimicCXRDataset(LoaderConfig(root=cfg.real_data, split="train", size=size, return_ground_truth=with_rows))
    rng = random.Random(cfg.seed)
    if getattr(cfg, "real_oversample", None):
        from training.findings import oversample_indices

        pool = oversample_indices(ds, cfg.real_oversample)  # film i appears K times
        rng.shuffle(pool)
        idx = list(dict.fromkeys(pool))[:cfg.limit]  # distinct films, in the order first drawn
    else:
        idx = rng.sample(range(len(ds)), min(cfg.limit, len(ds)))
    samples = (ds[i] for i in idx)  # one decode per image
    if with_rows:
        return [(s["image"], s["prompt"], s["labels"], s["ground_truth"]) for s in samples]
    return [(s["image"], s["prompt"], s["labels"]) if with_labels else (s["image"], s["prompt"]) for s in samples]


@dataclasses.dataclass
class RealPairs:
    """spin's pairs, as latents: real films (winners) and, for each, a loser under the winner's report."""

    winners: torch.Tensor  # (N, C, h, w) latents of the real films
    losers: torch.Tensor  # (N, C, h, w) latents of the losers
    prompts: list  # N report texts (the winners')
    images: int  # images sampled to make the losers (this run's share of images_sampled)
    changes: dict = dataclasses.field(default_factory=dict)  # counterfactual: {"-kind" / "+kind": pairs}


def mismatched(labels: torch.Tensor, seed: int) -> list[int]:
    """For each film i, another film j whose labels disagree with i's on at least one finding both know
    (one positive, the other negative), drawn at random (seeded); i itself when no film disagrees."""
    rng = random.Random(seed)
    pos, neg = (labels == 1), (labels == 0)
    out = []
    for i in range(len(labels)):
        differs = ((pos[i] & neg) | (neg[i] & pos)).any(dim=1)
        candidates = differs.nonzero().flatten().tolist()
        out.append(rng.choice(candidates) if candidates else i)
    return out


def counterfactual_films(rows: list[dict], real_fraction: float, size: int, factors: dict | None,
                         seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Winners, losers ((N, 1, size, size) in [-1, 1]) and the change made, for simulated exams ``rows``
    (ground_truth.jsonl objects of a data set simulated with ``real_fraction``).

    Each exam is drawn again from its (seed, index) and rendered twice by the same code: as it was (the
    winner), and without one of its findings (the loser: "-kind"); an exam with no finding gets one added
    instead ("+kind"), so its normal report prefers the film without it. The finding is drawn (seeded) with
    weight K for kinds that make a ``factors`` label ({label: K}, --real-oversample) positive, 1 otherwise.
    Every other random draw (anatomy pose, exposure, noise, the other findings) is the same in both films."""
    from training.findings import KINDS, Finding
    from training.simulator.anatomy import load_anatomy
    from training.simulator.render import render_case
    from training.simulator.sampler import sample_case

    anat = load_anatomy()
    rng = random.Random(seed)
    weight = lambda k: max([int((factors or {}).get(o, 1)) for o in KINDS[k].observations] or [1])  # noqa: E731
    winners, losers, changes = [], [], []
    for row in rows:
        case = sample_case(int(row["seed"]), int(row["index"]), real_fraction).case
        win, _ = render_case(anat, case, size)
        kinds = sorted({f.kind for f in case.findings})
        if kinds:
            kind = rng.choices(kinds, [weight(k) for k in kinds])[0]
            lose, _ = render_case(anat, case, size, without=frozenset({kind}))
            changes.append("-" + kind)
        else:
            every = sorted(KINDS)
            kind = rng.choices(every, [weight(k) for k in every])[0]
            lose, _ = render_case(anat, dataclasses.replace(case, findings=(Finding(kind),)), size)
            changes.append("+" + kind)
        winners.append(win)
        losers.append(lose)
    as_batch = lambda xs: torch.stack(xs)[:, None] * 2 - 1  # noqa: E731
    return as_batch(winners), as_batch(losers), changes


def real_pairs(pipe, reference, real: list, cfg, out: Path) -> RealPairs:
    """spin's pairs for the real films ``real`` ((image, prompt, labels) each). ``cfg.losers``:

    * "self" (SPIN-Diffusion): the reference model's image of every film's report (image i from seed
      ``cfg.seed + i``, the run's ``--steps`` and ``--guidance``), sampled once and kept in OUT/self_play.pt, so
      a resumed run trains on the same losers without sampling them again;
    * "mismatched": another real film whose findings disagree with the winner's (``mismatched``), under the
      winner's report. Both images are real, so the pair differs in what the report says, not in how real the
      image looks: it teaches the conditioning and leaves the look alone. No image is sampled.
    * "counterfactual" (simulated --real-data; ``real`` items carry their ground-truth row): the exam rendered
      again (winner) and without one of its findings (loser; ``counterfactual_films``), kept in
      OUT/counterfactual.pt for a resumed run. Nothing is sampled.
    """
    prompts = [r[1] for r in real]
    size = cfg.size or pipe.vae.config.sample_size
    if cfg.losers == "counterfactual":
        import json

        sim = json.loads((Path(cfg.real_data) / "simulate_config.json").read_text())
        rows = [r[3] for r in real]
        key = {"films": [(r["seed"], r["index"]) for r in rows], "size": size, "seed": cfg.seed,
               "factors": cfg.real_oversample or {}, "real_fraction": sim.get("real_fraction", 0.5)}
        w, lo, changes = cached_tensors(out / "counterfactual.pt", key, lambda: counterfactual_films(
            rows, key["real_fraction"], size, cfg.real_oversample, cfg.seed))
        from collections import Counter

        return RealPairs(latents_of(pipe, w), latents_of(pipe, lo), prompts, 0, dict(sorted(Counter(changes).items())))
    winners = torch.stack([r[0] for r in real])
    if cfg.losers == "mismatched":
        idx = mismatched(torch.stack([torch.as_tensor(r[2]) for r in real]), cfg.seed)
        w = latents_of(pipe, winners)
        return RealPairs(w, w[idx].clone(), prompts, 0)
    from training.generation import generate

    def sample() -> torch.Tensor:
        with torch.no_grad():
            return torch.from_numpy(generate(reference, prompts, cfg.seed, cfg.steps, cfg.guidance, "", 16,
                                             size))[:, None] * 2 - 1

    key = {"prompts": prompts, "seed": cfg.seed, "steps": cfg.steps, "guidance": cfg.guidance, "size": size}
    losers = cached_tensors(out / "self_play.pt", key, sample)
    return RealPairs(latents_of(pipe, winners), latents_of(pipe, losers), prompts, len(prompts))


def spin_round(pipe, opt, pairs: RealPairs, reference, sched, cfg, it: int) -> dict:
    """One spin step: Diffusion-DPO on a batch of (real film, loser) pairs under the real films' reports."""
    rng = random.Random(cfg.seed * 1_000_003 + it)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + it)
    idx = rng.sample(range(len(pairs.prompts)), min(cfg.prompts_per_iter * cfg.images_per_prompt,
                                                    len(pairs.prompts)))
    dev = pipe.unet.device
    return dpo_step(pipe, opt, reference, sched, cfg, pairs.winners[idx].to(dev), pairs.losers[idx].to(dev),
                    [pairs.prompts[i] for i in idx], gen)
