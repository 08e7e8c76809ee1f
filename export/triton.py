"""``cxrgen export triton EXPORT_DIR REPO``: a Triton model repository from an export folder (issue 10, section 4).

Layout::

    REPO/cxrgen_triton.json                 what was written: source export, platform, models, versions
    REPO/cxrgen_text_encoder/config.pbtxt   one model per graph, dynamic batching, batch 1..--max-batch
    REPO/cxrgen_text_encoder/1/model.onnx   the graph (+ model.py, triton_models/component.py, for --platform python)
    REPO/cxrgen_unet/ ...                   batch 1..2 x --max-batch (classifier-free guidance doubles it)
    REPO/cxrgen_vae_decoder/ ...
    REPO/cxrgen_reward_<name>/ ...          every reward graph of the export
    REPO/cxrgen_pipeline/config.pbtxt       the sampling loop (python backend, BLS to the models above)
    REPO/cxrgen_pipeline/1/model.py, 1/export/   (export.json, tokenizer, scheduler, checkpoint manifest)

``--platform``: ``python`` (default) serves each graph from a python-backend model running onnxruntime (the
only backend of the ``tritonserver`` that nvidia-pytriton ships, which the tests and ``cxrgen export
triton-serve`` use); ``onnxruntime`` writes ``platform: "onnxruntime_onnx"`` configs for a full Triton server;
``tensorrt`` writes ``platform: "tensorrt_plan"`` models from ``cxrgen export tensorrt``'s engines (for the
Triton release whose TensorRT built them). The pipeline model is python in every variant.

Wire conventions shared by the pipeline model and the client backend (``triton_backend.py``): graph
``rewards/x`` is model ``cxrgen_reward_x``; a graph tensor of rank 1 (batch only) travels as (N, 1)
(``to_wire`` / ``from_wire``); text travels as UTF-8 bytes in zero-padded UINT8 rows (``encode_texts``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from .folder import EXPORT_MANIFEST, ExportError, read_export

PREFIX = "cxrgen_"
PIPELINE_MODEL = "cxrgen_pipeline"
REPO_MANIFEST = "cxrgen_triton.json"
PLATFORMS = {"python": None, "onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}
DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}
TEMPLATES = Path(__file__).resolve().parent / "triton_models"


# ---------------------------------------------------------------------- wire conventions


def model_name(graph: str) -> str:
    """Graph name of export.json -> Triton model name ("rewards/posture" -> "cxrgen_reward_posture")."""
    return PREFIX + ("reward_" + graph.split("/", 1)[1] if graph.startswith("rewards/") else graph)


def _ranks(entry: dict, key: str) -> dict[str, int]:
    return {t["name"]: len(t["shape"]) for t in entry[key]}


def to_wire(feeds: dict[str, np.ndarray], entry: dict) -> dict[str, np.ndarray]:
    """Rank-1 graph inputs as (N, 1): Triton's dims exclude the batch axis and cannot be empty."""
    ranks = _ranks(entry, "inputs")
    return {k: (v.reshape(-1, 1) if ranks[k] == 1 else v) for k, v in feeds.items()}


def from_wire(outputs: dict[str, np.ndarray], entry: dict) -> dict[str, np.ndarray]:
    ranks = _ranks(entry, "outputs")
    return {k: (v.reshape(-1) if ranks.get(k) == 1 else v) for k, v in outputs.items()}


def encode_texts(texts: list[str]) -> np.ndarray:
    """UTF-8 rows, zero-padded: (N, max(1, longest)) uint8."""
    raw = [t.encode("utf-8") for t in texts]
    out = np.zeros((len(raw), max([1, *map(len, raw)])), dtype=np.uint8)
    for i, b in enumerate(raw):
        out[i, :len(b)] = np.frombuffer(b, dtype=np.uint8)
    return out


def decode_texts(rows: np.ndarray) -> list[str]:
    if rows.dtype != np.uint8 or rows.ndim != 2:
        raise ValueError(f"text must be (N, L) uint8 UTF-8 rows, got {rows.dtype} {rows.shape}")
    return [bytes(r).rstrip(b"\0").decode("utf-8") for r in rows]


