"""The onnxruntime backend: ``GraphPipeline`` over onnxruntime InferenceSessions.

Providers: the CPU provider here; where onnxruntime-gpu is installed and a GPU is present,
``device="cuda"`` takes the CUDA provider (fp16 graphs when the export has them), and
``CXRGEN_ORT_PROVIDERS=TensorrtExecutionProvider,CUDAExecutionProvider,CPUExecutionProvider``
picks any list explicitly. Session options: graph optimisation level ALL (fastest of BASIC / EXTENDED / ALL on the 2-core
CPU), intra-op threads = the cores this process may use, no spinning (see ``session_options``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .folder import ExportError, read_export
from .pipeline import GraphPipeline


def providers_for(device: str) -> list[str]:
    """The execution providers for ``device`` ("cpu", "cuda", "cuda:N"); an ExportError when unavailable."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = os.environ.get("CXRGEN_ORT_PROVIDERS")
    if wanted:
        chosen = [p.strip() for p in wanted.split(",") if p.strip()]
    elif device == "cpu":
        chosen = ["CPUExecutionProvider"]
    elif device.startswith("cuda"):
        chosen = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        raise ExportError(f"unknown device {device!r} for onnxruntime: cpu or cuda")
    missing = [p for p in chosen if p not in available]
    if missing:
        raise ExportError(f"onnxruntime has no {', '.join(missing)} here (available: {', '.join(available)}); "
                          f"GPU providers need onnxruntime-gpu: pip install '.[gpu]' on a GPU machine")
    return chosen


def session_options(threads: int = 0):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
    # Worker threads sleep instead of spinning between ops: measured on the 2-core CPU with another job
    # running, spinning halved the U-Net's throughput (0.171 s vs 0.081 s per batch-8 call); set
    # CXRGEN_ORT_SPIN=1 on a dedicated machine.
    opts.add_session_config_entry("session.intra_op.allow_spinning", os.environ.get("CXRGEN_ORT_SPIN", "0"))
    opts.log_severity_level = 3  # errors only: a server log is not the place for graph-fusion notes
    return opts


class OrtRunner:
    """One InferenceSession per graph, created on first use (a text-only call never loads the U-Net)."""

    max_batch = 256

    def __init__(self, export, device: str = "cpu", precision: str = "auto", threads: int = 0) -> None:
        self.export = export
        self.providers = providers_for(device)
        gpu = self.providers[0] != "CPUExecutionProvider"
        self.precision = ("fp16" if gpu and export.manifest.get("fp16_graphs") else "fp32") \
            if precision == "auto" else precision
        if self.precision not in ("fp32", "fp16"):
            raise ExportError(f"precision must be auto, fp32 or fp16, got {precision!r}")
        self.options = session_options(threads)
        self.sessions: dict = {}

    def session(self, name: str):
        if name not in self.sessions:
            import onnxruntime as ort

            if name.startswith("rewards/"):
                entry = self.export.rewards[name.split("/", 1)[1]]
            else:
                entry = self.export.graph(name, self.precision, fused=True)
            try:
                self.sessions[name] = ort.InferenceSession(str(self.export.path(entry)), self.options,
                                                           providers=self.providers)
            except Exception as e:  # onnxruntime raises its own Fail / InvalidGraph types
                raise ExportError(f"onnxruntime cannot load {self.export.path(entry)}: {e}") from e
        return self.sessions[name]

    def run(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sess = self.session(name)
        outputs = [o.name for o in sess.get_outputs()]
        return dict(zip(outputs, sess.run(outputs, feeds)))


def load(model: str | Path, device: str = "cpu", precision: str = "auto", threads: int = 0) -> GraphPipeline:
    """The ``onnxruntime`` backend (entry point ``cxrgen.backends``): an export folder -> pipeline."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ExportError("the onnxruntime backend needs onnxruntime: pip install -e . (it is a pinned "
                          "dependency) or onnxruntime-gpu on a GPU machine") from None
    export = read_export(model)
    return GraphPipeline(export, OrtRunner(export, device, precision, threads), "onnxruntime")
