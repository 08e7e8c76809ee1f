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
    image_size: int = 128  # pixels; latents are image_size / vae_factor (8x: 16 x 16 at 128 px)
    image_channels: int = 1  # grey radiographs
    latent_channels: int = 4  # as in Stable Diffusion
    # 4 blocks = 3 downsamples = 8x (Stable Diffusion's); 3 blocks = 4x, a latent grid twice as fine, where a
    # line a few pixels wide (a catheter, a tube) is no longer a fraction of one latent cell
    vae_channels: tuple[int, ...] = (32, 64, 128, 128)
    vae_layers_per_block: int = 1
    unet_channels: tuple[int, ...] = (32, 64, 128)  # 16x16 latents -> 8 -> 4; 3.2M params, ~0.7 s/step on 2 CPU cores
    # per U-Net level, one of ATTENTION_KINDS (or a bool: True = "full", False = "none"): "full" a transformer
    # block (self- and cross-attention on the text), "cross" one whose attention layers all attend to the text (no
    # self-attention: cheap on a fine grid), "none" plain ResNet blocks; () = "full" at every level but the
    # deepest (SD's layout). Self-attention on a 32 x 32 grid is costly (VAE_FACTOR_PRESETS).
    unet_attention: tuple[bool | str, ...] = ()
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
        if len(self.vae_channels) not in (3, 4):
            raise ValueError(f"vae_channels needs 4 entries (8x downsampling, as in Stable Diffusion) or 3 (4x), "
                             f"got {len(self.vae_channels)}")
        if self.image_size % self.vae_factor:
            raise ValueError(f"image_size must be a multiple of {self.vae_factor} (the VAE's downsampling), "
                             f"got {self.image_size}")
        if self.unet_attention and len(self.unet_attention) != len(self.unet_channels):
            raise ValueError(f"unet_attention needs one entry per U-Net level ({len(self.unet_channels)}), "
                             f"got {len(self.unet_attention)}")
        for a in self.unet_attention:
            attention_kind(a)

    @property
    def vae_factor(self) -> int:
        """How many pixels one latent cell spans along each side."""
        return 2 ** (len(self.vae_channels) - 1)

    @property
    def attention_levels(self) -> tuple[str, ...]:
        """One of ATTENTION_KINDS per U-Net level, outermost (finest) first."""
        n = len(self.unet_channels)
        return tuple(attention_kind(a) for a in self.unet_attention) or ("full",) * (n - 1) + ("none",)

    @classmethod
    def from_dict(cls, d: dict) -> "TinyModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


ATTENTION_KINDS = ("none", "full", "cross")


def attention_kind(value: bool | str) -> str:
    """A U-Net level's attention as one of ATTENTION_KINDS (True / False read as "full" / "none")."""
    if isinstance(value, bool):
        return "full" if value else "none"
    if value not in ATTENTION_KINDS:
        raise ValueError(f"U-Net attention per level is one of {list(ATTENTION_KINDS)} (or true / false), "
                         f"got {value!r}")
    return value


# ``--vae-factor``: TinyModelConfig fields for each latent grid. The 4x model keeps the 8x model's U-Net below a new
# outermost 32 x 32 level of plain ResNet blocks (attention at 16 x 16 and 8 x 8, as before): ~1 s per batch-32 step
# on 2 CPU cores against 4.7 s with self-attention on the 32 x 32 grid (measured when it was chosen).
VAE_FACTOR_PRESETS: dict[int, dict] = {
    8: {},
    4: {"vae_channels": (32, 64, 128), "unet_channels": (32, 64, 128, 128),
        "unet_attention": (False, True, True, False)},
}


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
        down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels),
        block_out_channels=cfg.vae_channels, layers_per_block=cfg.vae_layers_per_block,
        latent_channels=cfg.latent_channels, norm_num_groups=min(32, cfg.vae_channels[0]),
        sample_size=cfg.image_size,
    )


def build_unet(cfg: TinyModelConfig):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=cfg.image_size // cfg.vae_factor, in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels, **unet_layout_config(cfg.attention_levels),
        block_out_channels=cfg.unet_channels, layers_per_block=cfg.unet_layers_per_block,
        cross_attention_dim=cfg.text_hidden, attention_head_dim=cfg.unet_head_dim,
        norm_num_groups=min(32, cfg.unet_channels[0]),
    )


