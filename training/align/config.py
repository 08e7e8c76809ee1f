"""``cxrgen align`` configuration: one dataclass, every field commented, saved in the run folder and in the
aligned checkpoint's manifest (STYLE.md habit 1). Torch-free, so the CLI starts fast."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

# on-policy (sample, reward, update), store-driven (rwl, dpo) and DPO on real films (spin)
METHODS = ("ddpo", "draft", "rwl", "dpo", "spin")
ON_POLICY = ("ddpo", "draft")
LOSERS = ("self", "mismatched", "counterfactual")  # spin's losers (AlignConfig.losers)


@dataclasses.dataclass
class AlignConfig:
    # -- what and from where --
    # ddpo (policy gradient over the DDIM trajectory), draft (reward backprop through the last K steps),
    # rwl (reward-weighted likelihood on stored rated images), dpo (Diffusion-DPO on stored comparisons),
    # spin (Diffusion-DPO preferring real films of --real-data to the model's own images of their reports, or with
    # --losers mismatched to real films of other findings)
    method: str = "ddpo"
    out: str = ""  # run folder: config.json, log.jsonl, state/, checkpoint/
    model: str | None = None  # checkpoint to align (default: models/default)
    prompts_from: str | None = None  # a `cxrgen simulate` folder: prompts and true findings of --split
    prompts_file: str | None = None  # or: .txt (a prompt per line) / .jsonl ({"prompt", "findings"}) prompts
    split: str = "train"  # split of --prompts-from (held-out prompts stay held out)
    limit: int = 256  # prompts read from --prompts-from
    reward_dir: str | None = None  # reward model folders (default: models/rewards)
    feedback: str | None = None  # rwl / dpo: feedback store URL or path, or an NDJSON export (cxrgen feedback export)
    feedback_blobs: str | None = None  # the store's image folder (default: the store's own default)
    # rwl (required), draft (optional guard): real training images (MIMIC layout; the train split) for beta * L(real);
    # spin (required): the winners, --limit distinct films of its train split
    real_data: str | None = None
    # {CheXpert label: K}: a real film positive for the label is K times as likely to be picked (--limit films),
    # e.g. {"Support Devices": 4} for what the model draws too seldom
    real_oversample: dict = dataclasses.field(default_factory=dict)
    # spin's losers: "self" (the starting model's own image of the winner's report: SPIN-Diffusion),
    # "mismatched" (another real film whose findings disagree with that report: the pair differs in conditioning only)
    # or "counterfactual" (simulated --real-data: the same exam rendered without one of its findings)
    losers: str = "self"
    rwl_beta: float = 0.3  # rwl: weight of the real-data likelihood (Sun et al.)
    draft_beta: float = 0.3  # draft with --real-data: loss = -reward + draft_beta * L(real), the anchor to the data
    dpo_beta: float = 2000.0  # dpo / spin: KL strength (Wallace et al. use 2000-5000 for SD)
    # dpo / spin: DPO-Positive's lambda (Pal et al. 2024): the preferred image's denoising error may not rise above
    # the reference's without this much extra loss; 0 = plain Diffusion-DPO
    dpo_positive: float = 0.0
    # CXRL's reward: a weighted sum of the CXR rewards (normalised to sum 1)
    weights: dict = dataclasses.field(default_factory=lambda: {"plausibility": 0.4, "posture": 0.2,
                                                               "diagnosis": 0.2, "consistency": 0.2})
    rlcf: bool = False  # CXRL's comparative feedback: reward relative to a frozen anchor's image (same noise)
    ace: bool = False  # CXRL's adaptive condition embeddings: learnable tokens appended to the text embedding
    ace_tokens: int = 4  # how many
    # -- optimisation --
    iterations: int = 20  # sampling + update rounds
    prompts_per_iter: int = 4  # distinct prompts per round
    images_per_prompt: int = 2  # images per prompt per round (per-prompt advantages need several)
    lr: float = 3e-4  # AdamW learning rate of the LoRA adapters (and ACE tokens)
    lora_rank: int = 4  # LoRA on the U-Net's attention; full fine-tuning collapses (ddpo-pytorch users' report)
    max_grad_norm: float = 1.0  # gradient clipping
    save_every: int = 5  # rounds between resumable states
    seed: int = 0  # prompts, noise, adapter initialisation
    device: str = "cpu"  # cpu, cuda, cuda:1 (under `accelerate launch`, each process's own device)
    mixed_precision: str = "no"  # "no", "bf16" (CPU or GPU) or "fp16" (GPU): accelerate's autocast + loss scaling
    version: str | None = None  # the aligned checkpoint's version (default: <parent>+<method>)
    # -- held-out verdicts (heldout.py): the run's reward, the panel and the judge on prompts it never trains on --
    eval_every: int = 5  # rounds between held-out probes (also one before the first round and one at the end); 0: none
    eval_data: str | None = None  # simulated data set of the held-out prompts (default: --prompts-from)
    eval_split: str = "validate"  # its split (the test split stays for `cxrgen evaluate`)
    eval_limit: int = 32  # held-out prompts from that split
    eval_prompts_file: str | None = None  # and/or a prompts file (.jsonl with findings, or .txt)
    panel: str | None = None  # simulated expert panel (default: models/panel); a guard, never a reward
    judge: str | None = None  # evaluation judge folder (judge.json); a guard, never a reward
    patience: int = 0  # stop after this many probes without a better held-out reward (0: run every round)
    panel_tolerance: float = 0.05  # stop when the panel's plausible rate falls this far below the first probe's
    judge_tolerance: float = 0.03  # stop when the judge's conditioning AUROC falls this far below the first probe's
    keep_best: bool = True  # the checkpoint keeps the probe with the best held-out reward, not the last round
    # -- sampling --
    steps: int = 10  # DDIM steps of each trajectory
    guidance: float = 4.0  # classifier-free guidance
    size: int | None = None  # image side (default: the model's)
    # -- ddpo (Black et al. 2023; ddpo-pytorch's defaults) --
    eta: float = 1.0  # DDIM stochasticity: the policy's noise
    clip_range: float = 1e-4  # PPO ratio clip (log-probabilities are averaged over latent dimensions)
    adv_clip: float = 5.0  # advantages clipped to +-this
    buffer: int = 16  # per-prompt reward buffer
    min_count: int = 16  # rewards a prompt needs before its own statistics are used
    inner_epochs: int = 1  # PPO passes over each round's trajectories
    timestep_fraction: float = 1.0  # share of a trajectory's steps trained per pass
    # -- draft (Clark et al. 2023) --
    draft_k: int = 1  # steps at the end of sampling that gradients pass through

    def validate(self) -> "AlignConfig":
        if self.method not in METHODS:
            raise ValueError(f"unknown --method {self.method!r}; known: {', '.join(METHODS)}")
        if not self.out:
            raise ValueError("--out is required")
        if self.method in ON_POLICY and (self.prompts_from is None) == (self.prompts_file is None):
            raise ValueError("give exactly one of --prompts-from (a simulated data set) or --prompts-file")
        if self.method in ("rwl", "dpo") and not self.feedback:
            raise ValueError(f"--method {self.method} learns from stored feedback: give --feedback (a store URL or "
                             "an NDJSON export)")
        if self.method == "rwl" and not self.real_data:
            raise ValueError("--method rwl needs --real-data (real training images for beta * L(real))")
        if self.method == "spin" and not self.real_data:
            raise ValueError("--method spin needs --real-data (the real films preferred to the model's own images)")
        if self.losers not in LOSERS:
            raise ValueError(f"--losers must be one of {', '.join(LOSERS)}, got {self.losers!r}")
        if self.method == "spin" and self.losers == "counterfactual":
            sim = Path(self.real_data)
            if not (sim / "ground_truth.jsonl").is_file() or not (sim / "simulate_config.json").is_file():
                raise ValueError(f"--losers counterfactual renders the exams of --real-data again: {self.real_data} "
                                 "has no ground_truth.jsonl / simulate_config.json (it needs a cxrgen simulate folder)")
        from training.findings import check_oversample

        check_oversample(self.real_oversample, "--real-oversample")
        if self.rlcf and self.method != "ddpo":
            raise ValueError("--rlcf applies to --method ddpo")
        for name, lo in (("iterations", 1), ("prompts_per_iter", 1), ("images_per_prompt", 1), ("steps", 1),
                         ("lora_rank", 1), ("save_every", 1), ("limit", 1), ("ace_tokens", 1)):
            if getattr(self, name) < lo:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(self, name)}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"--mixed-precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.eval_every < 0 or self.patience < 0 or self.eval_limit < 0:
            raise ValueError("--eval-every, --patience and --eval-limit must be >= 0")
        if self.method == "ddpo" and self.eta <= 0:
            raise ValueError("--eta must be > 0 for ddpo (a deterministic step has no log-probability)")
        if self.draft_beta < 0:
            raise ValueError(f"--draft-beta must be >= 0, got {self.draft_beta}")
        if self.dpo_positive < 0:
            raise ValueError(f"--dpo-positive must be >= 0, got {self.dpo_positive}")
        if self.method == "draft" and not 1 <= self.draft_k <= self.steps:
            raise ValueError(f"--draft-k must be in [1, --steps={self.steps}], got {self.draft_k}")
        if not self.weights or any(w < 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
            raise ValueError("--weights: non-negative weights with a positive sum, e.g. plausibility=0.4,posture=0.2")
        return self

    @property
    def probes(self) -> bool:
        """Whether held-out probes run: a cadence and a held-out set to probe."""
        data = self.eval_data or self.prompts_from
        return self.eval_every > 0 and bool((data and self.eval_limit) or self.eval_prompts_file)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)