# ---------------------------------------------------------------------- config.pbtxt


def _dims(shape: list, fixed: dict[str, int] | None = None) -> list[int]:
    """export.json's shape (first axis "batch") -> Triton dims: symbolic axes -1 (or their ``fixed`` size),
    rank 1 -> [1]."""
    rest = [d if isinstance(d, int) else (fixed or {}).get(d, -1) for d in shape[1:]]
    return rest or [1]


def _tensor(t: dict, platform: str | None, fixed: dict[str, int] | None = None) -> str:
    dims = ", ".join(map(str, _dims(t["shape"], fixed)))
    line = f'name: "{t["name"]}" data_type: {DTYPES[t["dtype"]]} dims: [ {dims} ]'
    if len(t["shape"]) == 1 and platform is not None:  # the graph takes (N,), clients send (N, 1)
        line += " reshape: { shape: [ ] }"
    return "  { " + line + " }"


def component_config(name: str, entry: dict, platform: str, max_batch: int, kind: str, instances: int,
                     fixed: dict[str, int] | None = None) -> str:
    plat = PLATFORMS[platform]
    head = f'name: "{name}"\n' + (f'platform: "{plat}"\n' if plat else 'backend: "python"\n')
    return (head + f"max_batch_size: {max_batch}\n"
            + "input [\n" + ",\n".join(_tensor(t, plat, fixed) for t in entry["inputs"]) + "\n]\n"
            + "output [\n" + ",\n".join(_tensor(t, plat, fixed) for t in entry["outputs"]) + "\n]\n"
            # no queue delay: a lone request runs at once; requests that arrive meanwhile batch together
            + "dynamic_batching { max_queue_delay_microseconds: 0 }\n"
            + f"instance_group [ {{ kind: KIND_{kind.upper()} count: {instances} }} ]\n")


def pipeline_config(max_batch: int, component_max_batch: int, params: dict[str, str], instances: int) -> str:
    rows = [("prompt", "TYPE_UINT8", "-1"), ("negative_prompt", "TYPE_UINT8", "-1"), ("seed", "TYPE_INT64", "1"),
            ("steps", "TYPE_INT32", "1"), ("guidance", "TYPE_FP32", "1"), ("size", "TYPE_INT32", "1"),
            ("scheduler", "TYPE_UINT8", "-1")]
    params = {**params, "component_max_batch": str(component_max_batch)}
    return (f'name: "{PIPELINE_MODEL}"\nbackend: "python"\nmax_batch_size: {max_batch}\n'
            + "input [\n" + ",\n".join(f'  {{ name: "{n}" data_type: {t} dims: [ {d} ] }}' for n, t, d in rows)
            + "\n]\n"
            + 'output [\n  { name: "image" data_type: TYPE_FP32 dims: [ -1, -1 ] }\n]\n'
            + "dynamic_batching { max_queue_delay_microseconds: 0 }\n"
            + f"instance_group [ {{ kind: KIND_CPU count: {instances} }} ]\n"
            + "".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}\n' for k, v in params.items()))


# ---------------------------------------------------------------------- the repository


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _graph_file(export, graph: str, entry: dict, platform: str) -> Path:
    if platform != "tensorrt":
        return export.path(entry)
    engine = export.root / "tensorrt" / (graph + ".engine")
    if not engine.is_file():
        raise ExportError(f"--platform tensorrt: {engine} is missing; build the engines first with "
                          f"`cxrgen export tensorrt {export.root}` (on the GPU the server runs on)")
    return engine


