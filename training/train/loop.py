"""Finetuning the generator (RoentGen; Chambon et al. 2022): VAE, U-Net and text encoder.

Chambon et al. finetuned SD's three sub-components separately and compared them;
RoentGen found U-Net + text encoder together best. ``--train`` takes any combination:
  * vae: reconstruction loss (MSE + (1 - SSIM) + a small KL term) on the images;
  * unet / text_encoder: the denoising loss on VAE latents, prompts dropped to "" with
    probability ``text_dropout`` so classifier-free guidance works at sampling time.

Runs under Hugging Face accelerate (mixed precision, gradient accumulation, multi-GPU /
multi-node via ``accelerate launch``). Resumable exactly: model, optimiser, LR schedule,
EMA and RNG states plus the data position are saved together in ``out/state``.

Procedure of ``train``:
  1. Check inputs, write config.json.   2. Build or load the model.
  3. Data.   4. Trainable parameters (full, or LoRA), optimiser, EMA.
  5. Resume if state exists.   6. Training loop (log, sample, checkpoint).
  7. Save the final checkpoint (EMA weights) with its manifest.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..artifacts import trim_log
from ..findings import oversample_indices
from ..model.checkpoint import Manifest, data_fingerprint, lineage_from, load_pipeline, save_checkpoint
from ..model.components import TinyModelConfig, build_pipeline, relayout_unet, to_model_channels, train_tokenizer
from .config import FinetuneConfig


# --------------------------------------------------------------------------- model


def build_model(cfg: FinetuneConfig, prompts: list[str]):
    """Fresh tiny pipeline (tokenizer trained on the data's prompts + IU reports) or a loaded one, its noise
    schedule shifted by ``cfg.noise_shift``."""
    pipe = _build_model(cfg, prompts)
    if cfg.noise_shift != 1:
        from ..model.components import shift_noise_schedule

        pipe.scheduler = shift_noise_schedule(pipe.scheduler, cfg.noise_shift, cfg.noise_shift_ramp)
    return pipe


def _build_model(cfg: FinetuneConfig, prompts: list[str]):
    if cfg.model:
        pipe, _ = load_pipeline(cfg.model)
        if cfg.unet_attention:
            pipe.unet = relayout_unet(pipe.unet, cfg.unet_attention)
        if cfg.image_size:
            resize_model(pipe, cfg.image_size)
        return pipe
    from ..data.reports import load_reports

    mcfg = TinyModelConfig.from_dict(cfg.model_config)
    texts = prompts + [r.prompt for r in load_reports() if r.prompt]
    tok = train_tokenizer(texts, mcfg.vocab_size, mcfg.max_length)
    torch.manual_seed(cfg.seed)
    return build_pipeline(mcfg, tok)


def resize_model(pipe, size: int) -> None:
    """Set the side ``pipe`` generates and trains at (its VAE's ``sample_size``, the U-Net's latent side): the
    weights are convolutional and stay as they are. A ValueError when ``size`` is not a multiple of the VAE's
    downsampling."""
    factor = pipe.vae_scale_factor  # diffusers' pipeline: 2 ** (VAE blocks - 1)
    if size % factor:
        raise ValueError(f"--image-size must be a multiple of the VAE's downsampling ({factor}), got {size}")
    pipe.vae.register_to_config(sample_size=size)
    pipe.unet.register_to_config(sample_size=size // factor)


def trainable(pipe, cfg: FinetuneConfig) -> dict[str, torch.nn.Module]:
    """Set requires_grad per --train (LoRA adapters on the U-Net when lora_rank > 0)."""
    mods = {"vae": pipe.vae, "unet": pipe.unet, "text_encoder": pipe.text_encoder}
    for name, m in mods.items():
        m.requires_grad_(name in cfg.train)
    if cfg.vae_decoder_only:  # SD's ft-MSE recipe: a sharper decoder for the same latents
        pipe.vae.requires_grad_(False)
        for part in (pipe.vae.decoder, pipe.vae.post_quant_conv):
            if part is not None:
                part.requires_grad_(True)
    if cfg.lora_rank:
        from peft import LoraConfig

        pipe.unet.requires_grad_(False)
        pipe.unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, init_lora_weights="gaussian",
                                         target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    if cfg.gradient_checkpointing:
        for name in cfg.train:
            if hasattr(mods[name], "enable_gradient_checkpointing"):
                mods[name].enable_gradient_checkpointing()
            elif hasattr(mods[name], "gradient_checkpointing_enable"):
                mods[name].gradient_checkpointing_enable()
    return {n: mods[n] for n in cfg.train}


# --------------------------------------------------------------------------- data


def make_dataset(cfg: FinetuneConfig, size: int):
    """The training films; with the simulator's ground truth when --oversample names a simulator kind."""
    from ..data.mimic import MimicCXRDataset
    from ..findings import KINDS

    return MimicCXRDataset(root=cfg.data, views=cfg.views, split=cfg.split, size=size, normalize="unit",
                           return_ground_truth=any(k in KINDS for k in cfg.oversample))


def collate(items: list[dict]) -> dict:
    key = "latent_dist" if "latent_dist" in items[0] else "image"
    out = {key: torch.stack([it[key] for it in items]), "prompt": [it["prompt"] for it in items]}
    if "labels" in items[0]:  # CheXpert labels (NaN: not mentioned): the prompt contrast picks its pairs by them
        out["labels"] = torch.stack([it["labels"] for it in items])
    if "focus" in items[0]:  # --focus: each latent cell's loss weight
        out["focus"] = torch.stack([it["focus"] for it in items])
    if "ground" in items[0]:  # --ground: each grounded kind's cells
        out["ground"] = torch.stack([it["ground"] for it in items])
    if "has_film" in items[0]:  # --contrast-films: the counterfactual films' posteriors
        out["film_dist"] = torch.stack([it["film_dist"] for it in items])
        out["has_film"] = torch.tensor([it["has_film"] for it in items])
    return out


class LatentSet(torch.utils.data.Dataset):
    """Cached VAE posteriors (mean and log-variance) with prompts and labels: a frozen VAE encodes each
    image once instead of every epoch, and no JPEG is decoded while the U-Net trains. ``add_films`` attaches
    the counterfactual films of ``--contrast-films`` (a film without one gets zeros and ``has_film`` False)."""

    def __init__(self, dists: torch.Tensor, prompts: list[str], labels: torch.Tensor):
        self.dists, self.prompts, self.labels = dists, prompts, labels
        self.film_row: torch.Tensor | None = None  # (N,) row of film_dists, -1 for none
        self.film_dists: torch.Tensor | None = None  # (M, 2, 2C, h, w): posteriors with, without
        self.focus: torch.Tensor | None = None  # (N, h, w) loss weight of each latent cell (--focus)
        self.ground: torch.Tensor | None = None  # (N, K, h, w) cells of each grounded kind's mask (--ground)

    def add_films(self, rows: list[int], film_dists: torch.Tensor) -> None:
        self.film_row = torch.full((len(self.dists),), -1, dtype=torch.long)
        self.film_row[torch.tensor(rows, dtype=torch.long)] = torch.arange(len(rows))
        self.film_dists = film_dists

    def __len__(self) -> int:
        return len(self.dists)

    def add_focus(self, weights: torch.Tensor) -> None:
        self.focus = weights

    def add_ground(self, masks: torch.Tensor) -> None:
        self.ground = masks

    def __getitem__(self, i: int) -> dict:
        item = {"latent_dist": self.dists[i], "prompt": self.prompts[i], "labels": self.labels[i]}
        if self.focus is not None:
            item["focus"] = self.focus[i]
        if self.ground is not None:
            item["ground"] = self.ground[i]
        if self.film_row is not None:
            r = int(self.film_row[i])
            item["has_film"] = r >= 0
            item["film_dist"] = self.film_dists[r] if r >= 0 else torch.zeros_like(self.film_dists[0])
        return item


def encoder_fingerprint(vae) -> str:
    """A digest of the weights that make a posterior (the encoder and quant_conv): cached latents are reused
    only for the same encoder; a decoder-only finetune keeps it."""
    import hashlib

    h = hashlib.sha256()
    for part in (vae.encoder, getattr(vae, "quant_conv", None)):
        if part is None:
            continue
        for name, t in sorted(part.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def cache_latents(vae, ds, cfg: FinetuneConfig, progress: bool, out: Path) -> LatentSet:
    """Encode ``ds`` once; the posteriors are kept in OUT/latents.pt (keyed by the films, their side, the data
    folder and the encoder's weights): a resumed run reads them back instead of encoding again (minutes at 256 px)."""
    from tqdm import tqdm

    from ..artifacts import cached_tensors

    def encode():
        dl = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=False, num_workers=cfg.num_workers,
                                         collate_fn=collate)
        dists, prompts, labels = [], [], []
        for batch in tqdm(dl, desc="encode latents", unit="batch", disable=not progress):
            x = to_model_channels(batch["image"].to(vae.device), vae.config.in_channels)
            dists.append(vae.encode(x).latent_dist.parameters.cpu())  # (N, 2C, h, w): mean, logvar
            prompts += batch["prompt"]
            labels.append(batch["labels"])
        return {"dists": torch.cat(dists), "prompts": prompts, "labels": torch.cat(labels)}

    key = {"films": [str(d) for d in ds.frame["dicom_id"]], "size": int(ds.config.size), "data": str(cfg.data),
           "encoder": encoder_fingerprint(vae)}
    value = cached_tensors(out / "latents.pt", key, encode)
    return LatentSet(value["dists"], value["prompts"], value["labels"])


@torch.no_grad()
def cache_films(vae, ds, latents: LatentSet, specs, cfg: FinetuneConfig, out: Path, progress: bool) -> None:
    """--contrast-films: render the positive films' exams with and without the labels' findings (kept in
    OUT/contrast_films.pt), encode both (kept in OUT/contrast_films_latents.pt: a resumed run neither renders nor
    encodes again), attach them to ``latents``."""
    from ..artifacts import cached_tensors
    from .contrast import render_films

    size = vae.config.sample_size
    ids = [str(d) for d in ds.frame["dicom_id"]]
    key = {"films": ids, "size": size, "labels": {s.label: list(s.kinds) for s in specs}}

    def encode():
        rows, plus, minus = cached_tensors(out / "contrast_films.pt", key, lambda: render_films(
            cfg.data, ids, ds.labels, specs, size, progress, cfg.num_workers))
        dists = []
        for i in range(0, len(rows), 32):
            x = torch.cat([plus[i:i + 32], minus[i:i + 32]]).to(vae.device)
            d = vae.encode(to_model_channels(x, vae.config.in_channels)).latent_dist.parameters.cpu()
            dists.append(torch.stack(d.chunk(2), dim=1))  # (n, 2, 2C, h, w)
        return {"rows": list(rows), "dists": torch.cat(dists)}

    # The encodings are kept too (minutes at 256 px), keyed by the renders' key and the encoder's weights: a
    # resumed run reads them back without loading the renders.
    films = cached_tensors(out / "contrast_films_latents.pt", {**key, "encoder": encoder_fingerprint(vae)}, encode)
    latents.add_films(films["rows"], films["dists"])


def focus_weights(data, dicom_ids: list[str], weights: dict, grid: tuple[int, int]) -> torch.Tensor:
    """--focus: (N, h, w) loss weights on the latent grid, 1 + W on the cells a kind's finding mask touches
    (max-pooled from the mask's grid; the largest W where kinds overlap), 1 elsewhere and on films without one."""
    from ..simulator.masks import grid_masks

    on = grid_masks(data, dicom_ids, tuple(weights), grid)
    out = torch.ones(len(dicom_ids), *grid)
    for k, w in enumerate(weights.values()):
        out = torch.where(on[:, k], torch.clamp(out, min=1.0 + float(w)), out)
    return out


def loader_for_epoch(ds, cfg: FinetuneConfig, epoch: int):
    """Shuffled with a generator seeded by (seed, epoch): the order is reproducible on resume."""
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    return torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, generator=g, drop_last=True,
                                       num_workers=cfg.num_workers, collate_fn=collate)


