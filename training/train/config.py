"""``cxrgen train`` configuration: one dataclass, every field commented, saved in the run
folder and in the checkpoint manifest (STYLE.md habit 1)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

COMPONENTS = ("vae", "unet", "text_encoder")
LR_SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass
class FinetuneConfig:
    # -- what and from where --
    data: str = ""  # MIMIC-CXR-JPG layout folder (real or `cxrgen simulate` output)
    out: str = ""  # run folder: config.json, log.jsonl, samples/, state/, checkpoint/
    model: str | None = None  # pipeline folder to start from (cxrgen checkpoint or SD / RoentGen)
    init: str | None = None  # "tiny": build a fresh tiny model instead of --model
    model_config: dict = dataclasses.field(default_factory=dict)  # TinyModelConfig overrides for --init tiny
    # per U-Net level, outermost first: "none" / "full" / "cross" attention (components.ATTENTION_KINDS); with
    # --model the loaded U-Net is relaid out (components.relayout_unet), with --init tiny it sets the layout
    unet_attention: tuple[str, ...] = ()
    # with --model: train (and afterwards generate) at this image side instead of the model's own: the VAE and the
    # U-Net are convolutional, so a 128 px model continues at 256 px on a latent grid twice as fine (SD 2's 512 ->
    # 768 step); 0 = the model's own. With --init tiny the side is --model-config image_size
    image_size: int = 0
    train: tuple[str, ...] = ("unet", "text_encoder")  # components to train (Chambon et al. compared these)
    views: tuple[str, ...] = ("PA", "AP")  # views to train on
    split: str = "train"  # data split to train on
    # -- optimisation --
    steps: int = 1000  # optimiser steps
    batch_size: int = 16  # images per device per micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 1e-4  # AdamW learning rate (after warm-up)
    warmup_steps: int = 100  # linear warm-up
    lr_schedule: str = "constant"  # after warm-up: "constant", or "cosine" decay to 0 at --steps
    weight_decay: float = 1e-2  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping
    mixed_precision: str = "no"  # "no", "fp16", "bf16" (accelerate)
    seed: int = 0  # data order, noise and initialisation
    # -- diffusion specifics --
    text_dropout: float = 0.1  # prompts replaced by "" so classifier-free guidance works
    snr_gamma: float | None = 5.0  # min-SNR loss weighting (Hang et al. 2023); None = plain MSE
    # the noise schedule shifted to SNR(t) / S at every timestep (S > 1 noisier, S < 1 less noisy; Hoogeboom et al.
    # 2023; Chen 2023): a finer latent grid keeps a large structure visible through more noise, so the U-Net
    # learns less about drawing it from scratch. Written into the checkpoint's scheduler (trained_betas), so
    # sampling, evaluation and alignment use the shifted schedule; composes with a parent's own shift
    noise_shift: float = 1.0
    noise_shift_ramp: bool = False  # the shift grows with t, from none at t = 0 to S at the last timestep
    ema: bool = True  # keep an exponential moving average of trained weights (saved instead of raw)
    ema_decay: float = 0.999  # EMA decay
    gradient_checkpointing: bool = False  # trade compute for memory (large models)
    lora_rank: int = 0  # > 0: train LoRA adapters (peft) on the U-Net's attention instead of all weights
    cache_latents: bool = False  # frozen VAE: encode every image once, train on cached latent distributions
    # CheXpert label -> integer factor: an image positive for it appears that many times per epoch (the largest
    # factor of its labels), so a rare or small finding weighs more, e.g. {"Support Devices": 4}
    oversample: dict = dataclasses.field(default_factory=dict)
    # CheXpert label -> weight of the prompt contrast (train/contrast.py): the report must denoise its film better
    # than the same report without the label's sentences, and a negative's report better than with one added,
    # e.g. {"Support Devices": 20.0} (a small margin pulled W / 2 times as hard as one image's error); empty = off
    contrast: dict = dataclasses.field(default_factory=dict)
    # the contrast's logistic scale on the (min-SNR weighted) per-image MSE margin: past a few / beta it lets go
    contrast_beta: float = 20000.0
    # simulated data: a positive film's margin is taken between its exam rendered with and without the label's
    # findings (difference in differences, train/contrast.py): only a model that reads the film can win it
    contrast_films: bool = False
    # simulator kind -> weight W: the denoising error of each latent cell on the kind's footprint (the simulator's
    # finding masks, DATA/finding_masks.npz) counts 1 + W times, e.g. {"mass": 20.0}: the U-Net pays for a
    # lesion's own pixels, not only for the 1-2 % of the film it is; empty = off
    focus: dict = dataclasses.field(default_factory=dict)
    # simulator kind -> weight W of token grounding (TokenCompose; train/ground.py): the U-Net's cross-attention
    # of the words naming the kind ("mass", "nodule", "granuloma") is pulled onto the kind's finding mask,
    # e.g. {"mass": 1.0}; empty = off
    ground: dict = dataclasses.field(default_factory=dict)
    # -- VAE stage --
    vae_crop: int = 0  # > 0: train the VAE on random square crops of this side (cheaper; convolutions are local)
    vae_kl_weight: float = 1e-6  # KL term of the VAE loss (SD used ~1e-6)
    vae_ssim_weight: float = 0.2  # (1 - SSIM) term: structure matters more than pixel MSE on CXRs
    vae_decoder_only: bool = False  # train the VAE decoder only: the latents, and a U-Net trained on them, stay valid
    # -- bookkeeping --
    checkpoint_every: int = 500  # save resumable state every N steps (0 = only at the end)
    sample_every: int = 500  # write a sample grid every N steps (0 = only at the end)
    sample_prompts: tuple[str, ...] = (
        "No acute cardiopulmonary abnormality.",
        "Moderate left pleural effusion.",
        "Large right pneumothorax.",
        "Cardiomegaly.",
    )  # prompts of the logged sample grids
    num_workers: int = 2  # data loader processes; also the processes that render --contrast-films
    version: str = ""  # version name of the resulting checkpoint (default: run folder name)

    def _check_masked(self, flag: str, kinds: dict, what: str) -> None:
        """--focus / --ground: known kinds, positive weights, unet trained, cached latents, and the data's
        finding masks of those kinds."""
        from ..findings import KINDS
        from ..simulator.masks import MASKS_FILE, load_masks

        for kind, w in kinds.items():
            if kind not in KINDS:
                raise ValueError(f"{flag}: unknown simulator kind {kind!r}; known: {sorted(KINDS)}")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w < float("inf"):
                raise ValueError(f"{flag} {kind}: the weight must be a number > 0, got {w!r}")
        if "unet" not in self.train:
            raise ValueError(f"{flag} {what}: include unet in --train")
        if not self.cache_latents:
            raise ValueError(f"{flag} attaches each film's finding mask to its cached latent: add --cache-latents")
        if not (Path(self.data) / MASKS_FILE).is_file():
            raise ValueError(f"{flag} reads the simulator's finding masks: {self.data} has no {MASKS_FILE} (make "
                             f"them with `cxrgen simulate --out {self.data} ... --finding-masks "
                             f"{','.join(kinds)}`)")
        load_masks(self.data, tuple(kinds))  # a ValueError naming kinds the file lacks

    def validate(self) -> None:
        if not self.data:
            raise ValueError("--data is required")
        if not self.out:
            raise ValueError("--out is required")
        if (self.model is None) == (self.init is None):
            raise ValueError("give exactly one of --model PATH or --init tiny")
        if self.init not in (None, "tiny"):
            raise ValueError(f"unknown --init {self.init!r}; known: ['tiny']")
        bad = [c for c in self.train if c not in COMPONENTS]
        if bad or not self.train:
            raise ValueError(f"--train takes a comma list of {list(COMPONENTS)}, got {list(self.train)}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"--mixed-precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"--lr-schedule must be one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.text_dropout < 1.0:
            raise ValueError(f"--text-dropout must be in [0, 1), got {self.text_dropout}")
        if self.cache_latents and "vae" in self.train:
            raise ValueError("--cache-latents needs a frozen VAE: drop vae from --train")
        if self.vae_crop and (self.vae_crop % 8 or self.vae_crop < 16):
            raise ValueError(f"--vae-crop must be a multiple of 8 and >= 16, got {self.vae_crop}")
        if self.vae_decoder_only and "vae" not in self.train:
            raise ValueError("--vae-decoder-only finetunes the VAE's decoder: include vae in --train")
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise ValueError(f"--snr-gamma must be > 0 or off, got {self.snr_gamma}")
        if not (self.noise_shift > 0 and math.isfinite(self.noise_shift)):
            raise ValueError(f"--noise-shift must be a positive number (1 = the schedule as it is), got "
                             f"{self.noise_shift}")
        if self.noise_shift_ramp and self.noise_shift == 1:
            raise ValueError("--noise-shift-ramp shapes --noise-shift: give --noise-shift S with S other than 1")
        if self.lora_rank and "unet" not in self.train:
            raise ValueError("--lora-rank adapts the U-Net: include unet in --train")
        from ..findings import KINDS, check_oversample

        check_oversample(self.oversample, kinds=True)
        if any(k in KINDS for k in self.oversample):
            from ..data.mimic import GROUND_TRUTH

            if not (Path(self.data) / GROUND_TRUTH).is_file():
                raise ValueError(f"--oversample {[k for k in self.oversample if k in KINDS][0]}: a simulator kind "
                                 f"is read from {GROUND_TRUTH}, which {self.data} does not have (simulated data "
                                 f"only; name a CheXpert label instead)")
        if self.contrast:
            from .contrast import check_contrast

            check_contrast(self.contrast, self.contrast_beta)
            if not set(self.train) & {"unet", "text_encoder"}:
                raise ValueError("--contrast is a term of the denoising loss: include unet or text_encoder in --train")
        if self.focus:
            self._check_masked("--focus", self.focus, "weighs the U-Net's denoising loss")
        if self.ground:
            from .ground import KIND_WORDS

            unnamed = [k for k in self.ground if k not in KIND_WORDS]
            if unnamed:
                raise ValueError(f"--ground: no report words are known for {unnamed}; grounded kinds: "
                                 f"{sorted(KIND_WORDS)}")
            self._check_masked("--ground", self.ground, "trains the U-Net's cross-attention")
        if self.contrast_films:
            if not self.contrast:
                raise ValueError("--contrast-films changes how --contrast pairs films: give --contrast LABEL=W")
            if not self.cache_latents:
                raise ValueError("--contrast-films encodes the counterfactual films once: add --cache-latents")
            from ..data.mimic import GROUND_TRUTH

            if not (Path(self.data) / GROUND_TRUTH).is_file():
                raise ValueError(f"--contrast-films renders the training exams again: {self.data} has no "
                                 f"{GROUND_TRUTH} (simulated data only)")
        if self.image_size:
            if self.init:
                raise ValueError("--image-size resizes a loaded --model; for --init tiny give --model-config "
                                 "'{\"image_size\": N}'")
            if self.image_size < 32 or self.image_size % 8:
                raise ValueError(f"--image-size must be a multiple of 8 and >= 32, got {self.image_size}")
        if self.unet_attention:
            from ..model.components import attention_kind

            for a in self.unet_attention:
                attention_kind(a)
        if self.init == "tiny":
            from ..model.components import TinyModelConfig

            TinyModelConfig.from_dict(self.model_config)  # a bad field or shape is named now, not after data loads

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_file(cls, path: str | Path) -> "FinetuneConfig":
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read config {path}: {e}") from e
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"{path}: unknown field(s) {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