def write_component(export, graph: str, entry: dict, out: Path, platform: str, max_batch: int, kind: str,
                    instances: int) -> str:
    name = model_name(graph)
    folder = out / name / "1"
    folder.mkdir(parents=True)
    src = _graph_file(export, graph, entry, platform)
    shutil.copyfile(src, folder / ("model.plan" if platform == "tensorrt" else "model.onnx"))
    if platform == "python":
        shutil.copyfile(TEMPLATES / "component.py", folder / "model.py")
    fixed = None
    if platform == "tensorrt":  # the engines' profiles fix spatial axes at the native size (export/tensorrt.py)
        f, size = int(export.model["vae_scale_factor"]), int(export.model["image_size"])
        fixed = {"latent_height": size // f, "latent_width": size // f, "height": size, "width": size}
    (out / name / "config.pbtxt").write_text(component_config(name, entry, platform, max_batch, kind, instances,
                                                              fixed))
    return name


def write_pipeline(export, out: Path, max_batch: int, component_max_batch: int, instances: int,
                   precision: str) -> str:
    folder = out / PIPELINE_MODEL / "1"
    (folder / "export").mkdir(parents=True)
    shutil.copyfile(TEMPLATES / "pipeline.py", folder / "model.py")
    for sub in ("tokenizer", "scheduler"):
        shutil.copytree(export.root / sub, folder / "export" / sub)
    manifest = dict(export.manifest)
    if precision == "fp16":  # the pipeline reads the graphs' I/O from here; fp16 graphs keep float32 I/O
        manifest["graphs"] = {**manifest["graphs"], **manifest.get("fp16_graphs", {})}
    (folder / "export" / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    for extra in ("cxrgen_manifest.json",):
        if (export.root / extra).is_file():
            shutil.copyfile(export.root / extra, folder / "export" / extra)
    params = {"model_version": export.version, "export_sha256": sha256_file(export.root / EXPORT_MANIFEST)}
    (out / PIPELINE_MODEL / "config.pbtxt").write_text(pipeline_config(max_batch, component_max_batch, params,
                                                                       instances))
    return PIPELINE_MODEL


def write_repository(export_dir: str | Path, out: str | Path, platform: str = "python", max_batch: int = 16,
                     kind: str = "cpu", instances: int = 1, precision: str = "fp32", force: bool = False) -> Path:
    """Write the repository (see the module docstring); returns its folder."""
    # 1. check the arguments and the export before writing anything
    if platform not in PLATFORMS:
        raise ExportError(f"unknown --platform {platform!r}; known: {sorted(PLATFORMS)}")
    if kind not in ("cpu", "gpu"):
        raise ExportError(f"--kind must be cpu or gpu, got {kind!r}")
    if precision not in ("fp32", "fp16"):
        raise ExportError(f"--precision must be fp32 or fp16, got {precision!r}")
    if not 1 <= max_batch <= 256 or instances < 1:
        raise ExportError(f"--max-batch must be in [1, 256] and --instances >= 1, got {max_batch}, {instances}")
    export = read_export(export_dir)
    if precision == "fp16" and not export.manifest.get("fp16_graphs"):
        raise ExportError(f"--precision fp16: {export.root} has no fp16 graphs (export with --fp16)")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise ExportError(f"{out} exists and is not empty: choose a new folder or pass --force to overwrite")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    # 2. one model per graph (U-Net: twice the batch for classifier-free guidance), then the pipeline
    models = {}
    for graph in ("text_encoder", "unet", "vae_decoder"):
        # fp16 decoders overflow; onnxruntime runs the fused U-Net where the export has one (same I/O)
        entry = export.graph(graph, "fp32" if graph == "vae_decoder" else precision,
                             fused=platform != "tensorrt")
        mb = 2 * max_batch if graph == "unet" else max_batch
        models[graph] = write_component(export, graph, entry, out, platform, mb, kind, instances)
    for name, entry in export.rewards.items():
        models[f"rewards/{name}"] = write_component(export, f"rewards/{name}", entry, out, platform, max_batch,
                                                    kind, instances)
    models["pipeline"] = write_pipeline(export, out, max_batch, max_batch, instances, precision)
    # 3. what was written, last (its presence marks a finished repository)
    doc = {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "export": str(export.root.resolve()), "model_version": export.version,
           "export_sha256": sha256_file(export.root / EXPORT_MANIFEST), "platform": platform, "kind": kind,
           "precision": precision, "max_batch": max_batch, "instances": instances, "models": models}
    tmp = out / (REPO_MANIFEST + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, out / REPO_MANIFEST)
    return out
