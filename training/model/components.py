"""The generator: a diffusers ``StableDiffusionPipeline`` assembled from typed components.

Two ways in, one code path (issue 3, section 1):
  * ``tiny``: every component built here from ``TinyModelConfig`` and trained from scratch;
    the tokenizer is a CLIP BPE trained on radiology report text;
  * a Stable Diffusion 1.x / 2.x (or RoentGen) folder on local disk, loaded by
    ``checkpoint.load_pipeline``.

The architecture is SD's (AutoencoderKL -> UNet2DConditionModel with cross-attention on
CLIPTextModel states), only narrower. The tiny model works on single-channel images;
an RGB model (any real SD checkpoint) sees grey images replicated to 3 channels, see
``to_model_channels`` / ``to_grey``.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import torch


@dataclasses.dataclass
class TinyModelConfig:
    image_size: int = 128  # pixels; the VAE downsamples 8x, so latents are image_size / 8
    image_channels: int = 1  # grey radiographs
    latent_channels: int = 4  # as in Stable Diffusion
    vae_channels: tuple[int, ...] = (32, 64, 128, 128)  # 4 blocks = 3 downsamples = 8x
    vae_layers_per_block: int = 1
    unet_channels: tuple[int, ...] = (32, 64, 128)  # 16x16 latents -> 8 -> 4; 3.2M params, ~0.7 s/step on 2 CPU cores
    unet_layers_per_block: int = 1
    unet_head_dim: int = 8  # attention head dimension
    text_hidden: int = 128  # CLIP text width (= U-Net cross-attention dim)
    text_layers: int = 4
    text_heads: int = 4
    text_intermediate: int = 512
    max_length: int = 64  # prompt tokens (impression + findings rarely exceed this)
    vocab_size: int = 4096  # BPE vocabulary trained on report text
    prediction_type: str = "epsilon"  # what the U-Net predicts (SD 1.x: epsilon)

    def __post_init__(self) -> None:
        if self.image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8, got {self.image_size}")
        if len(self.vae_channels) != 4:
            raise ValueError("vae_channels needs 4 entries (8x downsampling, as in Stable Diffusion)")

    @classmethod
    def from_dict(cls, d: dict) -> "TinyModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def train_tokenizer(texts: Iterable[str], vocab_size: int, max_length: int):
    """A CLIP tokenizer (byte-level BPE, CLIP's normaliser and pre-tokeniser) trained on ``texts``.

    Training starts from transformers' own empty CLIPTokenizer pipeline, so the result
    is a genuine CLIPTokenizer and saves as one.
    """
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer().train_new_from_iterator(list(texts), vocab_size=vocab_size)
    tok.model_max_length = max_length
    return tok


def build_text_encoder(cfg: TinyModelConfig, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_hidden, intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_length, projection_dim=cfg.text_hidden,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))


def build_vae(cfg: TinyModelConfig):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=cfg.image_channels, out_channels=cfg.image_channels,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=cfg.vae_channels, layers_per_block=cfg.vae_layers_per_block,
        latent_channels=cfg.latent_channels, norm_num_groups=min(32, cfg.vae_channels[0]),
        sample_size=cfg.image_size,
    )


def build_unet(cfg: TinyModelConfig):
    from diffusers import UNet2DConditionModel

    n = len(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=cfg.image_size // 8, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        block_out_channels=cfg.unet_channels, layers_per_block=cfg.unet_layers_per_block,
        cross_attention_dim=cfg.text_hidden, attention_head_dim=cfg.unet_head_dim,
        norm_num_groups=min(32, cfg.unet_channels[0]),
    )


def training_scheduler(prediction_type: str = "epsilon"):
    """SD 1.x's noise schedule (scaled-linear betas, 1000 steps)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False, prediction_type=prediction_type,
                         steps_offset=1)


def build_pipeline(cfg: TinyModelConfig, tokenizer):
    """A freshly initialised tiny pipeline (DDIM for sampling, same noise schedule)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    sched = DDIMScheduler.from_config(training_scheduler(cfg.prediction_type).config, set_alpha_to_one=False)
    return StableDiffusionPipeline(
        vae=build_vae(cfg), text_encoder=build_text_encoder(cfg, tokenizer), tokenizer=tokenizer,
        unet=build_unet(cfg), scheduler=sched, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def to_model_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Grey (N, 1, H, W) images to the VAE's channel count (RGB SD models see grey x3)."""
    if images.shape[1] == channels:
        return images
    if images.shape[1] == 1:
        return images.expand(-1, channels, -1, -1)
    raise ValueError(f"cannot map {images.shape[1]}-channel images to a {channels}-channel VAE")


def to_grey(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) decoder output to grey (N, 1, H, W): radiographs have one channel."""
    return images if images.shape[1] == 1 else images.mean(1, keepdim=True)


@torch.no_grad()
def vae_roundtrip(vae, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Grey images in [-1, 1] encoded and decoded (posterior mode) by ``vae``: grey, clamped, on the CPU."""
    out = []
    for x in images.split(batch_size):
        x = to_model_channels(x.to(vae.device, vae.dtype), vae.config.in_channels)
        out.append(to_grey(vae.decode(vae.encode(x).latent_dist.mode()).sample).float().clamp(-1, 1).cpu())
    return torch.cat(out)
