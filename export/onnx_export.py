"""``cxrgen export onnx CHECKPOINT OUT``: every component of a checkpoint as its own ONNX graph.

1. Load the checkpoint as every consumer does (``load_pipeline``: ACE tokens included) in fp32.
2. Export text encoder, U-Net (default attention processor) and VAE decoder with the TorchScript
   exporter (``dynamo=False``: diffusers' own ONNX export path; its dynamic axes are the batch and,
   for U-Net and decoder, the latent height / width), then each trained reward of the reward folder.
3. ``onnx.checker.check_model`` on every graph, then an onnxruntime run of each against torch on
   the tracing inputs (max abs difference recorded in export.json: a graph that drifts fails here).
4. With ``--fp16``: text encoder and U-Net cast to fp16 (onnxruntime's converter, float32 I/O kept
   so every runner feeds the same arrays); the VAE decoder stays fp32 (fp16 decoders overflow).
   Unless ``--no-fuse``: ``unet.fused.onnx``, the U-Net rewritten by onnxruntime's transformer optimizer
   (model type ``unet``): each attention block becomes one com.microsoft ``Attention`` (self) or
   ``MultiHeadAttention`` (cross) node, LayerNorm + residual ``SkipLayerNormalization``, ``Gelu``.
   The default processor's separate MatMul / Softmax attention was what made onnxruntime slower than
   torch's fused SDPA at batch 4-16 (benchmarks/results/backends-cpu.json). The CUDA-only fusions
   (GroupNorm, BiasSplitGelu, NHWC Conv, packed QKV) stay off, so the graph runs on the CPU provider
   too. onnxruntime runners (the backend, Triton's python models) take it; TensorRT's parser knows no
   com.microsoft ops and builds from ``unet.onnx``. Checked against torch like the others.
5. Tokenizer, scheduler config and the checkpoint manifest copied; export.json written last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np

from .folder import EXPORT_MANIFEST, FORMAT_VERSION, ExportConfig, ExportError, graph_io

MIN_OPSET = 17


@contextlib.contextmanager
def _quiet():
    """The tracer warns about every Python-level shape check it freezes; those are expected here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def export_graph(module, args: tuple, path: Path, inputs: list[str], outputs: list[str], axes: dict,
                 opset: int) -> Path:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet(), torch.no_grad():
        torch.onnx.export(module.eval(), args, str(path), dynamo=False, opset_version=opset, input_names=inputs,
                          output_names=outputs, dynamic_axes=axes, do_constant_folding=True)
    import onnx

    onnx.checker.check_model(str(path))  # by path: also works past protobuf's 2 GB limit
    return path


def max_abs_diff(module, args: tuple, path: Path, inputs: list[str]) -> float:
    """onnxruntime vs torch on the same inputs."""
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = module(*args).float().numpy()
    feeds = {n: a.numpy() for n, a in zip(inputs, args)}
    got = sess.run(None, {k: v for k, v in feeds.items() if k in {i.name for i in sess.get_inputs()}})[0]
    return float(np.abs(got.astype(np.float32) - ref).max())


def to_fp16(src: Path, dst: Path) -> Path:
    """An fp16 copy of a graph with float32 inputs / outputs (casts at the boundary)."""
    import onnx
    import onnx_ir as ir
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with _quiet():
        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    # The converter appends the input casts after their consumers; the checker (and TensorRT's
    # parser) want nodes in topological order.
    graph = ir.from_proto(model)
    graph.graph.sort()
    onnx.save(ir.to_proto(graph), str(dst))
    onnx.checker.check_model(str(dst))
    return dst


# onnxruntime's transformer-optimizer fusions that have CUDA kernels only (or change the layout): kept off
CUDA_ONLY_FUSIONS = ("enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu", "enable_bias_add",
                     "enable_nhwc_conv", "enable_packed_qkv", "enable_packed_kv", "enable_bias_skip_layer_norm")


def fuse_unet(src: Path, dst: Path) -> dict[str, int]:
    """Write ``src`` with its attention, LayerNorm and GELU subgraphs fused for onnxruntime to ``dst`` (see the
    module docstring); how many nodes of each fused (com.microsoft) type it holds."""
    import logging

    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    opts = FusionOptions("unet")
    for name in CUDA_ONLY_FUSIONS:
        setattr(opts, name, False)
    level = logging.getLogger("onnxruntime.transformers").level
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    try:
        with _quiet(), open(os.devnull, "w") as null, contextlib.redirect_stderr(null):  # its progress bars
            model = optimize_model(str(src), model_type="unet", num_heads=0, hidden_size=0, opt_level=0,
                                   optimization_options=opts, use_gpu=False)
    finally:
        logging.getLogger("onnxruntime.transformers").setLevel(level)
    model.save_model_to_file(str(dst))
    import collections

    import onnx

    onnx.checker.check_model(str(dst))
    ops = collections.Counter(n.op_type for n in model.model.graph.node if n.domain == "com.microsoft")
    return dict(sorted(ops.items()))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def entry(root: Path, path: Path, dtype: str, **extra) -> dict:
    return {"file": str(path.relative_to(root)), "dtype": dtype, **graph_io(path), "sha256": sha256(path), **extra}


