"""The service's configuration: one dataclass, read from the environment (12-factor, for Kubernetes)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _env(name: str, default: str | None = None) -> str | None:
    v = os.environ.get(name)
    return v if v not in (None, "") else default


@dataclasses.dataclass
class ServeConfig:
    """Every setting, with the environment variable that sets it."""

    model: str | None = None  # CXRGEN_MODEL: a checkpoint folder, "bento:<tag>" (BentoML model store), an export
    # folder (`cxrgen export onnx`) or a Triton repository (`cxrgen export triton`)
    backend: str | None = None  # CXRGEN_BACKEND: torch | onnxruntime | tensorrt | triton; unset: torch for a
    # checkpoint, onnxruntime for an export folder, triton for a Triton repository (training.generation)
    triton_url: str | None = None  # CXRGEN_TRITON_URL: the Triton server (http://HOST:8000 or grpc://HOST:8001)
    reward_dir: str | None = None  # CXRGEN_REWARD_DIR: folder of reward folders (default models/rewards)
    store: str | None = None  # CXRGEN_STORE: feedback store URL (default sqlite under data_dir)
    data_dir: str = "var"  # CXRGEN_DATA: store (by default), image blobs, augmentation jobs
    device: str = "auto"  # CXRGEN_DEVICE: auto (CUDA when present, else CPU), cpu, cuda, cuda:1
    max_batch: int = 8  # CXRGEN_MAX_BATCH: images per denoising run; 1 turns batching off
    batch_wait_ms: float = 0.0  # CXRGEN_BATCH_WAIT_MS: extra wait for more requests before a run
    max_work: float = 16 * 50 * 256 * 256  # CXRGEN_MAX_WORK: n x steps x pixels allowed in one call
    max_job_work: float = 10_000 * 50 * 256 * 256  # CXRGEN_MAX_JOB_WORK: count x steps x pixels of one batch
    max_body_bytes: int = 1_000_000  # CXRGEN_MAX_BODY: larger request bodies get 413
    max_active_jobs: int = 4  # CXRGEN_MAX_JOBS: augmentation batches queued or running at once in this store
    # (every worker and replica sharing it); a submit past it gets 429
    rate_limits: str | None = None  # CXRGEN_RATE_LIMITS: "role=RATE[:BURST],..." per API key, or "off"
    # (security.parse_limits; unset: security.DEFAULT_LIMITS)
    warmup: bool = True  # CXRGEN_WARMUP=0 skips the warm-up generation (ready at once; tests)
    warmup_steps: int = 2  # steps of the warm-up generation
    keys: str | None = None  # CXRGEN_API_KEYS: "key:role,role;key2:role" (see security.py)
    keys_file: str | None = None  # CXRGEN_API_KEYS_FILE: a mounted file with the same, one key per line
    reload_poll_s: float = 1.0  # how often a worker checks whether another worker switched models
    torch_compile: bool = False  # CXRGEN_TORCH_COMPILE=1: the torch backend's U-Net through torch.compile

    @classmethod
    def from_env(cls) -> "ServeConfig":
        c = cls()
        c.model = _env("CXRGEN_MODEL")
        c.backend = _env("CXRGEN_BACKEND")
        c.triton_url = _env("CXRGEN_TRITON_URL")
        c.reward_dir = _env("CXRGEN_REWARD_DIR")
        c.data_dir = _env("CXRGEN_DATA", c.data_dir)
        c.store = _env("CXRGEN_STORE") or f"sqlite:///{Path(c.data_dir) / 'feedback' / 'store.db'}"
        c.device = _env("CXRGEN_DEVICE", c.device)
        c.max_batch = int(_env("CXRGEN_MAX_BATCH", str(c.max_batch)))
        c.batch_wait_ms = float(_env("CXRGEN_BATCH_WAIT_MS", str(c.batch_wait_ms)))
        c.max_work = float(_env("CXRGEN_MAX_WORK", str(c.max_work)))
        c.max_job_work = float(_env("CXRGEN_MAX_JOB_WORK", str(c.max_job_work)))
        c.max_body_bytes = int(_env("CXRGEN_MAX_BODY", str(c.max_body_bytes)))
        c.max_active_jobs = int(_env("CXRGEN_MAX_JOBS", str(c.max_active_jobs)))
        c.rate_limits = _env("CXRGEN_RATE_LIMITS")
        c.warmup = _env("CXRGEN_WARMUP", "1") not in ("0", "false", "no")
        c.torch_compile = _env("CXRGEN_TORCH_COMPILE", "0") not in ("0", "false", "no")
        c.keys = _env("CXRGEN_API_KEYS")
        c.keys_file = _env("CXRGEN_API_KEYS_FILE")
        if c.max_batch < 1:
            raise ValueError(f"CXRGEN_MAX_BATCH must be >= 1, got {c.max_batch}")
        if c.max_active_jobs < 1:
            raise ValueError(f"CXRGEN_MAX_JOBS must be >= 1, got {c.max_active_jobs}")
        if c.backend is not None:
            from training.generation import backend_names

            if c.backend not in backend_names():
                raise ValueError(f"CXRGEN_BACKEND={c.backend!r} is not a backend; known: {backend_names()}")
        return c

    @property
    def blobs(self) -> Path:
        return Path(self.data_dir) / "feedback" / "images"

    @property
    def jobs_dir(self) -> Path:
        return Path(self.data_dir) / "jobs"

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
