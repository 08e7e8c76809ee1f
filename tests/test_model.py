"""The generator's components and checkpoints, on tiny components (diffusers' testing habit)."""

import json
import re

import numpy as np
import pytest
import torch

from training.model.checkpoint import CheckpointError, Manifest, load_pipeline, save_checkpoint, validate_folder
from training.model.components import TinyModelConfig, build_pipeline, to_grey, to_model_channels, train_tokenizer

TEXTS = [
    "Moderate left pleural effusion with blunting of the costophrenic angle.",
    "The lungs are clear. No pleural effusion or pneumothorax. Heart size is normal.",
    "Large right pneumothorax. Endotracheal tube 4 cm above the carina.",
    "Cardiomegaly. Right lower lobe consolidation with air bronchograms, likely pneumonia.",
] * 5

MICRO = TinyModelConfig(image_size=32, vae_channels=(8, 8, 16, 16), unet_channels=(16, 32), unet_head_dim=4,
                        text_hidden=16, text_layers=1, text_heads=2, text_intermediate=32, max_length=16,
                        vocab_size=500)
# the 4x-VAE layout (``--vae-factor 4``): three VAE blocks, an outer U-Net level without attention
MICRO4 = TinyModelConfig(**{**MICRO.__dict__, "vae_channels": (8, 8, 16), "unet_channels": (16, 16, 32),
                            "unet_attention": (False, True, False)})


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=MICRO.vocab_size, max_length=MICRO.max_length)


def generate(pipe, seed=0):
    out = pipe(["left pleural effusion"], num_inference_steps=2, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(seed))
    return out.images


def test_tokenizer_learns_report_words(tokenizer, tmp_path):
    ids = tokenizer("left pleural effusion").input_ids
    toks = tokenizer.convert_ids_to_tokens(ids)
    assert "pleural</w>" in toks and "effusion</w>" in toks
    tokenizer.save_pretrained(tmp_path)
    from transformers import CLIPTokenizer

    assert CLIPTokenizer.from_pretrained(tmp_path)("left pleural effusion").input_ids == ids


def test_tiny_pipeline_generates_grey_images(tokenizer):
    torch.manual_seed(0)
    pipe = build_pipeline(MICRO, tokenizer)
    pipe.set_progress_bar_config(disable=True)
    img = generate(pipe)
    assert img.shape == (1, 32, 32, 1) and np.isfinite(img).all()