def pipeline_graphs(pipe, out: Path, opset: int) -> dict[str, tuple]:
    """Export the three pipeline graphs; {name: (module, example args, path, input names)}."""
    import torch

    from .graphs import TextEncoderGraph, UNetGraph, VaeDecoderGraph

    pipe.unet.set_default_attn_processor()  # SDPA / xformers processors do not export cleanly (issue 10)
    ace = getattr(pipe, "ace", None)
    tok = pipe.tokenizer
    ids = tok(["left pleural effusion", ""], padding="max_length", max_length=tok.model_max_length,
              truncation=True, return_tensors="pt").input_ids
    te = TextEncoderGraph(pipe.text_encoder, None if ace is None else ace.tokens.detach().float())
    te_args = (ids,) if ace is None else (ids, torch.tensor([1.0, 0.0]))
    te_in = ["input_ids"] + ([] if ace is None else ["conditional"])
    te_axes = {n: {0: "batch"} for n in te_in + ["text_embeddings"]}
    export_graph(te, te_args, out / "text_encoder.onnx", te_in, ["text_embeddings"], te_axes, opset)

    with torch.no_grad():
        ehs = te(*te_args)
    latent = pipe.unet.config.sample_size
    sample = torch.randn(2, pipe.unet.config.in_channels, latent, latent, generator=torch.Generator().manual_seed(0))
    un = UNetGraph(pipe.unet)
    un_args, un_in = (sample, torch.tensor([981.0, 981.0]), ehs), ["sample", "timestep", "encoder_hidden_states"]
    spatial = {0: "batch", 2: "latent_height", 3: "latent_width"}
    export_graph(un, un_args, out / "unet.onnx", un_in, ["noise_pred"],
                 {"sample": spatial, "timestep": {0: "batch"}, "encoder_hidden_states": {0: "batch"},
                  "noise_pred": spatial}, opset)

    vae = VaeDecoderGraph(pipe.vae)
    vae_args = (sample[:1] * pipe.vae.config.scaling_factor,)
    export_graph(vae, vae_args, out / "vae_decoder.onnx", ["latents"], ["image"],
                 {"latents": spatial, "image": {0: "batch", 2: "height", 3: "width"}}, opset)
    return {"text_encoder": (te, te_args, out / "text_encoder.onnx", te_in),
            "unet": (un, un_args, out / "unet.onnx", un_in),
            "vae_decoder": (vae, vae_args, out / "vae_decoder.onnx", ["latents"])}


