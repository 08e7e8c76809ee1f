"""The export folder: self-describing, so inference needs no torch checkpoint.

Layout (what ``cxrgen export onnx CHECKPOINT OUT`` writes)::

    OUT/export.json            this manifest: source checkpoint, graphs with their inputs / outputs,
                               dtype, opset, model facts, library versions, the export config
    OUT/cxrgen_manifest.json   the checkpoint's own manifest, copied (absent for a foreign SD folder)
    OUT/tokenizer/             the checkpoint's tokenizer, copied
    OUT/scheduler/             the checkpoint's scheduler config, copied
    OUT/text_encoder.onnx, unet.onnx, vae_decoder.onnx          fp32 graphs
    OUT/text_encoder.fp16.onnx, unet.fp16.onnx                  with --fp16 (the VAE decoder stays fp32)
    OUT/unet.fused.onnx                                         onnxruntime's fused U-Net (unless --no-fuse)
    OUT/rewards/<kind>.onnx, rewards/<kind>.json                each reward graph and its reward manifest
    OUT/tensorrt/                                                engines, added by ``cxrgen export tensorrt``

``read_export`` validates all of that and names what is missing, so a broken folder fails with
one clear sentence instead of deep inside a runtime.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

EXPORT_MANIFEST = "export.json"
FORMAT_VERSION = 1
PIPELINE_GRAPHS = ("text_encoder", "unet", "vae_decoder")


class ExportError(ValueError):
    """A user-facing problem with an export folder or a backend (the CLI prints it in one line)."""


@dataclasses.dataclass
class ExportConfig:
    """How ``cxrgen export onnx`` was run (saved in export.json)."""

    checkpoint: str  # the checkpoint folder exported (a cxrgen checkpoint or a diffusers SD folder)
    out: str  # the export folder written
    opset: int = 17  # ONNX opset of every graph (>= 17: LayerNormalization is one op there)
    fp16: bool = False  # also write fp16 text encoder and U-Net graphs (I/O stays float32)
    reward_dir: str = ""  # folder of reward folders to export with the model; "" -> models/rewards
    rewards: bool = True  # export every trained reward under reward_dir
    fuse: bool = True  # also write unet.fused.onnx: attention / LayerNorm / GELU fused for onnxruntime


def graph_io(path: Path) -> dict:
    """{"inputs": [...], "outputs": [...]}: each {"name", "dtype", "shape"} (symbolic axes by name)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(values) -> list[dict]:
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                        "shape": shape})
        return out

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


@dataclasses.dataclass
class ExportFolder:
    root: Path
    manifest: dict

    @property
    def version(self) -> str:
        return str(self.manifest["source"].get("version") or self.root.name)

    @property
    def model(self) -> dict:
        return self.manifest["model"]

    def graph(self, name: str, precision: str = "fp32", fused: bool = False) -> dict:
        """The entry of graph ``name`` ("unet", "rewards/plausibility", ...) in ``precision`` (fp32 fallback).
        ``fused=True`` (onnxruntime runners only): the fp32 graph fused for onnxruntime where the export has one."""
        if fused and precision == "fp32" and name in self.manifest.get("fused_graphs", {}):
            return self.manifest["fused_graphs"][name]
        table = self.manifest["graphs"] if precision == "fp32" else self.manifest.get("fp16_graphs", {})
        entry = table.get(name) or self.manifest["graphs"].get(name)
        if entry is None:
            raise ExportError(f"{self.root / EXPORT_MANIFEST} lists no graph {name!r}")
        return entry

    def path(self, entry: dict) -> Path:
        return self.root / entry["file"]

    @property
    def rewards(self) -> dict:
        return self.manifest.get("rewards", {})


def read_export(folder: str | Path, graph_files: bool = True) -> ExportFolder:
    """Read and validate an export folder; an ExportError names what is wrong. ``graph_files=False`` accepts a
    folder without the graph files (the copy inside a Triton repository's pipeline model: its graphs are the
    repository's other models)."""
    root = Path(folder)
    if not root.is_dir():
        raise ExportError(f"no export folder at {root}")
    path = root / EXPORT_MANIFEST
    if not path.is_file():
        if (root / "model_index.json").is_file():
            raise ExportError(f"{root} is a torch checkpoint, not an export folder: export it with "
                              f"`cxrgen export onnx {root} OUT` and pass OUT, or use --backend torch")
        raise ExportError(f"{root} is not an export folder: {EXPORT_MANIFEST} is missing "
                          f"(write one with `cxrgen export onnx CHECKPOINT {root}`)")
    try:
        manifest = json.loads(path.read_text())
        fmt = manifest["format"]
        graphs = manifest["graphs"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ExportError(f"{path} is corrupt: {type(e).__name__}: {e}") from None
    if fmt != FORMAT_VERSION:
        raise ExportError(f"{path}: format {fmt} is not supported (this cxrgen reads {FORMAT_VERSION})")
    problems = [f"graph {g!r} is not listed" for g in PIPELINE_GRAPHS if g not in graphs]
    entries = [*graphs.values(), *manifest.get("fp16_graphs", {}).values(),
               *manifest.get("fused_graphs", {}).values(), *(r for r in manifest.get("rewards", {}).values())]
    if graph_files:
        problems += [f"{e['file']} is missing" for e in entries if not (root / e["file"]).is_file()]
    for sub, what in (("tokenizer", "tokenizer_config.json"), ("scheduler", "scheduler_config.json")):
        if not (root / sub / what).is_file():
            problems.append(f"{sub}/{what} is missing")
    if problems:
        raise ExportError(f"export folder {root} is incomplete: " + "; ".join(problems)
                          + " (re-run `cxrgen export onnx`)")
    return ExportFolder(root, manifest)
