"""TensorRT: ``cxrgen export tensorrt EXPORT_DIR`` builds engines; ``load`` runs ``GraphPipeline`` on them.

Build (TensorRT Python API, 10.x and 11.x):

1. Each graph of the export folder is parsed with ``trt.OnnxParser`` into a *strongly typed* network:
   TensorRT 11 removed ``BuilderFlag.FP16`` and weak typing (10.12 deprecated them), so the precision
   comes from the graph. fp16 engines are therefore built from the export's fp16 graphs
   (``cxrgen export onnx --fp16``; float32 I/O, fp16 inside), the VAE decoder always from its fp32
   graph (fp16 decoders overflow), the rewards from theirs.
2. One optimisation profile per engine: batch 1..max_batch (opt 1), the U-Net 1..2 x max_batch (classifier-
   free guidance doubles it), spatial axes fixed to the model's native latent size.
3. A timing cache shared by all builds (``tensorrt/timing-<trt>-sm<cc>.cache``): rebuilding is fast.
4. Every engine gets a sidecar ``<name>.engine.json``: TensorRT version, GPU name and compute capability
   it was built for, the ONNX file's sha256, the profile. An engine whose stamp does not match this
   machine (or whose ONNX changed) is refused with a clear error, or rebuilt with ``--rebuild``.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np

from .folder import ExportError, ExportFolder, read_export
from .pipeline import GraphPipeline

ENGINE_DIR = "tensorrt"
STAMP_KEYS = ("tensorrt", "gpu", "compute_capability")


class EngineMismatch(ExportError):
    """An engine built for another TensorRT version or GPU (or from another ONNX file)."""


# ---------------------------------------------------------------------- platform and stamps


def current_platform(device: int = 0) -> dict:
    """{"tensorrt", "gpu", "compute_capability"} of this machine; an ExportError without TensorRT or a GPU."""
    try:
        import tensorrt as trt
    except ImportError:
        raise ExportError("TensorRT is not installed: on a GPU machine, pip install -e '.[gpu]' "
                          "(tensorrt-cu13, pinned in pyproject.toml)") from None
    import torch

    if not torch.cuda.is_available():
        raise ExportError("TensorRT needs a CUDA GPU and none is visible here")
    major, minor = torch.cuda.get_device_capability(device)
    return {"tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(device),
            "compute_capability": f"{major}.{minor}"}


def _export_root(engine: Path) -> Path:
    """EXPORT_DIR of EXPORT_DIR/tensorrt/<name>.engine or EXPORT_DIR/tensorrt/rewards/<name>.engine."""
    folder = engine.parent.parent if engine.parent.name == "rewards" else engine.parent
    return folder.parent


def check_stamp(engine: Path, platform: dict, onnx_sha256: str | None = None) -> dict:
    """The engine's sidecar stamp, checked against ``platform`` (and the ONNX file it claims to come from)."""
    sidecar = engine.with_name(engine.name + ".json")
    if not sidecar.is_file():
        raise EngineMismatch(f"{engine} has no stamp ({sidecar.name} is missing): it cannot be checked against "
                             f"this machine; rebuild it with `cxrgen export tensorrt {_export_root(engine)} --rebuild`")
    try:
        stamp = json.loads(sidecar.read_text())
    except json.JSONDecodeError as e:
        raise EngineMismatch(f"{sidecar} is corrupt ({e}); rebuild with --rebuild") from None
    wrong = [f"{k} {stamp.get(k)!r} (this machine: {platform[k]!r})" for k in STAMP_KEYS if stamp.get(k) != platform[k]]
    if onnx_sha256 is not None and stamp.get("onnx_sha256") != onnx_sha256:
        wrong.append(f"ONNX graph {stamp.get('onnx')} has changed since the build")
    if wrong:
        raise EngineMismatch(f"{engine.name} was built for another machine: " + "; ".join(wrong)
                             + f". Rebuild it here with `cxrgen export tensorrt {_export_root(engine)} --rebuild`")
    return stamp