def reward_graphs(reward_dir: str | None, out: Path, opset: int) -> dict[str, tuple]:
    """Export every trained reward under ``reward_dir``; {name: (module, args, path, inputs, facts)}."""
    import torch

    from training.reward.base import MANIFEST, available, load_reward

    from .graphs import REWARD_CONDITION, RewardGraph, example_condition, reward_input_names

    done = {}
    for name in available(reward_dir):
        reward = load_reward(name, model_dir=reward_dir)
        graph = RewardGraph(reward)
        size = reward.net.image_size
        buckets = int(reward.net.config.get("text_buckets", 0))
        args = (torch.rand(2, 1, size, size) * 2 - 1, *example_condition(reward.name, 2, buckets))
        inputs = reward_input_names(reward.name)
        axes = {n: {0: "batch"} for n in inputs + ["score"]}
        if "text_ids" in axes:
            axes["text_ids"], axes["text_mask"] = {0: "batch", 1: "ngrams"}, {0: "batch", 1: "ngrams"}
        path = export_graph(graph, args, out / "rewards" / f"{name}.onnx", inputs, ["score"], axes, opset)
        shutil.copyfile(reward.folder / MANIFEST, out / "rewards" / f"{name}.json")
        facts = {"kind": reward.name, "version": reward.version, "image_size": size,
                 "condition": REWARD_CONDITION[reward.name], "text_buckets": buckets,
                 "manifest": f"rewards/{name}.json"}
        done[name] = (graph, args, path, inputs, facts)
    return done


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("cxrgen", "torch", "onnx", "onnxruntime", "diffusers", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def model_facts(pipe) -> dict:
    ace = getattr(pipe, "ace", None)
    return {"image_size": int(pipe.vae.config.sample_size), "image_channels": int(pipe.vae.config.in_channels),
            "latent_channels": int(pipe.unet.config.in_channels),
            "vae_scale_factor": 2 ** (len(pipe.vae.config.block_out_channels) - 1),
            "scaling_factor": float(pipe.vae.config.scaling_factor),
            "max_length": int(pipe.tokenizer.model_max_length), "text_dim": int(pipe.text_encoder.config.hidden_size),
            "ace_tokens": 0 if ace is None else int(ace.tokens.shape[0]),
            "scheduler": type(pipe.scheduler).__name__}


def prepare_out(out: Path, force: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not force:
            raise ExportError(f"{out} exists and is not empty: choose a new folder or pass --force to overwrite")
        for sub in ("tokenizer", "scheduler", "rewards", "tensorrt"):
            shutil.rmtree(out / sub, ignore_errors=True)
        for f in out.glob("*.onnx"):  # unet.onnx, unet.fp16.onnx, unet.fused.onnx ...
            f.unlink()
    out.mkdir(parents=True, exist_ok=True)


def export_onnx(cfg: ExportConfig, force: bool = False) -> Path:
    """Write the export folder (see the module docstring); returns it."""
    from training.model.checkpoint import MANIFEST, CheckpointError, load_pipeline
    from training.reward.base import combined_weights

    if cfg.opset < MIN_OPSET:
        raise ExportError(f"--opset must be >= {MIN_OPSET}, got {cfg.opset}")
    src, out = Path(cfg.checkpoint), Path(cfg.out)
    try:
        pipe, manifest = load_pipeline(src)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    if pipe.unet.config.time_cond_proj_dim is not None:
        raise ExportError(f"{src}: U-Nets with a guidance embedding (time_cond_proj_dim) are not supported")
    prepare_out(out, force)
    # 1-3. the graphs, checked and compared with torch
    graphs = pipeline_graphs(pipe, out, cfg.opset)
    rewards = reward_graphs(cfg.reward_dir or None, out, cfg.opset) if cfg.rewards else {}
    diffs = {n: max_abs_diff(m, a, p, i) for n, (m, a, p, i) in graphs.items()}
    diffs.update({f"rewards/{n}": max_abs_diff(m, a, p, i) for n, (m, a, p, i, _) in rewards.items()})
    # 4. the fused U-Net for onnxruntime, then fp16 variants
    fused = {}
    if cfg.fuse:
        un, un_args, _, un_in = graphs["unet"]
        path = out / "unet.fused.onnx"
        ops = fuse_unet(out / "unet.onnx", path)
        if not ops.get("Attention") and not ops.get("MultiHeadAttention"):
            raise ExportError(f"onnxruntime's optimizer fused no attention in {out / 'unet.onnx'} ({ops}): "
                              f"export with --no-fuse")
        diffs["unet.fused"] = max_abs_diff(un, un_args, path, un_in)
        fused["unet"] = entry(out, path, "float32", fused_ops=ops)
    fp16 = {}
    if cfg.fp16:
        for name in ("text_encoder", "unet"):
            path = to_fp16(out / f"{name}.onnx", out / f"{name}.fp16.onnx")
            fp16[name] = entry(out, path, "float16")
    # 5. what inference needs besides the graphs
    shutil.copytree(src / "tokenizer", out / "tokenizer")
    shutil.copytree(src / "scheduler", out / "scheduler")
    if (src / MANIFEST).is_file():
        shutil.copyfile(src / MANIFEST, out / MANIFEST)
    doc = {
        "format": FORMAT_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {"checkpoint": str(src.resolve()), "version": manifest.version if manifest else src.name,
                   "stage": manifest.stage if manifest else None,
                   "manifest": MANIFEST if (src / MANIFEST).is_file() else None},
        "config": dataclasses.asdict(cfg), "opset": cfg.opset, "versions": versions(), "model": model_facts(pipe),
        "graphs": {n: entry(out, p, "float32") for n, (_, _, p, _) in graphs.items()},
        "fp16_graphs": fp16,
        "fused_graphs": fused,  # onnxruntime only (com.microsoft ops); TensorRT reads "graphs"
        "rewards": {n: entry(out, p, "float32", **facts) for n, (_, _, p, _, facts) in rewards.items()},
        "combined_weights": combined_weights(cfg.reward_dir or None) if rewards else {},
        "verified_max_abs_diff": diffs,  # onnxruntime vs torch on the tracing inputs, fp32
    }
    tmp = out / (EXPORT_MANIFEST + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, out / EXPORT_MANIFEST)
    return out