# --------------------------------------------------------------------------- losses


def config_of(module):
    """A module's diffusers/transformers config, through a DistributedDataParallel wrapper."""
    return getattr(module, "module", module).config


def drop_prompts(prompts: list[str], dropout: float) -> list[str]:
    """Each prompt replaced by "" with probability ``dropout`` (classifier-free guidance's unconditional case)."""
    return ["" if random.random() < dropout else p for p in prompts]


def encode_text(parts, prompts: list[str]) -> torch.Tensor:
    tok = parts.tokenizer
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    return parts.text_encoder(ids.to(images_device(parts)))[0]


def images_device(parts) -> torch.device:
    return next(parts.unet.parameters()).device


@dataclasses.dataclass
class Denoised:
    """One denoising pass over a batch, kept for a second look (the prompt contrast)."""

    noisy: torch.Tensor  # the noisy latents
    t: torch.Tensor  # their timesteps
    prompts: list[str]  # what the U-Net read (after dropout)
    target: torch.Tensor  # epsilon or v
    per: torch.Tensor  # per-image squared error (before min-SNR weighting)


@dataclasses.dataclass
class GroundTerm:
    """--ground for one denoising pass: the batch's kind masks, the kinds' weights, and what the pass gave."""

    grounding: "object"  # train.ground.Grounding, read by the U-Net's cross-attention processors
    kinds: tuple[str, ...]
    weights: torch.Tensor  # (K,)
    masks: torch.Tensor  # (B, K, h, w)
    loss: torch.Tensor | None = None
    share: float | None = None  # mean share of the words' attention on their finding
    positions: torch.Tensor | None = None

    def before(self, tokenizer, prompts: list[str]) -> None:
        from .ground import word_positions

        self.positions = word_positions(tokenizer, prompts, self.kinds).to(self.masks.device)
        self.grounding.start(self.positions)

    def after(self) -> None:
        from .ground import grounding_loss

        self.loss, self.share = grounding_loss(self.grounding.stop(), self.masks, self.weights, self.positions)


