"""``cxrgen loop`` configuration (issue 8, section 2): one dataclass, every field commented, saved as
OUT/config.json and checked on resume (STYLE.md habit 1). Torch-free, so the CLI starts fast.

Settings of the stages the loop drives that have no flag here come from two JSON files: --reward-config
(RewardConfig fields of the retrained rewards, e.g. ``{"epochs": 5}``) and --align-config (AlignConfig
fields, e.g. ``{"rlcf": true, "lr": 1e-4, "weights": {"plausibility": 0.5, "comparative": 0.5}}``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from .config import METHODS, ON_POLICY, AlignConfig

# What the held-out evaluation measures (heldout.probe); every one of them is better when higher.
TARGETS = ("panel_plausible_rate", "panel_plausible_ratings", "reward", "judge_auroc_mean", "judge_agreement")
HELDOUT_FILE = Path(__file__).resolve().parent / "prompts" / "heldout.jsonl"
MODELS = Path(__file__).resolve().parents[2] / "models"
SIM_REWARD = Path("runs/sim-reward")  # plausibility's weak positives, where the README's recipe puts them
# Fields the loop sets itself in each round's AlignConfig / RewardConfig: not accepted in the JSON files.
ALIGN_OWN = ("method", "out", "model", "prompts_from", "prompts_file", "split", "limit", "reward_dir", "feedback",
             "feedback_blobs", "real_data", "iterations", "steps", "guidance", "device", "seed", "panel", "judge",
             "version")
REWARD_OWN = ("kind", "out", "store", "blobs", "data", "device")
RESUMABLE = ("rounds", "device", "promote_to")  # may change between invocations on one OUT


@dataclasses.dataclass
class LoopConfig:
    # --- the loop
    out: str = ""  # loop folder: config.json, current.json, feedback/ (the loop's own store), round-K/
    rounds: int = 1  # rounds in total; run again with a larger number and only the new rounds run
    model: str | None = None  # starting checkpoint (default models/default); current.json takes over after it
    promote_to: str | None = None  # also copy each promoted checkpoint here (a temporary sibling, then a rename)
    seed: int = 0  # prompt draws, image seeds, panel label noise and alignment (round K adds K where it must differ)
    device: str = "cpu"  # cpu, cuda, cuda:1: generation, alignment and held-out evaluation
    # --- 1. generation on training prompts
    prompts_from: str | None = None  # a `cxrgen simulate` folder: the prompts and true findings of --split
    prompts_file: str | None = None  # or a prompts file (.txt, or .jsonl with findings)
    split: str = "train"  # split of --prompts-from (the validate split is the default held-out set)
    limit: int = 256  # training prompts read from --prompts-from
    gen_prompts: int = 16  # training prompts drawn each round for the panel to rate (a new draw per round)
    gen_images: int = 2  # images per drawn prompt (the panel compares same-prompt pairs)
    batch_size: int = 8  # images generated at a time
    steps: int = 10  # DDIM steps of generation, alignment and the held-out evaluation
    guidance: float = 4.0  # classifier-free guidance of the same three
    # --- 2. feedback
    store: str | None = None  # store the feedback lands in and the rewards learn from (default OUT/feedback/store.db)
    blobs: str | None = None  # its image folder (default OUT/feedback/images with the default store)
    # real experts instead of the panel: a running service (http://HOST:3000, its /feedback/stream), another store's
    # URL (sqlite:///..., postgresql+psycopg://...) or an NDJSON export (cxrgen feedback export); each round imports
    # what is new there since the previous round and generates nothing itself
    feedback: str | None = None
    feedback_blobs: str | None = None  # with a store URL as --feedback: its image folder (default: its own default)
    panel: str | None = None  # simulated expert panel (default models/panel): rates each round's images; gate eye
    raters: str | None = None  # comma-separated rater ids of the panel (default: all of them)
    max_pairs: int = 6  # same-prompt comparisons per prompt (each rater compares each pair)
    # --- 3. rewards: plausibility and comparative retrain on the store each round; the others are reused
    reward_dir: str | None = None  # the reused rewards (posture, diagnosis, consistency); default models/rewards
    reward_data: str | None = None  # plausibility's weak positives (default runs/sim-reward where it exists; "": none)
    reward_config: str | None = None  # JSON file of RewardConfig fields for the retrained rewards, e.g. {"epochs": 5}
    # --- 4. alignment
    method: str = "ddpo"  # ddpo, draft (on the round's rewards), rwl or dpo (on the loop's store), spin (--real-data)
    iterations: int = 20  # alignment rounds (sampling + update) per loop round
    real_data: str | None = None  # rwl (and draft, as its anchor): real training images (MIMIC layout) for beta * L(real)
    align_config: str | None = None  # JSON file of further AlignConfig fields, e.g. {"rlcf": true, "weights": {...}}
    # --- 5. held-out evaluation of the current model and the candidate (same prompts, same seeds)
    eval_data: str | None = None  # simulated data set of the held-out prompts (default --prompts-from)
    eval_split: str = "validate"  # its split
    eval_limit: int = 32  # held-out prompts from that split
    # and/or a prompts file (default training/align/prompts/heldout.jsonl when there is no held-out data set)
    eval_prompts_file: str | None = None
    judge: str | None = None  # evaluation judge folder (cxrgen evaluate): adds the judge's guards
    # --- 6. the gate: promoted only if the target improves and no guard falls past its tolerance
    target: str = "panel_plausible_rate"  # held-out metric alignment must improve (see TARGETS)
    min_gain: float = 0.0  # the target must rise by more than this (candidate - current > min_gain)
    reward_tolerance: float = 0.02  # guard: the held-out reward may fall at most this much
    judge_auroc_tolerance: float = 0.03  # guard (with --judge): the judge's mean conditioning AUROC
    judge_agreement_tolerance: float = 0.03  # guard (with --judge): the judge's agreement with the prompts' labels

    # ------------------------------------------------------------------ derived settings

    @property
    def model_path(self) -> Path:
        return Path(self.model) if self.model else MODELS / "default"

    @property
    def panel_path(self) -> Path:
        return Path(self.panel) if self.panel else MODELS / "panel"

    @property
    def reward_base(self) -> Path:
        return Path(self.reward_dir) if self.reward_dir else MODELS / "rewards"

    @property
    def store_url(self) -> str:
        return self.store or f"sqlite:///{Path(self.out) / 'feedback' / 'store.db'}"

    @property
    def store_blobs(self) -> str | None:
        return self.blobs or (None if self.store else str(Path(self.out) / "feedback" / "images"))

    @property
    def weak_positives(self) -> str:
        if self.reward_data is not None:
            return self.reward_data
        return str(SIM_REWARD) if SIM_REWARD.is_dir() else ""

    @property
    def feedback_kind(self) -> str | None:
        """None (the panel rates), "service" (http(s) URL), "store" (a database URL) or "file" (NDJSON)."""
        fb = self.feedback
        if not fb:
            return None
        if fb.startswith(("http://", "https://")):
            return "service"
        return "store" if "://" in fb else "file"

    @property
    def needs_prompts(self) -> bool:
        """Training prompts: the panel rates images of them, and on-policy methods sample them."""
        return self.feedback is None or self.method in ON_POLICY

    def heldout_sources(self) -> tuple[str | None, str | None]:
        """(held-out data set, held-out prompts file)."""
        data = self.eval_data or self.prompts_from
        if self.eval_prompts_file or (data and self.eval_limit > 0):
            return (data if self.eval_limit > 0 else None), self.eval_prompts_file
        return None, str(HELDOUT_FILE)

    def guards(self) -> dict[str, float]:
        """Guard metric -> how far it may fall (the target is never its own guard)."""
        g = {"reward": self.reward_tolerance}
        if self.judge:
            g.update(judge_auroc_mean=self.judge_auroc_tolerance, judge_agreement=self.judge_agreement_tolerance)
        g.pop(self.target, None)
        return g

    def reward_overrides(self) -> dict:
        return _read_json(self.reward_config, "--reward-config", REWARD_OWN, _reward_fields())

    def align_overrides(self) -> dict:
        return _read_json(self.align_config, "--align-config", ALIGN_OWN,
                          [f.name for f in dataclasses.fields(AlignConfig)])

    def align_for(self, round_: int, out: str, model: str, reward_dir: str, version: str | None) -> AlignConfig:
        """The AlignConfig of round ``round_`` (its own held-out probes off by default: the loop evaluates)."""
        kw = {"eval_every": 0, "version": version, **self.align_overrides()}
        return AlignConfig(method=self.method, out=out, model=model, prompts_from=self.prompts_from,
                           prompts_file=self.prompts_file, split=self.split, limit=self.limit, reward_dir=reward_dir,
                           feedback=self.store_url if self.method in ("rwl", "dpo") else None,
                           feedback_blobs=self.store_blobs, real_data=self.real_data, iterations=self.iterations,
                           steps=self.steps, guidance=self.guidance, device=self.device, seed=self.seed + round_,
                           panel=self.panel, judge=self.judge, **kw)

    # ------------------------------------------------------------------ checks

    def validate(self) -> "LoopConfig":
        """Every setting and input path checked before any work (a one-line error each)."""
        if not self.out:
            raise ValueError("--out is required")
        if self.method not in METHODS:
            raise ValueError(f"unknown --method {self.method!r}; known: {', '.join(METHODS)}")
        if self.target not in TARGETS:
            raise ValueError(f"unknown --target {self.target!r}; known: {', '.join(TARGETS)}")
        for name, lo in (("rounds", 1), ("gen_prompts", 1), ("gen_images", 1), ("batch_size", 1), ("steps", 1),
                         ("limit", 1), ("iterations", 1), ("max_pairs", 1), ("eval_limit", 0)):
            if getattr(self, name) < lo:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(self, name)}")
        if self.feedback is None and self.gen_images < 2:
            raise ValueError("--gen-images must be >= 2 when the panel rates (it compares same-prompt pairs)")
        for name in ("min_gain", "reward_tolerance", "judge_auroc_tolerance", "judge_agreement_tolerance"):
            if not math.isfinite(getattr(self, name)) or (name != "min_gain" and getattr(self, name) < 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number (tolerances >= 0)")
        if self.prompts_from and self.prompts_file:
            raise ValueError("give one of --prompts-from (a simulated data set) or --prompts-file, not both")
        if self.needs_prompts and not (self.prompts_from or self.prompts_file):
            raise ValueError("give --prompts-from (a simulated data set) or --prompts-file: the training prompts")
        if self.target.startswith("judge") and not self.judge:
            raise ValueError(f"--target {self.target} needs --judge (an evaluation judge folder)")
        self._check_paths()
        self.align_for(1, str(Path(self.out) / "round-1" / "align"), str(self.model_path), "", None).validate()
        from training.reward.config import RewardConfig

        RewardConfig(kind="plausibility", out=str(Path(self.out) / "rewards"), **self.reward_overrides())
        return self

    def _check_paths(self) -> None:
        if not self.model_path.is_dir():
            raise FileNotFoundError(f"no model at {self.model_path}; pass --model PATH (a checkpoint folder)")
        if self.prompts_from and not (Path(self.prompts_from) / "ground_truth.jsonl").is_file():
            raise FileNotFoundError(f"--prompts-from {self.prompts_from}: no ground_truth.jsonl (not a cxrgen "
                                    "simulate folder)")
        if self.eval_data and not (Path(self.eval_data) / "ground_truth.jsonl").is_file():
            raise FileNotFoundError(f"--eval-data {self.eval_data}: no ground_truth.jsonl (not a cxrgen simulate "
                                    "folder)")
        files = ("prompts_file", "eval_prompts_file", "reward_config", "align_config")
        folders = ("panel", "judge", "reward_dir", "real_data")
        for name in files + folders + ("reward_data",):
            value = getattr(self, name)
            if value and not (Path(value).is_file() if name in files else Path(value).is_dir()):
                raise FileNotFoundError(f"--{name.replace('_', '-')} {value} does not exist")
        if not self.panel_path.is_dir() and (self.feedback is None or self.target.startswith("panel")):
            raise FileNotFoundError(f"no expert panel at {self.panel_path}; pass --panel PATH (cxrgen expert train)")
        if self.feedback_kind == "file" and not Path(self.feedback).is_file():
            raise FileNotFoundError(f"--feedback {self.feedback}: neither a service URL (http://HOST:3000), a store "
                                    "URL nor an NDJSON file")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)


def _reward_fields() -> list[str]:
    from training.reward.config import RewardConfig

    return [f.name for f in dataclasses.fields(RewardConfig)]


def _read_json(path: str | None, flag: str, own: tuple, known: list[str]) -> dict:
    """The {field: value} object of a config file; fields the loop sets and unknown ones are errors."""
    if not path:
        return {}
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{flag} {path}: not a JSON object ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{flag} {path}: expected a JSON object of settings, got {type(d).__name__}")
    taken = sorted(set(d) & set(own))
    if taken:
        raise ValueError(f"{flag} {path}: {', '.join(taken)} set by the loop itself (use its flags)")
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ValueError(f"{flag} {path}: unknown field(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return d
