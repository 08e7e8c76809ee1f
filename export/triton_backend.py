"""The ``triton`` backend: ``cxrgen generate --backend triton`` and the service, through a Triton server.

``load(MODEL)`` takes the repository written by ``cxrgen export triton`` (or the export folder it was written
from): the local copy says what the server should serve, and is checked against the server's pipeline model
(its ``export_sha256`` parameter), so a client never mixes one model's reward graphs with another's images.
The server is at ``url``, else ``$CXRGEN_TRITON_URL``, else http://127.0.0.1:8000; ``grpc://host:8001``
talks gRPC. Images come from one request per batch to the pipeline model (the sampling loop runs on the
server); ``scorer()`` runs the reward graphs as Triton models, the conditions encoded here by the training
code, exactly as the onnxruntime backend does (``GraphPipeline.score_rewards``).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from .folder import EXPORT_MANIFEST, ExportError, read_export
from .pipeline import GraphPipeline
from .triton import PIPELINE_MODEL, REPO_MANIFEST, encode_texts, from_wire, model_name, sha256_file, to_wire

URL_ENV = "CXRGEN_TRITON_URL"
DEFAULT_URL = "http://127.0.0.1:8000"


def parse_url(url: str) -> tuple[str, str]:
    """("http" | "grpc", "host:port") of http://..., https://..., grpc://... or a bare host:port (HTTP)."""
    parsed = urlparse(url if "://" in url else f"http://{url}")
    if parsed.scheme not in ("http", "https", "grpc") or not parsed.netloc:
        raise ExportError(f"Triton URL {url!r}: expected http://HOST:PORT or grpc://HOST:PORT")
    return ("grpc" if parsed.scheme == "grpc" else "http"), parsed.netloc


class TritonClient:
    """``infer(model, inputs, outputs)`` over HTTP or gRPC; one tritonclient client per thread (the HTTP client
    is gevent-based and must stay on the thread that made it)."""

    def __init__(self, url: str, timeout: float = 600.0) -> None:
        self.url, self.timeout = url, timeout
        self.protocol, self.address = parse_url(url)
        self._local = threading.local()

    @property
    def module(self):
        if self.protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        return module

    @property
    def client(self):
        if getattr(self._local, "client", None) is None:
            if self.protocol == "grpc":
                self._local.client = self.module.InferenceServerClient(self.address)
            else:
                self._local.client = self.module.InferenceServerClient(
                    self.address, connection_timeout=60.0, network_timeout=self.timeout)
        return self._local.client

    def call(self, what: str, fn, *args, **kw):
        """``fn`` of the client; Triton's and the network's errors as one ExportError naming the server."""
        from tritonclient.utils import InferenceServerException

        try:
            return fn(*args, **kw)
        except InferenceServerException as e:
            raise ExportError(f"Triton at {self.url}: {what}: {e.message()}") from None
        except (OSError, ConnectionError) as e:
            raise ExportError(f"cannot reach Triton at {self.url} ({what}: {e}); start it (`cxrgen export "
                              f"triton-serve REPO`) or set {URL_ENV}") from None

    def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        from tritonclient.utils import np_to_triton_dtype

        m = self.module
        reqs = []
        for name, a in inputs.items():
            a = np.ascontiguousarray(a)
            x = m.InferInput(name, list(a.shape), np_to_triton_dtype(a.dtype))
            x.set_data_from_numpy(a)
            reqs.append(x)
        wanted = [m.InferRequestedOutput(o) for o in outputs]
        kw = {"client_timeout": self.timeout} if self.protocol == "grpc" else {}
        result = self.call(f"model {model}", self.client.infer, model, reqs, outputs=wanted, **kw)
        return {o: result.as_numpy(o) for o in outputs}

    def model_config(self, model: str) -> dict:
        if self.protocol == "grpc":
            return self.call(f"model {model}", self.client.get_model_config, model, as_json=True)["config"]
        return self.call(f"model {model}", self.client.get_model_config, model)

    def ready(self, model: str) -> bool:
        return bool(self.call(f"model {model}", self.client.is_model_ready, model))