def diffusion_loss(parts, noise_sched, images: torch.Tensor, prompts: list[str], cfg: FinetuneConfig,
                   latent_dist: torch.Tensor | None = None, keep: list | None = None,
                   focus: torch.Tensor | None = None, ground: "GroundTerm | None" = None) -> torch.Tensor:
    """Denoising loss on latents (epsilon or v target), min-SNR weighted (Hang et al. 2023).

    ``parts`` holds the (possibly accelerate-wrapped) vae, unet, text_encoder and tokenizer;
    ``latent_dist`` (cached posterior parameters) replaces encoding ``images``; a ``keep`` list receives the
    pass's ``Denoised`` (its per-image errors unweighted: the prompt contrast compares readings of one film);
    ``focus`` (B, h, w) weighs each latent cell's squared error (--focus); a ``ground`` term reads the
    pass's cross-attention maps of the grounded words and keeps its loss and share in ``ground`` (--ground).
    """
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    vae, vcfg = parts.vae, config_of(parts.vae)
    if latent_dist is not None:
        latents = DiagonalGaussianDistribution(latent_dist).sample() * vcfg.scaling_factor
    else:
        x = to_model_channels(images, vcfg.in_channels)
        with torch.set_grad_enabled("vae" in cfg.train):
            latents = getattr(vae, "module", vae).encode(x).latent_dist.sample() * vcfg.scaling_factor
    if "vae" in cfg.train:
        latents = latents.detach()  # the VAE learns from its own loss, not the U-Net's
    noise = torch.randn_like(latents)
    t = torch.randint(0, noise_sched.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
    noisy = noise_sched.add_noise(latents, noise, t)
    read = drop_prompts(prompts, cfg.text_dropout)
    if ground is not None:
        ground.before(parts.tokenizer, read)
    pred = parts.unet(noisy, t, encode_text(parts, read)).sample
    if ground is not None:
        ground.after()
    target = noise if noise_sched.config.prediction_type == "epsilon" else noise_sched.get_velocity(latents, noise, t)
    sq = F.mse_loss(pred.float(), target.float(), reduction="none")
    per = sq.mean(dim=(1, 2, 3))
    if keep is not None:
        keep.append(Denoised(noisy, t, read, target, per))
    if focus is not None:  # an error on a finding's cells counts 1 + W times
        per = (sq * focus.to(sq.device, sq.dtype)[:, None]).mean(dim=(1, 2, 3))
    if cfg.snr_gamma is None:
        return per.mean()
    return (per * min_snr_weight(noise_sched, t, cfg.snr_gamma)).mean()


def min_snr_weight(noise_sched, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """min-SNR-gamma loss weight of timesteps ``t`` (Hang et al. 2023) for the scheduler's prediction type."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_sched, t)
    return torch.clamp(snr, max=gamma) / (snr if noise_sched.config.prediction_type == "epsilon" else snr + 1)


def vae_loss(vae, images: torch.Tensor, cfg: FinetuneConfig) -> torch.Tensor:
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    x = to_model_channels(images, config_of(vae).in_channels)
    post = vae.encode(x).latent_dist
    rec = vae.decode(post.sample()).sample
    loss = F.mse_loss(rec, x)
    loss = loss + cfg.vae_ssim_weight * (1 - ssim((rec + 1) / 2, (x + 1) / 2, data_range=1.0))
    return loss + cfg.vae_kl_weight * post.kl().mean()


# --------------------------------------------------------------------------- logging and saving


@torch.no_grad()
def sample_grid(pipe, cfg: FinetuneConfig, fixed: torch.Tensor, path: Path) -> None:
    """PNG grid: generated images per prompt (when the U-Net or text encoder trains), else
    VAE reconstructions of a fixed batch above the originals."""
    from PIL import Image

    from ..model.components import to_grey, vae_roundtrip

    if set(cfg.train) & {"unet", "text_encoder"}:
        size = pipe.vae.config.sample_size
        out = pipe(list(cfg.sample_prompts), num_inference_steps=25, guidance_scale=4.0, height=size, width=size,
                   output_type="pt", generator=torch.Generator().manual_seed(cfg.seed)).images
        tiles = to_grey(out)
    else:
        tiles = torch.cat([vae_roundtrip(pipe.vae, fixed), fixed.cpu()]).add(1).div(2)
    tiles = tiles.clamp(0, 1).cpu()
    n, _, h, w = tiles.shape
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    grid = torch.zeros(rows * h, cols * w)
    for i in range(n):
        grid[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = tiles[i, 0]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid * 255).round().byte().numpy(), mode="L").save(path)


@torch.no_grad()
def calibrate_latent_scale(vae, images: torch.Tensor) -> float:
    """SD scales latents to unit variance (0.18215 for SD's VAE); a new VAE gets its own factor."""
    x = to_model_channels(images.to(vae.device), vae.config.in_channels)
    std = vae.encode(x).latent_dist.sample().std().item()
    scale = 1.0 / max(std, 1e-6)
    vae.register_to_config(scaling_factor=scale)
    return scale


def save_state(accelerator, ema, out: Path, step: int, seen: int, seconds: float = 0.0) -> None:
    state = out / "state"
    accelerator.save_state(str(state))
    if ema is not None:
        torch.save({k: e.state_dict() for k, e in ema.items()}, state / "ema.pt")
    (state / "progress.json").write_text(json.dumps({"step": step, "micro_batches": seen, "seconds": seconds}))


def load_state(accelerator, ema, out: Path) -> tuple[int, int, float]:
    """(optimiser steps, micro-batches, training seconds) done so far; zeros for a new run."""
    state = out / "state"
    if not (state / "progress.json").is_file():
        return 0, 0, 0.0
    accelerator.load_state(str(state))
    if ema is not None:
        saved = torch.load(state / "ema.pt", weights_only=False)
        for k, e in ema.items():
            e.load_state_dict(saved[k])
    p = json.loads((state / "progress.json").read_text())
    return p["step"], p["micro_batches"], p.get("seconds", 0.0)


# --------------------------------------------------------------------------- the loop


class Parts:
    """The modules the losses call (accelerate may wrap them) and the tokenizer."""

    def __init__(self, pipe, prepared: dict):
        self.tokenizer = pipe.tokenizer
        self.vae = prepared.get("vae", pipe.vae)
        self.unet = prepared.get("unet", pipe.unet)
        self.text_encoder = prepared.get("text_encoder", pipe.text_encoder)


def make_optimizer(mods: dict, cfg: FinetuneConfig):
    from diffusers.optimization import get_scheduler

    params = [p for m in mods.values() for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    name = {"constant": "constant_with_warmup", "cosine": "cosine"}[cfg.lr_schedule]
    sched = get_scheduler(name, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps)
    return opt, sched


def make_ema(mods: dict, cfg: FinetuneConfig):
    if not cfg.ema:
        return None
    from diffusers.training_utils import EMAModel

    return {n: EMAModel([p for p in m.parameters() if p.requires_grad], decay=cfg.ema_decay) for n, m in mods.items()}


def random_crop(images: torch.Tensor, side: int) -> torch.Tensor:
    """One random square crop for the whole batch (torch RNG: reproducible and resumable)."""
    h, w = images.shape[-2:]
    if side >= min(h, w):
        return images
    top = int(torch.randint(0, h - side + 1, ()))
    left = int(torch.randint(0, w - side + 1, ()))
    return images[..., top:top + side, left:left + side]


def step_loss(parts, noise_sched, batch: dict, cfg: FinetuneConfig, contrast: list | None = None,
              grounding=None) -> tuple[torch.Tensor, dict]:
    """The step's loss and its logged parts; ``contrast`` (``contrast.contrast_labels``) adds the prompt contrast,
    ``grounding`` (``ground.Grounding``, installed on the U-Net) the token grounding of --ground."""
    dev = images_device(parts)
    images = batch["image"].to(dev) if "image" in batch else None
    dist = batch["latent_dist"].to(dev) if "latent_dist" in batch else None
    logs, loss = {}, 0.0
    if "vae" in cfg.train:
        lv = vae_loss(parts.vae, random_crop(images, cfg.vae_crop) if cfg.vae_crop else images, cfg)
        logs["loss_vae"], loss = lv.item(), loss + lv
    if set(cfg.train) & {"unet", "text_encoder"}:
        keep = [] if contrast else None
        term = None
        if grounding is not None and "ground" in batch:
            term = GroundTerm(grounding, tuple(cfg.ground), torch.tensor(list(cfg.ground.values())),
                              batch["ground"].to(dev))
        ld = diffusion_loss(parts, noise_sched, images, batch["prompt"], cfg, latent_dist=dist, keep=keep,
                            focus=batch.get("focus"), ground=term)
        logs["loss_diffusion"], loss = ld.item(), loss + ld
        if term is not None and term.loss is not None:
            logs["loss_ground"], logs["ground_share"], loss = term.loss.item(), term.share, loss + term.loss
        if contrast:
            from .contrast import contrast_loss

            lc, clogs = contrast_loss(parts, noise_sched, keep[0], batch, contrast, cfg.contrast_beta, cfg.snr_gamma)
            logs.update(clogs)
            if lc is not None:
                logs["loss_contrast"], loss = lc.item(), loss + lc
    return loss, logs


def batches(ds, cfg: FinetuneConfig, accelerator, seen: int):
    """Endless micro-batches, resuming after ``seen`` of them (same order as an unbroken run)."""
    per_epoch = len(ds) // cfg.batch_size
    if per_epoch == 0:
        raise ValueError(f"{cfg.data}: {len(ds)} training images is fewer than --batch-size {cfg.batch_size}")
    epoch, skip = divmod(seen, per_epoch)
    while True:
        dl = accelerator.prepare(loader_for_epoch(ds, cfg, epoch))
        if skip:
            dl = accelerator.skip_first_batches(dl, skip)
            skip = 0
        yield from dl
        epoch += 1


def finish(pipe, mods: dict, ema, cfg: FinetuneConfig, fixed: torch.Tensor, out: Path, metrics: dict) -> Path:
    """Copy EMA weights in, calibrate a retrained VAE's latent scale, save checkpoint + manifest."""
    if ema is not None:
        for n, e in ema.items():
            e.copy_to([p for p in mods[n].parameters() if p.requires_grad])
    if cfg.lora_rank:  # bake the adapters into plain weights: the checkpoint needs no peft to load
        pipe.unet.fuse_lora()
        pipe.unet.unload_lora()
    if "vae" in cfg.train and not cfg.vae_decoder_only:  # a fixed encoder keeps the U-Net's latent scale
        metrics["latent_scaling_factor"] = calibrate_latent_scale(pipe.vae, fixed)
    lineage = lineage_from(Manifest.read(Path(cfg.model)), cfg.model) if cfg.model else []
    parent = lineage[0]["version"] if lineage else None
    stage = "+".join("vae_decoder" if c == "vae" and cfg.vae_decoder_only else c for c in cfg.train)
    manifest = Manifest(version=cfg.version or out.name, stage="finetune:" + stage,
                        parent_version=parent, data_fingerprint=data_fingerprint(cfg.data),
                        config={"finetune": json.loads(cfg.to_json()),
                                "model": dict(config_of(pipe.unet)) if cfg.model else cfg.model_config},
                        metrics=metrics, lineage=lineage)
    pipe.unet.eval(), pipe.vae.eval(), pipe.text_encoder.eval()
    return save_checkpoint(pipe, out / "checkpoint", manifest)


def train(cfg: FinetuneConfig, progress: bool = True, until: int | None = None) -> Path | None:
    """Run (or resume) a finetuning run; returns the final checkpoint folder.

    ``until``: pause after that optimiser step with the resumable state saved (OUT/state) and return None; the
    learning-rate schedule stays that of ``cfg.steps``, so running on later gives the same weights as one
    uninterrupted run. A run already at or past ``until`` is left as it is.
    """
    if until is not None and until < 1:
        raise ValueError(f"--until must be a step >= 1, got {until}")
    from accelerate import Accelerator
    from tqdm import tqdm

    # 1. Check inputs, write the config.
    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(cfg.to_json())
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum)
    torch.manual_seed(cfg.seed), random.seed(cfg.seed)
    # 2.-3. Data, then the model (a fresh tokenizer learns the data's prompts).
    probe = make_dataset(cfg, 8)
    prompts = [probe.prompt(r.subject_id, r.study_id) for r in probe.frame.itertuples()]
    pipe = build_model(cfg, prompts)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.vae.config.sample_size
    ds = make_dataset(cfg, size)
    fixed = collate([ds[i] for i in range(min(4, len(ds)))])["image"]
    # 4. Trainable parameters, optimiser, EMA; accelerate wraps what trains.
    labels = ds.labels
    # Repeats of each film, from the films' labels and kinds (before caching: the latents do not keep them).
    repeats = oversample_indices(ds, cfg.oversample) if cfg.oversample else None
    contrast = None
    if cfg.contrast:  # the sentences a negative's report may get: the training positives' own
        from .contrast import contrast_labels

        contrast = contrast_labels(cfg.contrast, prompts, labels)
    if cfg.cache_latents:
        pipe.vae.to(accelerator.device)
        latents = cache_latents(pipe.vae, ds, cfg, progress, out)
        if cfg.contrast_films:
            cache_films(pipe.vae, ds, latents, contrast, cfg, out, progress)
        if cfg.focus:
            latents.add_focus(focus_weights(cfg.data, [str(d) for d in ds.frame["dicom_id"]], cfg.focus,
                                            tuple(latents.dists.shape[-2:])))
        if cfg.ground:
            from ..simulator.masks import grid_masks

            latents.add_ground(grid_masks(cfg.data, [str(d) for d in ds.frame["dicom_id"]], tuple(cfg.ground),
                                          tuple(latents.dists.shape[-2:])))
        ds = latents
    if cfg.oversample:  # after caching: each image is encoded once however often it is seen
        ds = torch.utils.data.Subset(ds, repeats)
    mods = trainable(pipe, cfg)
    opt, lr_sched = make_optimizer(mods, cfg)
    names = list(mods)
    prepared = accelerator.prepare(*mods.values(), opt, lr_sched)
    wrapped, opt, lr_sched = dict(zip(names, prepared[:-2])), prepared[-2], prepared[-1]
    for m in (pipe.vae, pipe.unet, pipe.text_encoder):
        m.to(accelerator.device)
    ema = make_ema(mods, cfg)
    parts = Parts(pipe, wrapped)
    grounding, replaced = None, None
    if cfg.ground:  # the cross-attention layers report the grounded words' maps (train/ground.py)
        from .ground import Grounding, install

        grounding = Grounding()
        replaced = install(pipe.unet, grounding)
    # The model's own noise schedule (SD 2.x predicts v, SD 1.x and the tiny model epsilon).
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    # 5. Resume.
    step, seen, done_seconds = load_state(accelerator, ema, out)
    if accelerator.is_main_process:  # steps logged after the state's last save are logged again below
        trim_log(out / "log.jsonl", "step", step)
    # 6. Loop.
    data = batches(ds, cfg, accelerator, seen)
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", disable=not progress)
    log = open(out / "log.jsonl", "a")
    t0 = time.perf_counter() - done_seconds  # seconds count across resumes
    stop = cfg.steps if until is None else min(until, cfg.steps)
    if step >= stop and stop < cfg.steps:  # already paused there (or later): nothing to do
        bar.close(), log.close()
        return None
    while step < stop:
        batch = next(data)
        seen += 1
        for m in wrapped.values():
            m.train()
        with accelerator.accumulate(*wrapped.values()):
            loss, logs = step_loss(parts, noise_sched, batch, cfg, contrast, grounding)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_([p for m in wrapped.values() for p in m.parameters()], cfg.max_grad_norm)
            opt.step(), lr_sched.step(), opt.zero_grad()
        if not accelerator.sync_gradients:
            continue
        step += 1
        if ema is not None:
            for n, e in ema.items():
                e.step([p for p in mods[n].parameters() if p.requires_grad])
        rec = {"step": step, **logs, "lr": lr_sched.get_last_lr()[0], "s": round(time.perf_counter() - t0, 2)}
        log.write(json.dumps(rec) + "\n"), log.flush()
        bar.update(), bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items()})
        if cfg.sample_every and step % cfg.sample_every == 0 and accelerator.is_main_process:
            sample_grid(pipe, cfg, fixed, out / "samples" / f"step_{step:06d}.png")
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            save_state(accelerator, ema, out, step, seen, time.perf_counter() - t0)
    bar.close(), log.close()
    if replaced is not None:
        from .ground import uninstall

        uninstall(pipe.unet, replaced)
    # 7. Final checkpoint (EMA weights) and samples from it; a pause keeps only the state.
    save_state(accelerator, ema, out, step, seen, time.perf_counter() - t0)
    accelerator.wait_for_everyone()
    if step < cfg.steps:
        return None
    if not accelerator.is_main_process:
        return out / "checkpoint"
    folder = finish(pipe, mods, ema, cfg, fixed, out, {"train_seconds": round(time.perf_counter() - t0, 1)})
    sample_grid(pipe, cfg, fixed, out / "samples" / "final.png")
    return folder