def test_4x_vae_gives_a_latent_grid_twice_as_fine(tokenizer, tmp_path):
    torch.manual_seed(0)
    pipe = build_pipeline(MICRO4, tokenizer)
    pipe.set_progress_bar_config(disable=True)
    assert MICRO.vae_factor == 8 and MICRO4.vae_factor == 4 and pipe.vae_scale_factor == 4
    assert pipe.vae.encode(torch.zeros(1, 1, 32, 32)).latent_dist.mode().shape == (1, 4, 8, 8)
    assert pipe.unet.config.sample_size == 8
    assert pipe.unet.config.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    assert pipe.unet.config.up_block_types == ("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    img = generate(pipe)
    assert img.shape == (1, 32, 32, 1) and np.isfinite(img).all()
    save_checkpoint(pipe, tmp_path / "ckpt", Manifest(version="t4", stage="init", config={}))
    loaded, _ = load_pipeline(tmp_path / "ckpt")
    assert loaded.vae_scale_factor == 4
    np.testing.assert_allclose(generate(loaded), img, atol=1e-5)


def test_default_layout_is_stable_diffusions(tokenizer):
    from training.model.components import build_unet

    unet = build_unet(MICRO)
    assert unet.config.sample_size == 4  # 32 px / 8
    assert unet.config.down_block_types == ("CrossAttnDownBlock2D", "DownBlock2D")


@pytest.mark.parametrize("fields, message", [
    ({"vae_channels": (8, 8)}, "vae_channels needs 4 entries"),
    ({"vae_channels": (8, 8, 16, 16, 16)}, "vae_channels needs 4 entries"),
    ({"image_size": 36}, "image_size must be a multiple of 8"),
    ({"unet_attention": (True,)}, "unet_attention needs one entry per U-Net level (2)"),
    ({"unet_attention": ("cross", "sparse")}, "one of ['none', 'full', 'cross'] (or true / false), got 'sparse'"),
])
def test_bad_model_configs_are_named(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TinyModelConfig(**{**MICRO.__dict__, **fields})
    if "image_size" in fields:  # 36 px is fine on a 4x grid
        assert TinyModelConfig(**{**MICRO4.__dict__, **fields}).image_size == 36


def test_cross_only_level_attends_to_the_text_alone(tokenizer):
    from training.model.components import build_unet, unet_layout

    unet = build_unet(TinyModelConfig(**{**MICRO4.__dict__, "unet_channels": (8, 32, 32),
                                         "unet_attention": ("cross", "full", "none")}))
    assert unet_layout(unet) == ("cross", "full", "none")
    outer, inner = unet.down_blocks[0].attentions[0], unet.down_blocks[1].attentions[0]
    block = outer.transformer_blocks[0]
    assert block.only_cross_attention and block.attn1.to_k.in_features == MICRO.text_hidden == 16  # the text
    assert not inner.transformer_blocks[0].only_cross_attention
    assert inner.transformer_blocks[0].attn1.to_k.in_features == 32  # self-attention on the level's features
    assert unet_layout(build_unet(MICRO4)) == ("none", "full", "none")  # booleans read as full / none


def test_relayout_adds_attention_as_identity_and_keeps_the_rest(tokenizer):
    from training.model.components import build_unet, relayout_unet, unet_layout

    torch.manual_seed(0)
    unet = build_unet(MICRO4).eval()
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 16, MICRO.text_hidden)
    with torch.no_grad():
        before = unet(x, t, text).sample
        grown = relayout_unet(unet, ("cross", "full", "none")).eval()
        after = grown(x, t, text).sample
    assert unet_layout(grown) == ("cross", "full", "none") and unet_layout(unet) == ("none", "full", "none")
    torch.testing.assert_close(after, before)  # the new attention starts as the identity
    old = unet.state_dict()
    for k, v in grown.state_dict().items():  # everything else carried over, the new block's inside is random
        if k in old:
            assert torch.equal(v, old[k]), k
    new = [k for k in grown.state_dict() if k not in old]
    assert new and all(k.startswith(("down_blocks.0.attentions.", "up_blocks.2.attentions.")) for k in new)
    # the new block trains: its output projection gets a gradient and then changes the prediction
    grown.train()
    grown(x, t, text).sample.square().mean().backward()
    assert grown.down_blocks[0].attentions[0].proj_out.weight.grad.abs().sum() > 0
    # a level that changes kind (full -> cross) starts again as the identity; its ResNet blocks are kept
    swapped = relayout_unet(unet, ("none", "cross", "none"))
    for blocks in (swapped.down_blocks[1], swapped.up_blocks[1]):
        assert not blocks.attentions[0].proj_out.weight.any() and blocks.attentions[0].transformer_blocks[0].only_cross_attention
    assert torch.equal(swapped.down_blocks[1].resnets[0].conv1.weight, unet.down_blocks[1].resnets[0].conv1.weight)
    with pytest.raises(ValueError, match=re.escape("--unet-attention needs one entry per U-Net level (3), got 2")):
        relayout_unet(unet, ("cross", "full"))
    with pytest.raises(ValueError, match="got 'self'"):
        relayout_unet(unet, ("self", "full", "none"))


def test_save_load_same_image_and_manifest(tokenizer, tmp_path):
    torch.manual_seed(0)
    pipe = build_pipeline(MICRO, tokenizer)
    pipe.set_progress_bar_config(disable=True)
    save_checkpoint(pipe, tmp_path / "ckpt", Manifest(version="t1", stage="init", config={"model": "micro"}))
    assert (tmp_path / "ckpt" / "tokenizer" / "vocab.json").is_file()
    loaded, manifest = load_pipeline(tmp_path / "ckpt")
    assert manifest.version == "t1" and manifest.config == {"model": "micro"}
    np.testing.assert_allclose(generate(loaded), generate(pipe), atol=1e-5)


def test_real_stable_diffusion_layout_loads(tokenizer, tmp_path):
    """A stand-in with SD 1.x's layout: RGB VAE, CLIP vocab.json + merges.txt only,
    safety checker listed in model_index.json, no cxrgen manifest."""
    torch.manual_seed(0)
    cfg = TinyModelConfig(**{**MICRO.__dict__, "image_channels": 3})
    pipe = build_pipeline(cfg, tokenizer)
    folder = tmp_path / "sd15"
    pipe.save_pretrained(folder)
    tok = folder / "tokenizer"
    pipe.tokenizer.backend_tokenizer.model.save(str(tok))
    (tok / "tokenizer.json").unlink()
    index = json.loads((folder / "model_index.json").read_text())
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                 feature_extractor=["transformers", "CLIPImageProcessor"])
    (folder / "model_index.json").write_text(json.dumps(index))
    loaded, manifest = load_pipeline(folder)
    assert manifest is None and loaded.vae.config.in_channels == 3
    img = generate(loaded)
    assert img.shape == (1, 32, 32, 3)