class TritonRunner:
    """``run(graph, feeds)`` as an inference request to the graph's Triton model (reward graphs, here)."""

    def __init__(self, export, client: TritonClient, max_batch: int) -> None:
        self.export, self.client, self.max_batch = export, client, max_batch

    def run(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        entry = self.export.rewards[name.split("/", 1)[1]] if name.startswith("rewards/") else self.export.graph(name)
        outs = self.client.infer(model_name(name), to_wire(feeds, entry), [o["name"] for o in entry["outputs"]])
        return from_wire(outs, entry)


def local_export(model: Path) -> tuple[Path, str]:
    """(export folder to read, sha256 of the export.json the server's repository was written from)."""
    if (model / REPO_MANIFEST).is_file():
        doc = json.loads((model / REPO_MANIFEST).read_text())
        return model / PIPELINE_MODEL / "1" / "export", doc["export_sha256"]
    if (model / EXPORT_MANIFEST).is_file():
        return model, sha256_file(model / EXPORT_MANIFEST)
    raise ExportError(f"--backend triton: {model} is neither a Triton repository (`cxrgen export triton`) nor an "
                      f"export folder (`cxrgen export onnx`)")


class TritonBackend(GraphPipeline):
    """The backend interface (version, native_size, set_scheduler, generate, run_batch, scorer) over Triton."""

    def __init__(self, model: Path, url: str, timeout: float = 600.0) -> None:
        from training.generation import SCHEDULERS

        folder, sha = local_export(model)
        export = read_export(folder, graph_files=False)
        self.client = TritonClient(url, timeout)
        # 1. the server serves this model: pipeline ready, same export
        if not self.client.ready(PIPELINE_MODEL):
            raise ExportError(f"Triton at {url}: model {PIPELINE_MODEL} is not ready (see the server's log)")
        config = self.client.model_config(PIPELINE_MODEL)
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        if params.get("export_sha256") != sha:
            raise ExportError(f"Triton at {url} serves model {params.get('model_version')!r} from another export "
                              f"than {model} ({export.version!r}); point --model (CXRGEN_MODEL) at the repository "
                              f"the server loaded")
        max_batch = int(config["max_batch_size"])
        super().__init__(export, TritonRunner(export, self.client, max_batch), "triton")
        self.url, self.max_batch = url, max_batch
        names = {v: k for k, v in SCHEDULERS.items()}
        self.scheduler_name = names.get(type(self.scheduler).__name__, "ddim")

    def set_scheduler(self, name: str) -> None:
        from training.generation import SCHEDULERS

        if name not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {name!r}; known: {sorted(SCHEDULERS)}")
        self.scheduler_name = name  # the server's pipeline model builds it, per request

    def run_batch(self, prompts, negatives, seeds, steps, guidance, scheduler, size) -> np.ndarray:
        """Images for explicit seeds: one pipeline request per ``max_batch`` images."""
        out = []
        for i in range(0, len(prompts), self.max_batch):
            n = len(prompts[i:i + self.max_batch])
            col = lambda v, dtype: np.full((n, 1), v, dtype=dtype)  # noqa: E731
            inputs = {"prompt": encode_texts(list(prompts[i:i + n])),
                      "negative_prompt": encode_texts([x or "" for x in negatives[i:i + n]]),
                      "seed": np.asarray(seeds[i:i + n], dtype=np.int64).reshape(n, 1),
                      "steps": col(steps, np.int32), "guidance": col(guidance, np.float32),
                      "size": col(size, np.int32), "scheduler": encode_texts([scheduler] * n)}
            out.append(self.client.infer(PIPELINE_MODEL, inputs, ["image"])["image"].astype(np.float32))
        return np.concatenate(out)

    def generate(self, prompts, seed, steps, guidance, negative, batch_size, size) -> np.ndarray:
        """Images (N, H, W) in [0, 1], image i from seed + i (as ``training.generation.generate``)."""
        f = int(self.facts["vae_scale_factor"])
        if size % f:
            raise ExportError(f"--size must be a multiple of {f}, got {size}")
        batch_size = max(1, min(batch_size, self.max_batch))
        out = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            out.append(self.run_batch(chunk, [negative] * len(chunk), [seed + start + i for i in range(len(chunk))],
                                      steps, guidance, self.scheduler_name, size))
        return np.concatenate(out)


def load(model: str | Path, device: str = "cpu", url: str | None = None, timeout: float = 600.0) -> TritonBackend:
    """The ``triton`` backend (entry point ``cxrgen.backends``). ``device`` is the server's business (its
    instance groups) and is ignored here."""
    try:
        import tritonclient  # noqa: F401
    except ImportError:
        raise ExportError("the triton backend needs tritonclient: pip install -e . (it is a pinned dependency)") \
            from None
    return TritonBackend(Path(model), url or os.environ.get(URL_ENV) or DEFAULT_URL, timeout)