def unet_layout_config(levels: tuple[str, ...]) -> dict:
    """The UNet2DConditionModel config fields that give each level (outermost first) its ATTENTION_KINDS entry."""
    return {"down_block_types": tuple("DownBlock2D" if a == "none" else "CrossAttnDownBlock2D" for a in levels),
            "up_block_types": tuple("UpBlock2D" if a == "none" else "CrossAttnUpBlock2D" for a in reversed(levels)),
            "only_cross_attention": tuple(a == "cross" for a in levels)}


def unet_layout(unet) -> tuple[str, ...]:
    """Each level's attention (ATTENTION_KINDS, outermost first) of a UNet2DConditionModel."""
    c = unet.config
    only = c.only_cross_attention
    only = [bool(only)] * len(c.down_block_types) if isinstance(only, bool) else list(only)
    return tuple("none" if "CrossAttn" not in kind else "cross" if o else "full"
                 for kind, o in zip(c.down_block_types, only))


def relayout_unet(unet, levels: tuple[bool | str, ...]):
    """A copy of ``unet`` with each level's attention set to ``levels`` (ATTENTION_KINDS, outermost first).

    Levels whose attention is unchanged keep all their weights, as do every level's ResNet blocks and samplers
    and the mid block; a transformer block that is new (or changes kind) starts as the identity (its output
    projection zeroed, so the residual passes through). Where attention is only added, the relaid-out U-Net predicts
    exactly what ``unet`` did and training grows the new attention from there: how a trained model gets text
    access on a finer level.
    """
    from diffusers import UNet2DConditionModel

    levels = tuple(attention_kind(a) for a in levels)
    old = unet_layout(unet)
    if len(levels) != len(old):
        raise ValueError(f"--unet-attention needs one entry per U-Net level ({len(old)}), got {len(levels)}")
    new = UNet2DConditionModel.from_config({**dict(unet.config), **unet_layout_config(levels),  # mid block as it was
                                            "mid_block_only_cross_attention": bool(
                                                unet.config.get("mid_block_only_cross_attention"))})
    new.to(unet.device)
    if unet.dtype != new.dtype:
        new.to(dtype=unet.dtype)
    n = len(levels)
    fresh = [f"down_blocks.{i}.attentions." for i in range(n) if levels[i] != old[i]]
    fresh += [f"up_blocks.{n - 1 - i}.attentions." for i in range(n) if levels[i] != old[i]]
    is_fresh = lambda key: key.startswith(tuple(fresh))  # noqa: E731
    missing, unexpected = new.load_state_dict({k: v for k, v in unet.state_dict().items() if not is_fresh(k)},
                                              strict=False)
    lost = sorted(unexpected) + sorted(k for k in missing if not is_fresh(k))
    if lost:
        raise ValueError(f"cannot relayout the U-Net: weights that do not carry over, e.g. {lost[:5]}")
    with torch.no_grad():
        for name, module in new.named_modules():
            if is_fresh(name + ".") and name.endswith("proj_out"):
                module.weight.zero_()
                if module.bias is not None:
                    module.bias.zero_()
    return new


def training_scheduler(prediction_type: str = "epsilon"):
    """SD 1.x's noise schedule (scaled-linear betas, 1000 steps)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False, prediction_type=prediction_type,
                         steps_offset=1)


def shift_noise_schedule(scheduler, shift: float, ramp: bool = False):
    """A copy of ``scheduler`` (any diffusers scheduler with ``alphas_cumprod``) whose signal-to-noise ratio is
    SNR(t) / ``shift`` at every training timestep (Hoogeboom et al. 2023, "simple diffusion"; Chen 2023): same
    class, same options, the new schedule given as ``trained_betas`` so it is saved with the model and every
    sampler built from its config (``training.generation.make_scheduler``) follows it. ``ramp``: the shift grows
    with t, log-linearly from none at the first timestep to ``shift`` at the last (simple diffusion's
    interpolated schedule), so the low-noise end, where fine detail is drawn and where a sampler's last step
    stops, keeps its schedule. ``shift`` 1 returns the schedule unchanged; shifts compose (2 then 2 is 4)."""
    import numpy as np

    if not (shift > 0 and np.isfinite(shift)):
        raise ValueError(f"noise shift must be a positive number, got {shift}")
    ac = scheduler.alphas_cumprod.double().numpy()
    w = np.linspace(0.0, 1.0, len(ac)) if ramp else 1.0
    snr = ac / (1.0 - ac) * np.power(float(shift), -w)
    shifted = snr / (1.0 + snr)
    betas = 1.0 - shifted / np.concatenate([[1.0], shifted[:-1]])
    return type(scheduler).from_config(scheduler.config, trained_betas=betas.tolist())


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