def test_missing_and_corrupt_checkpoints_are_named(tokenizer, tmp_path):
    with pytest.raises(CheckpointError, match="not a folder"):
        load_pipeline(tmp_path / "nowhere")
    torch.manual_seed(0)
    folder = tmp_path / "ckpt"
    save_checkpoint(build_pipeline(MICRO, tokenizer), folder, Manifest(version="t", stage="init"))
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    assert any("unet/ has no weights" in p for p in validate_folder(folder))
    with pytest.raises(CheckpointError, match="unet/ has no weights"):
        load_pipeline(folder)
    save_checkpoint(build_pipeline(MICRO, tokenizer), folder, Manifest(version="t", stage="init"))
    (folder / "vae" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot load"):
        load_pipeline(folder)
    (folder / "cxrgen_manifest.json").write_text("{")
    with pytest.raises(CheckpointError, match="cxrgen_manifest.json is corrupt"):
        Manifest.read(folder)


def test_channel_mapping():
    grey = torch.rand(2, 1, 8, 8)
    assert to_model_channels(grey, 3).shape == (2, 3, 8, 8)
    assert torch.allclose(to_grey(to_model_channels(grey, 3)), grey)
    with pytest.raises(ValueError, match="cannot map 2-channel"):
        to_model_channels(torch.rand(1, 2, 8, 8), 3)


def test_model_config_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown model config field"):
        TinyModelConfig.from_dict({"image_size": 64, "bogus": 1})


def test_data_fingerprint_ignores_gzip_write_time(tmp_path):
    import gzip

    from training.model.checkpoint import data_fingerprint

    def write(root, mtime, text="a,b\n1,2\n"):
        root.mkdir(exist_ok=True)
        for name in ("chexpert", "metadata", "split"):
            (root / f"mimic-cxr-2.0.0-{name}.csv.gz").write_bytes(gzip.compress(f"{name}\n{text}".encode(),
                                                                                mtime=mtime))
        return data_fingerprint(root)

    assert write(tmp_path / "a", 1) == write(tmp_path / "b", 2)
    assert write(tmp_path / "c", 1, text="a,b\n1,3\n") != write(tmp_path / "a", 1)
    (tmp_path / "a" / "mimic-cxr-2.0.0-split.csv.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="split.csv.gz is not a readable gzip"):
        data_fingerprint(tmp_path / "a")


def test_the_embedded_default_names_its_parents_back_to_the_aligned_baseline():
    """Issue 8: the promoted default's manifest lists its parents, nearest first, back to tiny-cpu-v2.2 (the
    model alignment started from), each with its stage; it is the aligned model, not a finetune."""
    from training.generation import DEFAULT_MODEL
    from training.model.checkpoint import Manifest

    m = Manifest.read(DEFAULT_MODEL)
    versions = [a["version"] for a in m.lineage]
    assert m.stage.startswith("align:") and versions[0] == m.parent_version
    assert "tiny-cpu-v2.2" in versions and m.version not in versions
    assert all(a.get("stage") for a in m.lineage[:versions.index("tiny-cpu-v2.2") + 1])
