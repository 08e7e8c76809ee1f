"""``cxrgen train``: finetune the generator's components on a MIMIC-layout data set."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from .config import LR_SCHEDULES, FinetuneConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="finetune VAE / U-Net / text encoder on CXR images and report text (RoentGen)",
        description=(
            "Train the components named by --train on a MIMIC-CXR-JPG layout data set (real, or "
            "`cxrgen simulate` output), starting from --model PATH (a cxrgen checkpoint or a local Stable "
            "Diffusion / RoentGen folder) or --init tiny (a fresh tiny model whose tokenizer is trained on the "
            "report text). Writes OUT/config.json, OUT/log.jsonl (loss per step), OUT/samples/*.png, "
            "OUT/state/ (resumable: re-run the same command to continue) and OUT/checkpoint/ (the final "
            "pipeline folder with EMA weights and cxrgen_manifest.json). Multi-GPU: accelerate launch -m "
            "training.cli train ..."
        ),
    )
    p.add_argument("--data", help="MIMIC-CXR-JPG layout folder")
    p.add_argument("--out", help="run folder")
    p.add_argument("--model", help="pipeline folder to start from")
    p.add_argument("--init", choices=["tiny"], help="start from a fresh tiny model")
    p.add_argument("--vae-factor", type=int, choices=[4, 8], dest="vae_factor",
                   help="with --init tiny: the VAE's downsampling, 8 (Stable Diffusion's; 16 x 16 latents at 128 px, "
                        "the default) or 4 (32 x 32 latents: thin lines such as catheters span more of a latent "
                        "cell; ~2x the U-Net step time)")
    p.add_argument("--unet-attention", dest="unet_attention", metavar="KIND,...",
                   help="the U-Net's attention per level, outermost (finest) first: none (ResNet blocks only), full "
                        "(self- and cross-attention) or cross (cross-attention on the text only, cheap on a fine "
                        "grid), e.g. cross,full,full,none. With --model the loaded U-Net keeps every weight that "
                        "carries over and new attention starts as the identity; with --init tiny it sets the layout")
    p.add_argument("--image-size", type=int, dest="image_size", metavar="PX",
                   help="with --model: train at this image side instead of the model's own (a 128 px model "
                        "continues at 256 px on a latent grid twice as fine; the weights are convolutional); the "
                        "checkpoint generates at it")
    p.add_argument("--config", help="JSON file with FinetuneConfig fields; flags override it")
    p.add_argument("--train", help="comma list of vae,unet,text_encoder (default unet,text_encoder)")
    for name, typ in (("steps", int), ("batch_size", int), ("grad_accum", int), ("lr", float),
                      ("warmup_steps", int), ("text_dropout", float), ("lora_rank", int), ("seed", int),
                      ("checkpoint_every", int), ("sample_every", int), ("num_workers", int), ("vae_crop", int)):
        p.add_argument("--" + name.replace("_", "-"), type=typ, dest=name)
    p.add_argument("--lr-schedule", choices=list(LR_SCHEDULES), dest="lr_schedule",
                   help="learning rate after warm-up: constant (default) or cosine decay to 0 at --steps")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], dest="mixed_precision")
    p.add_argument("--no-ema", action="store_true", help="save raw weights instead of their EMA")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None)
    p.add_argument("--cache-latents", action="store_true", default=None,
                   help="frozen VAE: encode the data once (kept in OUT/latents.pt for a resumed run) and train the "
                        "U-Net on cached latents")
    p.add_argument("--vae-decoder-only", action="store_true", default=None, dest="vae_decoder_only",
                   help="with --train vae: finetune only the decoder (the encoder and latent space stay fixed, "
                        "so a U-Net trained on them stays valid)")
    p.add_argument("--vae-ssim-weight", type=float, dest="vae_ssim_weight",
                   help="weight of the (1 - SSIM) term of the VAE loss (default 0.2)")
    p.add_argument("--oversample", metavar="LABEL=K,...",
                   help="images positive for a CheXpert label appear K times per epoch, e.g. "
                        "'Support Devices=4' (rare or small findings weigh more); on simulated data a simulator "
                        "kind as well, e.g. 'mass=4' (masses, not every Lung Lesion film)")
    p.add_argument("--contrast", metavar="LABEL=W,...",
                   help="prompt contrast (train/contrast.py) for a CheXpert label, weight W: a film's report must "
                        "denoise it better than the same report without the label's sentences (and a negative's "
                        "report better than with one added), e.g. 'Support Devices=20' (while a margin is small it "
                        "pulls W / 2 times as hard as the denoising loss on one image: words for a small finding)")
    p.add_argument("--contrast-beta", type=float, dest="contrast_beta",
                   help="the contrast's logistic scale on the per-image MSE margin: past a margin of a few / BETA the "
                        "term lets go (default 20000, near 2e-4: what a catheter is worth)")
    p.add_argument("--contrast-films", action="store_true", default=None, dest="contrast_films",
                   help="simulated data (with --cache-latents): a positive film's contrast is taken between its exam "
                        "rendered with and without the label's findings, so the words alone cannot win it")
    p.add_argument("--focus", metavar="KIND=W,...",
                   help="simulated data with finding masks (cxrgen simulate --finding-masks) and --cache-latents: "
                        "the denoising error on a simulator kind's footprint counts 1 + W times, e.g. 'mass=20' (a "
                        "lesion's own pixels, not only its share of the film)")
    p.add_argument("--ground", metavar="KIND=W,...",
                   help="simulated data with finding masks and --cache-latents: token grounding (TokenCompose, "
                        "Wang et al. 2024): the U-Net's cross-attention of the words naming a kind (mass, nodule, "
                        "granuloma) is pulled onto the kind's finding mask, weight W, e.g. 'mass=1,nodule=1'")
    p.add_argument("--snr-gamma", type=parse_snr_gamma, dest="snr_gamma", metavar="GAMMA|off",
                   help="min-SNR loss weighting (Hang et al. 2023; default 5): each timestep's loss is weighted "
                        "min(SNR, GAMMA) / SNR, which all but drops the low-noise steps where thin detail is "
                        "learned; 'off' trains on the plain epsilon MSE")
    p.add_argument("--noise-shift", type=float, dest="noise_shift", metavar="S",
                   help="shift the model's noise schedule to SNR(t) / S at every timestep (Hoogeboom et al. 2023: "
                        "a finer grid needs more noise to hide a large structure; S > 1 noisier, S < 1 less noisy); "
                        "saved in the checkpoint's scheduler, so sampling uses it too (default 1: unchanged; at 128 "
                        "px S = 4 did not adapt in 600 steps, nor ramped in 2,000: see the README)")
    p.add_argument("--noise-shift-ramp", action="store_true", default=None, dest="noise_shift_ramp",
                   help="with --noise-shift: the shift grows with t, from none at the first timestep to S at the "
                        "last (simple diffusion's interpolated schedule), so the low-noise end where fine detail "
                        "is drawn and where sampling stops keeps its schedule")
    p.add_argument("--version", help="version name of the resulting checkpoint")
    p.add_argument("--until", type=positive_step, metavar="STEP",
                   help="pause after this step with the resumable state saved (OUT/state), keeping --steps' "
                        "learning-rate schedule; the same command without --until (or with a later one) "
                        "continues, and benchmarks/snapshot.py takes the paused run's EMA weights")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def positive_step(text: str) -> int:
    """``--until``: a whole number of steps, at least 1."""
    try:
        step = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a step number >= 1, got {text!r}") from None
    if step < 1:
        raise argparse.ArgumentTypeError(f"expected a step number >= 1, got {text!r}")
    return step


def parse_snr_gamma(text: str) -> float:
    """``--snr-gamma``: a positive number, or off / none (stored as 0: plain MSE)."""
    if text.strip().lower() in ("off", "none"):
        return 0.0
    try:
        gamma = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'off', got {text!r}") from None
    if not gamma > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'off', got {text!r}")
    return gamma


def parse_oversample(text: str, expected: str = "LABEL=K, e.g. 'Support Devices=4'",
                     flag: str = "--oversample", number=int) -> dict[str, int]:
    """``"Support Devices=4,Lung Lesion=2"`` -> {"Support Devices": 4, "Lung Lesion": 2} (values by ``number``)."""
    out = {}
    for part in (x.strip() for x in text.split(",") if x.strip()):
        label, eq, k = part.rpartition("=")
        try:
            if not eq or not label.strip():
                raise ValueError
            out[label.strip()] = number(k)
        except ValueError:
            raise ValueError(f"{flag} {part!r}: expected {expected}") from None
    return out


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    cfg = FinetuneConfig.from_file(args.config) if args.config else FinetuneConfig()
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    for k, v in vars(args).items():
        if k in fields and v is not None and k not in ("train", "oversample", "contrast", "focus", "ground",
                                                                "unet_attention"):
            setattr(cfg, k, v)
    if args.oversample:
        cfg.oversample = parse_oversample(args.oversample)
    if args.focus:
        cfg.focus = parse_oversample(args.focus, "KIND=W, e.g. 'mass=20'", "--focus", float)
    if args.ground:
        cfg.ground = parse_oversample(args.ground, "KIND=W, e.g. 'mass=1'", "--ground", float)
    if args.contrast:
        cfg.contrast = parse_oversample(args.contrast, "LABEL=W, e.g. 'Support Devices=20'", "--contrast", float)
    if args.train:
        cfg.train = tuple(x.strip() for x in args.train.split(",") if x.strip())
    if args.no_ema:
        cfg.ema = False
    if cfg.snr_gamma == 0:  # --snr-gamma off
        cfg.snr_gamma = None
    if getattr(args, "vae_factor", None):
        if cfg.init != "tiny":
            raise ValueError("--vae-factor builds a fresh model's VAE: use it with --init tiny (a --model keeps its "
                             "own VAE)")
        from ..model.components import VAE_FACTOR_PRESETS

        cfg.model_config = {**VAE_FACTOR_PRESETS[args.vae_factor], **cfg.model_config}
    if getattr(args, "unet_attention", None):
        cfg.unet_attention = tuple(x.strip() for x in args.unet_attention.split(",") if x.strip())
    if cfg.init == "tiny" and cfg.unet_attention:
        cfg.model_config = {**cfg.model_config, "unet_attention": tuple(cfg.unet_attention)}
    return cfg


def run(args: argparse.Namespace) -> int:
    from .loop import train

    cfg = config_from_args(args)
    cfg.validate()
    print("train config:", cfg.to_json())
    folder = train(cfg, progress=not args.no_progress, until=args.until)
    if folder is None:
        done = json.loads((Path(cfg.out) / "state" / "progress.json").read_text())["step"]
        print(f"paused at step {done} of {cfg.steps}: state in {Path(cfg.out) / 'state'}; run the same command "
              "without --until to continue")
        return 0
    print(f"checkpoint: {folder}")
    return 0
