"""Rebuild the local runs behind the README's 256 px tables ("A finer latent grid"), step by step, resumably.

The runs are hours of 2-core CPU and are not in the repository (models/ keeps only the embedded default). Each
step is skipped when its output is complete; an interrupted step resumes where it stopped (every command here
resumes itself), so running this script again after a cut carries on. Steps, in order, with their 2-core times:

  sim256-judge            8,000 simulated exams at 256 px, seed 1, with the lesion kinds' finding masks (15 min)
  judge-256-spot          the evaluation judge read at 256 px, with the spot head (66 min): first, since every
                          measurement needs it
  dec256                  the default's decoder finetuned on 64 px crops of those films (tiny-256-dec1, 23 min)
  u256                    the 256 px U-Net and text encoder, 6,000 steps (tiny-256-v1, 3.4 h)
  u256-f1                 the film-contrast run from it, paused at step 1,000 of its 5,000-step schedule (2 h)
  u256-f1-snap1000        the EMA weights of that pause (tiny-256-f1-step1000)
  eval-spot-u256f1-1000   the ablation's protocol on them: 600 test + 42 held-out prompts, seed 0 (32 min)

Usage: python benchmarks/rebuild_256.py [--list] [--until NAME] [--runs runs]
Logs: RUNS/rebuild-logs/NAME.log. The README's other 256 px runs (f2, f3, the online DPO round) start from
these; their commands are in the README.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "training.cli"]
HELDOUT = "training/align/prompts/heldout.jsonl"


@dataclasses.dataclass
class Step:
    name: str
    minutes: int  # on 2 CPU cores, alone
    commands: Callable[[Path], list[list[str]]]  # argv lists, given the runs folder
    done: Callable[[Path], bool]
    prepare: Callable[[Path], None] | None = None  # before the commands (links to caches already made)


def checkpoint_done(folder: str) -> Callable[[Path], bool]:
    return lambda runs: (runs / folder / "cxrgen_manifest.json").is_file()


def link_cache(src: str, dst: str) -> Callable[[Path], None]:
    """Hard-link a cached file into a new run (same films, same encoder: the run checks the encoder's
    fingerprint and encodes again if it differs), so it is not encoded twice."""
    def prepare(runs: Path) -> None:
        s, d = runs / src, runs / dst
        if s.is_file() and not d.exists():
            d.parent.mkdir(parents=True, exist_ok=True)
            os.link(s, d)
    return prepare


def train(out: str, *flags: str) -> Callable[[Path], list[list[str]]]:
    return lambda runs: [[*CLI, "train", "--data", str(runs / "sim256-judge"), "--out", str(runs / out),
                          *(str(runs / f[5:]) if f.startswith("RUNS/") else f for f in flags), "--no-progress"]]


STEPS = [
    Step("sim256-judge", 15,
         lambda runs: [[*CLI, "simulate", "--out", str(runs / "sim256-judge"), "--n", "8000", "--size", "256",
                        "--seed", "1", "--finding-masks", "calcified_granuloma,nodule,mass"]],
         lambda runs: (runs / "sim256-judge" / "finding_masks.npz").is_file()),
    Step("judge-256-spot", 66,
         lambda runs: [[*CLI, "judge", "train", "--data", str(runs / "sim256-judge"),
                        "--out", str(runs / "judge-256-spot"), "--read-size", "256", "--arch", "resnet18",
                        "--image-size", "256", "--epochs", "8", "--precision", "bf16",
                        "--oversample", "nodule=3,mass=4", "--spot-kinds", "calcified_granuloma,nodule,mass"]],
         lambda runs: (runs / "judge-256-spot" / "judge.json").is_file()
         and not (runs / "judge-256-spot" / "state.pt").exists()),
    Step("dec256", 23,
         train("dec256", "--model", "models/default", "--image-size", "256", "--train", "vae", "--vae-decoder-only",
               "--vae-crop", "64", "--steps", "1500", "--batch-size", "16", "--lr", "2e-4", "--warmup-steps", "50",
               "--lr-schedule", "cosine", "--vae-ssim-weight", "0.5", "--num-workers", "1",
               "--version", "tiny-256-dec1"),
         checkpoint_done("dec256/checkpoint")),
    Step("u256", 204,
         train("u256", "--model", "RUNS/dec256/checkpoint", "--unet-attention", "cross,full,none",
               "--train", "unet,text_encoder", "--cache-latents", "--steps", "6000", "--batch-size", "32",
               "--lr", "3e-4", "--warmup-steps", "100", "--lr-schedule", "cosine", "--checkpoint-every", "250",
               "--num-workers", "1", "--version", "tiny-256-v1"),
         checkpoint_done("u256/checkpoint")),
    Step("u256-f1", 120,
         train("u256-f1", "--model", "RUNS/u256/checkpoint", "--train", "unet,text_encoder", "--cache-latents",
               "--oversample", "Support Devices=4",
               "--contrast", "Support Devices=20,Pleural Effusion=20,Lung Lesion=20", "--contrast-beta", "20000",
               "--contrast-films", "--steps", "5000", "--batch-size", "32", "--lr", "3e-4", "--warmup-steps", "100",
               "--lr-schedule", "cosine", "--checkpoint-every", "250", "--num-workers", "2",
               "--version", "tiny-256-f1", "--until", "1000"),
         lambda runs: step_of(runs / "u256-f1") >= 1000,
         link_cache("u256/latents.pt", "u256-f1/latents.pt")),
    Step("u256-f1-snap1000", 1,
         lambda runs: [[sys.executable, str(REPO / "benchmarks" / "snapshot.py"), str(runs / "u256" / "checkpoint"),
                        str(runs / "u256-f1"), str(runs / "u256-f1-snap1000")]],
         checkpoint_done("u256-f1-snap1000")),
    Step("eval-spot-u256f1-1000", 32,
         lambda runs: [[*CLI, "evaluate", "--out", str(runs / "eval-spot-u256f1-1000"),
                        "--model", str(runs / "u256-f1-snap1000"), "--data", str(runs / "sim256-judge"),
                        "--judge", str(runs / "judge-256-spot"), "--n-prompts", "600", "--prompts-file", HELDOUT,
                        "--augment-real", "0", "--seed", "0"]],
         lambda runs: (runs / "eval-spot-u256f1-1000" / "metrics.json").is_file()),
]


def step_of(run: Path) -> int:
    """Optimiser steps a ``cxrgen train`` run has saved in its state (0 when none)."""
    import json

    progress = run / "state" / "progress.json"
    return json.loads(progress.read_text())["step"] if progress.is_file() else 0


def plan(steps: list[Step], runs: Path, until: str | None = None) -> list[tuple[Step, bool]]:
    """(step, done) for each step up to and including ``until``."""
    names = [s.name for s in steps]
    if until is not None and until not in names:
        raise ValueError(f"--until: unknown step {until!r}; steps: {', '.join(names)}")
    chosen = steps[: names.index(until) + 1] if until else steps
    return [(s, s.done(runs)) for s in chosen]


def rebuild(steps: list[Step], runs: Path, until: str | None = None, out=sys.stdout) -> int:
    """Run the steps not yet done, in order; stops at the first that fails (exit status 1, naming its log)."""
    logs = runs / "rebuild-logs"
    for step, done in plan(steps, runs, until):
        if done:
            print(f"{step.name}: done", file=out, flush=True)
            continue
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{step.name}.log"
        print(f"{step.name}: running (about {step.minutes} min on 2 cores; log {log})", file=out, flush=True)
        if step.prepare:
            step.prepare(runs)
        for cmd in step.commands(runs):
            with log.open("a") as f:
                f.write("$ " + " ".join(cmd) + "\n")
                f.flush()
                rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                print(f"{step.name}: failed (exit {rc}); see {log}; running this again resumes it", file=out)
                return 1
        if not step.done(runs):
            print(f"{step.name}: its commands ended but its output is not complete; see {log}", file=out)
            return 1
        print(f"{step.name}: done", file=out, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default="runs", help="the folder the runs live in (default runs)")
    p.add_argument("--until", metavar="NAME", help="stop after this step")
    p.add_argument("--list", action="store_true", help="print each step, done or to do, and exit")
    a = p.parse_args(argv)
    runs = Path(os.path.relpath(Path(a.runs).resolve(), REPO))  # commands run in the repository: relative paths
    try:
        chosen = plan(STEPS, runs, a.until)
    except ValueError as e:
        p.error(str(e))
    if a.list:
        for step, done in chosen:
            print(f"{step.name:24s} {'done' if done else 'to do':6s} ~{step.minutes} min")
        return 0
    return rebuild(STEPS, runs, a.until)


if __name__ == "__main__":
    sys.exit(main())