def write_stamp(engine: Path, platform: dict, onnx_file: str, onnx_sha256: str, precision: str,
                profile: dict) -> dict:
    stamp = {**{k: platform[k] for k in STAMP_KEYS}, "onnx": onnx_file, "onnx_sha256": onnx_sha256,
             "precision": precision, "profile": profile,
             "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    engine.with_name(engine.name + ".json").write_text(json.dumps(stamp, indent=2) + "\n")
    return stamp


# ------------------------------------------------------------------------------- building


def engine_plan(export: ExportFolder) -> list[tuple[str, dict, str]]:
    """(graph name, its export.json entry, precision) of every engine to build."""
    plan = []
    for name in ("text_encoder", "unet"):
        fp16 = export.manifest.get("fp16_graphs", {}).get(name)
        plan.append((name, fp16 or export.graph(name), "fp16" if fp16 else "fp32"))
    plan.append(("vae_decoder", export.graph("vae_decoder"), "fp32"))
    plan += [(f"rewards/{n}", e, "fp32") for n, e in export.rewards.items()]
    return plan


def profile_shapes(name: str, entry: dict, max_batch: int, latent: int) -> dict[str, list[list[int]]]:
    """{input: [min, opt, max]} shapes: batch 1..max_batch (U-Net 2x), latents at the native size."""
    top = 2 * max_batch if name == "unet" else max_batch
    shapes = {}
    for spec in entry["inputs"]:
        lo, opt, hi = [], [], []
        for dim in spec["shape"]:
            if dim == "batch":
                a, b, c = 1, 2 if name == "unet" else 1, top
            elif dim in ("latent_height", "latent_width"):
                a = b = c = latent
            elif dim == "ngrams":
                a, b, c = 1, 64, 1024
            elif isinstance(dim, int) and dim > 0:
                a = b = c = dim
            else:
                raise ExportError(f"{entry['file']}: input {spec['name']} has an axis {dim!r} with no profile")
            lo.append(a), opt.append(b), hi.append(c)
        shapes[spec["name"]] = [lo, opt, hi]
    return shapes


def build_engine(onnx_path: Path, engine_path: Path, shapes: dict, cache_path: Path, workspace_gb: float) -> None:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)  # always on (and ignored) in 11.x
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(f"TensorRT could not build an engine from {onnx_path} (see the log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(plan))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))


def engine_path(export: ExportFolder, name: str) -> Path:
    return export.root / ENGINE_DIR / f"{name}.engine"


def build_engines(export_dir: str | Path, max_batch: int = 16, workspace_gb: float = 4.0,
                  rebuild: bool = False) -> dict[str, str]:
    """Build (or keep, when stamped for this machine) every engine; {graph: "built" | "kept"}."""
    if not 1 <= max_batch <= 256:
        raise ExportError(f"--max-batch must be in [1, 256], got {max_batch}")
    export = read_export(export_dir)
    platform = current_platform()
    cc = platform["compute_capability"].replace(".", "")
    cache = export.root / ENGINE_DIR / f"timing-{platform['tensorrt']}-sm{cc}.cache"
    latent = int(export.model["image_size"]) // int(export.model["vae_scale_factor"])
    done = {}
    for name, entry, precision in engine_plan(export):
        path = engine_path(export, name)
        if path.is_file() and not rebuild:
            check_stamp(path, platform, entry["sha256"])  # refuses a mismatched engine
            done[name] = "kept"
            continue
        shapes = profile_shapes(name, entry, max_batch, latent)
        build_engine(export.path(entry), path, shapes, cache, workspace_gb)
        write_stamp(path, platform, entry["file"], entry["sha256"], precision, shapes)
        done[name] = "built"
    return done


# -------------------------------------------------------------------------------- running


class TrtRunner:
    """One execution context per engine; inputs and outputs as CUDA tensors (torch owns the memory)."""

    def __init__(self, export: ExportFolder, device: str = "cuda") -> None:
        self.export, self.device = export, device
        platform = current_platform()
        self.engines, self.max_batch = {}, 256
        for name, entry, _ in engine_plan(export):
            path = engine_path(export, name)
            if not path.is_file():
                raise ExportError(f"no TensorRT engine {path}: build them with `cxrgen export tensorrt {export.root}`")
            stamp = check_stamp(path, platform, entry["sha256"])
            batch_max = stamp["profile"][entry["inputs"][0]["name"]][2][0]
            self.max_batch = min(self.max_batch, batch_max // 2 if name == "unet" else batch_max)
            self.engines[name] = path
        self.contexts: dict = {}

    def context(self, name: str):
        if name not in self.contexts:
            import tensorrt as trt

            runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            engine = runtime.deserialize_cuda_engine(self.engines[name].read_bytes())
            if engine is None:
                raise ExportError(f"TensorRT cannot load {self.engines[name]}; rebuild with --rebuild")
            self.contexts[name] = (engine, engine.create_execution_context())
        return self.contexts[name]

    def run(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tensorrt as trt
        import torch

        types = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                 trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64, trt.DataType.BOOL: torch.bool}
        engine, ctx = self.context(name)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        keep, outputs = [], {}
        for n in names:
            if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT:
                t = torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device, types[engine.get_tensor_dtype(n)])
                ctx.set_input_shape(n, tuple(t.shape))
                ctx.set_tensor_address(n, t.data_ptr())
                keep.append(t)
        for n in names:
            if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT:
                t = torch.empty(tuple(ctx.get_tensor_shape(n)), dtype=types[engine.get_tensor_dtype(n)],
                                device=self.device)
                ctx.set_tensor_address(n, t.data_ptr())
                outputs[n] = t
        stream = torch.cuda.current_stream(self.device)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise ExportError(f"TensorRT failed to run {name}")
        stream.synchronize()
        return {n: t.float().cpu().numpy() for n, t in outputs.items()}


def load(model: str | Path, device: str = "cuda") -> GraphPipeline:
    """The ``tensorrt`` backend (entry point ``cxrgen.backends``): an export folder with engines -> pipeline."""
    export = read_export(model)
    if not device.startswith("cuda"):
        raise ExportError(f"the tensorrt backend runs on a CUDA GPU: pass --device cuda (got {device!r})")
    return GraphPipeline(export, TrtRunner(export, device), "tensorrt")
