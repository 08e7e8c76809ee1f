"""``cxrgen align``: align the generator with the reward models (issue 8)."""

from __future__ import annotations

import argparse
import dataclasses
import json

from .config import LOSERS, METHODS, AlignConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("align", help="align the generator with expert feedback (ddpo, draft, rwl, dpo, spin)",
                       description="Align a checkpoint with expert feedback. On-policy, with the CXR reward models: "
                                   "ddpo (policy gradient over the DDIM trajectory, CXRL; --rlcf: rewards relative "
                                   "to a frozen anchor; --ace: learnable condition tokens) or draft (reward "
                                   "backpropagation through the last --draft-k steps; with --real-data, plus --draft-beta x the "
                                   "denoising loss of real images, an anchor to the data). From stored feedback "
                                   "(--feedback): rwl (reward-weighted likelihood on rated images plus --real-data) "
                                   "or dpo (Diffusion-DPO on expert comparisons). From real films: spin, Diffusion-DPO preferring real films "
                                   "of --real-data (--real-oversample LABEL=K picks a finding's films K times as often) to "
                                   "the model's own images of their reports (--losers self) or to real films whose findings "
                                   "disagree with them (--losers mismatched) or, for simulated films, to the same exam rendered without one of its "
                                   "findings (--losers counterfactual). LoRA adapters on the U-Net. Writes OUT/config.json, "
                                   "OUT/log.jsonl (reward per round, images sampled), OUT/state/ (resumable: run "
                                   "the same command again) and OUT/checkpoint/ (adapters fused; manifest names the "
                                   "parent, method, rewards and weights).")
    defaults = AlignConfig()
    for f in dataclasses.fields(AlignConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "weights":
            p.add_argument(flag, default=None, help="reward weights, name=w,... (default: "
                           + ",".join(f"{k}={v}" for k, v in defaults.weights.items()) + ")")
        elif f.name == "real_oversample":
            p.add_argument(flag, default=None, metavar="LABEL=K,...",
                           help="real films positive for a CheXpert label are K times as likely to be picked")
        elif f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=getattr(defaults, f.name))
        elif f.name == "method":
            p.add_argument(flag, default=defaults.method, choices=METHODS)
        elif f.name == "losers":
            p.add_argument(flag, default=defaults.losers, choices=LOSERS,
                           help="spin's losers: self (the model's own image of the report), mismatched (a real "
                                "film whose findings disagree with the report) or counterfactual (simulated "
                                "--real-data: the same exam rendered without one of its findings)")
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
            if str(f.type).startswith("int | None"):
                kind = int
            p.add_argument(flag, type=kind, default=getattr(defaults, f.name))
    p.set_defaults(func=run)


def parse_weights(text: str | None) -> dict:
    if not text:
        return AlignConfig().weights
    out = {}
    for part in text.split(","):
        name, _, w = part.partition("=")
        try:
            out[name.strip()] = float(w)
        except ValueError:
            raise ValueError(f"--weights: {part!r} is not name=weight") from None
    return out


def run(args: argparse.Namespace) -> int:
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(AlignConfig)
          if f.name not in ("weights", "real_oversample")}
    if args.real_oversample:
        from training.train.command import parse_oversample

        kw["real_oversample"] = parse_oversample(args.real_oversample, "LABEL=K, e.g. 'Support Devices=4'",
                                                   "--real-oversample")
    cfg = AlignConfig(**kw, weights=parse_weights(args.weights)).validate()
    from training.reward.base import REWARD_NAMES

    unknown = sorted(set(cfg.weights) - set(REWARD_NAMES))
    if unknown:
        raise ValueError(f"--weights: unknown reward(s) {unknown}; known: {', '.join(REWARD_NAMES)}")
    from .run import align

    folder = align(cfg)
    print(json.dumps({"checkpoint": str(folder)}))
    return 0


def register_loop(sub: argparse._SubParsersAction) -> None:
    """``cxrgen loop``: a flag per LoopConfig field, its comment as the help text."""
    from training.reward.command import _field_comments

    from .loop_config import TARGETS, LoopConfig

    p = sub.add_parser(
        "loop", help="rounds of generate -> expert feedback -> rewards -> align -> held-out gate",
        description="Run --rounds rounds of the feedback loop from --model (default models/default). Each round: "
                    "the current model generates images of training prompts (--prompts-from / --prompts-file), the "
                    "simulated panel rates and compares them into the store (or, with --feedback, real experts' "
                    "new ratings are imported from a service URL, a store URL or an NDJSON export), plausibility and comparative "
                    "rewards retrain on the store, the model is aligned (--method), and the current model and the "
                    "candidate are evaluated on the same held-out prompts. The candidate is promoted only if "
                    "--target rises by more than --min-gain and no guard falls past its tolerance. Writes "
                    "OUT/round-K/ (prompts.jsonl, generated/, rewards/, align/, steps/, log.txt, report.json, "
                    "report.md), OUT/current.json (the model the next round starts from) and OUT/feedback/ (the "
                    "default store). Resumable: run the same command again (a larger --rounds runs only new rounds).")
    notes = _field_comments(LoopConfig)
    defaults = LoopConfig()
    for f in dataclasses.fields(LoopConfig):
        flag, default = "--" + f.name.replace("_", "-"), getattr(defaults, f.name)
        shown = "" if default in (None, "") else f" (default: {default})"
        help_ = (notes.get(f.name, "") + shown).replace("%", "%%")
        if f.name == "method":
            p.add_argument(flag, default=default, choices=METHODS, help=help_)
        elif f.name == "target":
            p.add_argument(flag, default=default, choices=TARGETS, help=help_)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            p.add_argument(flag, type=kind, default=default, help=help_)
    p.set_defaults(func=run_loop)


def run_loop(args: argparse.Namespace) -> int:
    from .loop import run_loop as loop
    from .loop_config import LoopConfig

    loop(LoopConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(LoopConfig)}))
    return 0


def register_promote(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("promote", help="make an aligned (or trained) checkpoint the model at --to (models/default)",
                       description="Copy CHECKPOINT to --to (default: the embedded default, models/default), "
                                   "replacing what is there only once the copy is complete. The copy's manifest "
                                   "lists its parents back to the first model on record (its lineage); --version "
                                   "renames it and records the version it was promoted from. `cxrgen loop "
                                   "--promote-to` promotes the same way when a round passes its gate.")
    p.add_argument("checkpoint", help="the checkpoint folder to promote (e.g. runs/align/checkpoint)")
    p.add_argument("--to", default=None, help="destination folder (default: models/default)")
    p.add_argument("--version", default=None, help="the version name it is served under (default: its own)")
    p.set_defaults(func=run_promote)


def run_promote(args: argparse.Namespace) -> int:
    from pathlib import Path

    from training.generation import DEFAULT_MODEL

    from .loop import promote

    print(json.dumps(promote(Path(args.checkpoint), Path(args.to) if args.to else DEFAULT_MODEL, args.version)))
    return 0
