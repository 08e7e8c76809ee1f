"""The ``cxrgen align`` loop for the on-policy methods (issue 8): ddpo (+ rlcf, + ace) and draft.

Phases: 1. load the parent checkpoint, add LoRA adapters (and ACE tokens); 2. each round, draw prompts
and seeds from the run's seed and the round number (so a resumed run draws what an uninterrupted one
would), sample, reward, update; 3. log every round to ``log.jsonl`` and save a resumable state every
``save_every`` rounds; 4. fuse the adapters and save the checkpoint with a manifest naming its parent,
the method, the reward models and their weights.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import time
from pathlib import Path

import torch

from ..artifacts import trim_log
from . import offline
from .config import AlignConfig


def read_prompts(cfg: AlignConfig) -> list[tuple[str, list]]:
    from training.generation import read_data_prompts, read_prompts_file

    if cfg.prompts_from:
        return read_data_prompts(cfg.prompts_from, cfg.split, cfg.limit)
    return read_prompts_file(cfg.prompts_file)


def reward_function(cfg: AlignConfig):
    """images (N, 1, H, W) in [-1, 1], prompts, findings -> the weighted reward (N,), differentiable (draft
    backpropagates through it; ddpo calls it under no_grad)."""
    from training.reward.base import cached_reward

    total = sum(cfg.weights.values())
    rewards = {n: (cached_reward(n, cfg.reward_dir, cfg.device), w / total) for n, w in cfg.weights.items() if w > 0}

    def fn(images, prompts, findings):
        from training.reward.data import parse_findings

        found = [parse_findings(f) for f in findings]
        return sum(w * r.forward(images, list(prompts), found)["score"] for r, w in rewards.values())

    return fn, {n: r.version for n, (r, _) in rewards.items()}


def setup(cfg: AlignConfig, device: str):
    """(pipe, trainable params, anchor or None, the child's lineage: the parent first)."""
    from diffusers import DDIMScheduler
    from peft import LoraConfig

    from training.generation import DEFAULT_MODEL
    from training.model.checkpoint import lineage_from, load_pipeline

    from .ace import ConditionTokens, attach

    pipe, manifest = load_pipeline(cfg.model or DEFAULT_MODEL, device=device)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    # RLCF's anchor and DPO's / spin's reference: the frozen starting model.
    anchor = copy.deepcopy(pipe) if cfg.rlcf or cfg.method in ("dpo", "spin") else None
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    pipe.unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, init_lora_weights="gaussian",
                                     target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    if cfg.ace:
        attach(pipe, ConditionTokens(cfg.ace_tokens, pipe.text_encoder.config.hidden_size))
    return pipe, trainable(pipe), anchor, lineage_from(manifest, cfg.model)


def process_device(cfg: AlignConfig) -> str:
    """--device, or under `accelerate launch` with several processes this process's own GPU."""
    from accelerate import PartialState

    state = PartialState(cpu=cfg.device == "cpu")
    return str(state.device) if state.num_processes > 1 else cfg.device


def trainable(pipe) -> dict[str, torch.nn.Parameter]:
    """Name -> parameter of everything alignment trains: the LoRA adapters and the ACE tokens."""
    out = {f"unet.{n}": p for n, p in pipe.unet.named_parameters() if p.requires_grad}
    if getattr(pipe, "ace", None) is not None:
        out["ace.tokens"] = pipe.ace.tokens
    return out


def round_batch(prompts: list, cfg: AlignConfig, it: int, rank: int = 0) -> tuple[list[str], list, list[int]]:
    """The round's prompts (each ``images_per_prompt`` times), findings and seeds: a function of seed, round
    and process rank (each process of a multi-GPU run samples its own)."""
    rng = random.Random(cfg.seed * 1_000_003 + it + rank * 7_777_777)
    chosen = rng.sample(prompts, min(cfg.prompts_per_iter, len(prompts)))
    flat = [p for p in chosen for _ in range(cfg.images_per_prompt)]
    seeds = [cfg.seed * 10_000_000 + rank * 1_000_000_000 + it * 1000 + i for i in range(len(flat))]
    return [p for p, _ in flat], [[f.to_dict() for f in fs] for _, fs in flat], seeds


def draft_round(pipe, opt, prompts, findings, seeds, reward_fn, cfg: AlignConfig, real: list | None = None,
                sched=None, it: int = 0) -> dict:
    """One DRaFT-K step: -reward of fresh samples, plus ``cfg.draft_beta`` x the denoising loss of a real batch
    when ``real`` images are given (the likelihood anchor that keeps the model near the data)."""
    from .sampling import decode, sample_draft

    with opt.autocast():
        x0 = sample_draft(pipe, prompts, [torch.Generator().manual_seed(s) for s in seeds], cfg.steps, cfg.guidance,
                          cfg.draft_k, cfg.size)
        images = decode(pipe, x0)
    reward = reward_fn(images.float(), prompts, findings)
    loss = -reward.mean()
    info = {}
    if real:
        batch, latents, gen = offline.real_batch(pipe, real, cfg, it)
        with opt.autocast():
            l_real = offline.real_errors(pipe, batch, latents, sched, gen).mean()
        loss = loss + cfg.draft_beta * l_real
        info["real_loss"] = l_real.item()
    opt.backward(loss)
    grad_norm = opt.step()
    return {"reward": reward.mean().item(), "loss": loss.item(), "grad_norm": grad_norm, **info}


def save_state(out: Path, it: int, params: dict, opt, stats, images: int, seconds: float, watch=None) -> None:
    state = out / "state"
    state.mkdir(parents=True, exist_ok=True)
    blob = {"iteration": it, "params": {k: v.detach().cpu() for k, v in params.items()},
            "optimizer": opt.state_dict(), "stats": {k: list(v) for k, v in stats.buffers.items()} if stats else {},
            "images": images, "seconds": seconds, "watch": watch.state() if watch else None}
    tmp = state / "state.pt.tmp"
    torch.save(blob, tmp)
    os.replace(tmp, state / "state.pt")  # a kill mid-save keeps the previous state


def load_state(out: Path, params: dict, opt, stats, watch=None) -> tuple[int, int, float]:
    """(rounds done, images sampled, seconds) of a previous run in ``out``; zeros for a new run."""
    import collections

    path = out / "state" / "state.pt"
    if not path.is_file():
        return 0, 0, 0.0
    blob = torch.load(path, weights_only=False)
    with torch.no_grad():
        for k, v in blob["params"].items():
            params[k].copy_(v)
    opt.load_state_dict(blob["optimizer"])
    if stats is not None:
        stats.buffers = {k: collections.deque(v, maxlen=stats.buffer_size) for k, v in blob["stats"].items()}
    if watch is not None and blob.get("watch"):
        watch.load(blob["watch"])
    return blob["iteration"], blob["images"], blob["seconds"]


class Watch:
    """The held-out probes of a run: the set, the three eyes, early stopping and the best weights so far."""

    def __init__(self, cfg: AlignConfig, pipe, reward_fn, params: dict):
        from . import heldout

        self.cfg, self.pipe, self.reward_fn, self.params = cfg, pipe, reward_fn, params
        data = cfg.eval_data or cfg.prompts_from
        self.enabled = cfg.probes
        self.stop = heldout.EarlyStop(cfg.patience, cfg.panel_tolerance, cfg.judge_tolerance)
        self.best: dict | None = None
        self.probes: list[dict] = []
        if self.enabled:
            self.set = heldout.HeldoutSet.load(data, cfg.eval_split, cfg.eval_limit, cfg.eval_prompts_file)
            self.panel, self.raters, self.judge = heldout.load_eyes(cfg.panel, cfg.judge, device=str(pipe.device))

    def probe(self, iteration: int) -> tuple[dict, bool]:
        """Probe now; (the verdicts, stop the run)."""
        from . import heldout

        v = heldout.probe(self.pipe, self.set, self.reward_fn, self.panel, self.raters, self.judge, self.cfg.seed,
                          self.cfg.steps, self.cfg.guidance, self.cfg.size)
        better, stop = self.stop.update(iteration, v)
        if better:
            self.best = {"iteration": iteration, "params": {k: p.detach().cpu().clone() for k, p in self.params.items()}}
        self.probes.append({"iteration": iteration, **heldout.summary(v)})
        return v, stop

    def restore_best(self) -> int | None:
        """Put the best probe's weights back (``keep_best``); the round they came from, or None."""
        if not (self.cfg.keep_best and self.best):
            return None
        with torch.no_grad():
            for k, v in self.best["params"].items():
                self.params[k].copy_(v)
        return self.best["iteration"]

    def state(self) -> dict:
        return {"stop": self.stop.state(), "best": self.best, "probes": self.probes}

    def load(self, d: dict) -> None:
        from . import heldout

        self.stop, self.best, self.probes = heldout.EarlyStop.from_state(d["stop"]), d["best"], d["probes"]


def check_resume(out: Path, cfg: AlignConfig) -> None:
    saved = out / "config.json"
    if saved.is_file() and (out / "state" / "state.pt").is_file():
        old = json.loads(saved.read_text())
        keep = {"iterations", "save_every", "device", "version"}  # may change between pieces of a run
        diff = sorted(k for k, v in dataclasses.asdict(cfg).items() if k not in keep and old.get(k) != v)
        if diff:
            raise ValueError(f"{out} holds a run with other settings ({', '.join(diff)}); use a new --out")


def align(cfg: AlignConfig, progress: bool = True) -> Path:
    """Run (or resume) an alignment; returns the aligned checkpoint folder."""
    from . import ddpo
    from .config import ON_POLICY
    from .objectives import PerPromptStats
    from .optim import Optimiser

    from diffusers.utils import logging as diffusers_logging

    cfg.validate()
    diffusers_logging.set_verbosity_error()  # not a warning quoting the cut tokens of every long report
    out = Path(cfg.out)
    check_resume(out, cfg)
    on_policy = cfg.method in ON_POLICY
    prompts = read_prompts(cfg) if on_policy else []
    # The reward models: what on-policy methods optimise, and the held-out reward every method is watched by.
    reward_fn, versions = reward_function(cfg) if on_policy or cfg.probes else (None, {})
    pipe, params, anchor, lineage = setup(cfg, process_device(cfg))
    opt = Optimiser(params, cfg.lr, cfg.max_grad_norm, cfg.mixed_precision, cpu=cfg.device == "cpu")
    if opt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(cfg.to_json())
    fb, real, noise_sched = offline_data(cfg, pipe, out) if cfg.method in ("rwl", "dpo") else (None, [], None)
    if cfg.method in ("draft", "spin") and cfg.real_data:
        real, noise_sched = real_data(cfg, pipe)
    pairs = offline.real_pairs(pipe, anchor, real, cfg, out) if cfg.method == "spin" else None
    stats = PerPromptStats(cfg.buffer, cfg.min_count) if cfg.method == "ddpo" else None
    watch = Watch(cfg, pipe, reward_fn, params)
    start, images, seconds = load_state(out, params, opt, stats, watch)
    if opt.is_main:  # rounds logged after the state's last save are logged again (a new run: all of them)
        trim_log(out / "log.jsonl", "iteration", start if start else -1)
    if pairs is not None and start == 0:
        images = pairs.images  # the losers were sampled for this run
    dcfg = ddpo.DDPOConfig(steps=cfg.steps, guidance=cfg.guidance, eta=cfg.eta, clip_range=cfg.clip_range,
                           adv_clip=cfg.adv_clip, buffer=cfg.buffer, min_count=cfg.min_count,
                           inner_epochs=cfg.inner_epochs, timestep_fraction=cfg.timestep_fraction,
                           max_grad_norm=cfg.max_grad_norm)

    def write(row: dict) -> None:
        if opt.is_main:
            with open(out / "log.jsonl", "a") as log:
                log.write(json.dumps(row) + "\n")

    stopped = ""
    if watch.enabled and start == 0:
        v, _ = watch.probe(0)
        write({"iteration": 0, "images_sampled": 0, "seconds": 0.0, "heldout": watch.probes[-1]})
    for it in range(start, cfg.iterations):
        t = time.perf_counter()
        if cfg.method == "ddpo":
            p, f, s = round_batch(prompts, cfg, it, opt.rank)
            info = ddpo.iteration(pipe, opt, p, f, s, reward_fn, stats, dcfg, anchor,
                                  random.Random(cfg.seed * 7919 + it))
            images += len(p) * (2 if anchor is not None else 1) * opt.accelerator.num_processes
        elif cfg.method == "draft":
            p, f, s = round_batch(prompts, cfg, it, opt.rank)
            info = draft_round(pipe, opt, p, f, s, reward_fn, cfg, real, noise_sched, it)
            images += len(p) * opt.accelerator.num_processes
        elif cfg.method == "rwl":
            with opt.autocast():
                info = offline.rwl_round(pipe, opt, fb, real, noise_sched, cfg, it)
        elif cfg.method == "spin":
            with opt.autocast():
                info = offline.spin_round(pipe, opt, pairs, anchor, noise_sched, cfg, it)
        else:
            with opt.autocast():
                info = offline.dpo_round(pipe, opt, fb, anchor, noise_sched, cfg, it)
        seconds += time.perf_counter() - t
        row = {"iteration": it + 1, "images_sampled": images, "seconds": round(seconds, 2), **info}
        stop = False
        if watch.enabled and ((it + 1) % cfg.eval_every == 0 or it + 1 == cfg.iterations):
            _, stop = watch.probe(it + 1)
            row["heldout"] = watch.probes[-1]
        write(row)
        if progress and opt.is_main:
            extra = f", held-out reward {row['heldout'].get('reward', float('nan')):.4f}" if "heldout" in row else ""
            print(f"align {cfg.method} {it + 1}/{cfg.iterations}: reward {info['reward']:.4f}{extra}", flush=True)
        if opt.is_main and ((it + 1) % cfg.save_every == 0 or it + 1 == cfg.iterations or stop):
            save_state(out, it + 1, params, opt, stats, images, seconds, watch)
        if stop:
            stopped = watch.stop.reason
            write({"iteration": it + 1, "early_stop": stopped})
            if progress and opt.is_main:
                print(f"align: early stop: {stopped}", flush=True)
            break
    opt.wait()
    selected = watch.restore_best() if watch.enabled else None
    extra = {"feedback_cursor": fb.cursor, "rated": len(fb.rated), "pairs": len(fb.pairs)} if fb else {}
    if pairs is not None:
        extra = {"pairs": len(pairs.prompts), "real_films": len(real), "losers": cfg.losers,
                 **({"changes": pairs.changes} if pairs.changes else {})}
    evaluation = {"before": watch.probes[0], "after": watch.probes[-1], "selected_round": selected,
                  "early_stop": stopped or None} if watch.probes else {}
    if selected is not None:
        evaluation["selected"] = next(p for p in watch.probes if p["iteration"] == selected)
    if not opt.is_main:
        return out / "checkpoint"
    return finish(pipe, cfg, out, lineage, versions, images, seconds, extra, evaluation)


def real_data(cfg: AlignConfig, pipe) -> tuple[list, object]:
    """draft / spin --real-data: the real training images (draft's likelihood anchor, spin's winners) and the
    training noise schedule."""
    from diffusers import DDPMScheduler

    real = offline.real_images(cfg, cfg.size or pipe.vae.config.sample_size, with_labels=cfg.method == "spin",
                               with_rows=cfg.method == "spin" and cfg.losers == "counterfactual")
    if not real:
        raise ValueError(f"--real-data {cfg.real_data}: no training images")
    return real, DDPMScheduler.from_config(pipe.scheduler.config)


def offline_data(cfg: AlignConfig, pipe, out: Path):
    """rwl / dpo: the feedback (ratings, decisive comparisons), real images (rwl) and the training noise schedule."""
    from diffusers import DDPMScheduler

    store = offline.open_feedback(cfg.feedback, out / "feedback", cfg.feedback_blobs)
    fb = offline.read_feedback(store)
    if cfg.method == "rwl" and not fb.rated:
        raise ValueError(f"--feedback {cfg.feedback}: no rated generations to learn from")
    if cfg.method == "dpo" and not fb.pairs:
        raise ValueError(f"--feedback {cfg.feedback}: no decisive comparisons (a / b) to learn from")
    real = offline.real_images(cfg, cfg.size or pipe.vae.config.sample_size) if cfg.method == "rwl" else []
    return fb, real, DDPMScheduler.from_config(pipe.scheduler.config)


def finish(pipe, cfg: AlignConfig, out: Path, lineage: list[dict], versions: dict, images: int, seconds: float,
           extra: dict | None = None, evaluation: dict | None = None) -> Path:
    """Fuse the adapters into plain weights, save ACE tokens, write the checkpoint and its manifest."""
    from training.model.checkpoint import Manifest, save_checkpoint

    parent = lineage[0]["version"]
    rows = [r for r in (json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if x.strip())
            if "reward" in r]
    pipe.unet.fuse_lora()
    pipe.unet.unload_lora()
    ace = getattr(pipe, "ace", None)
    if ace is not None:  # save_pretrained must see the plain encode_prompt; the tokens go in their own file
        pipe.encode_prompt = pipe._cxrgen_encode_prompt
    method = cfg.method + ("+rlcf" if cfg.rlcf else "") + ("+ace" if cfg.ace else "")
    manifest = Manifest(version=cfg.version or f"{parent}+{method}", stage=f"align:{method}", parent_version=parent,
                        config={"align": dataclasses.asdict(cfg), "rewards": versions,
                                "reward_weights": cfg.weights if versions else {}, **(extra or {})},
                        metrics={"reward_first_round": rows[0]["reward"], "reward_last_round": rows[-1]["reward"],
                                 "images_sampled": images, "seconds": round(seconds, 1), "rounds": len(rows),
                                 "heldout": evaluation or {}},
                        lineage=lineage)
    folder = save_checkpoint(pipe, out / "checkpoint", manifest)
    if ace is not None:
        ace.save(folder)
    return folder
