"""Test harness for the service (issue 9): an in-process app and a real ``bentoml serve`` process.

Both use the committed default generator and rewards, a temporary data folder (SQLite store, blobs,
jobs), a temporary BentoML home and API keys for the four roles.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
KEYS = {role: f"{role}-test-key-0123456789" for role in ("client", "rater", "trainer", "admin")}
KEYS_ENV = ";".join(f"{k}:{role}" for role, k in KEYS.items())


def auth(role: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[role]}"}


def service_env(root: Path, **extra) -> dict:
    env = {"CXRGEN_DATA": str(root / "var"), "BENTOML_HOME": str(root / "bentoml"), "CXRGEN_API_KEYS": KEYS_ENV,
           "CXRGEN_WARMUP": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "BENTOML_DO_NOT_TRACK": "True"}
    env.update({k: str(v) for k, v in extra.items()})
    env.pop("CXRGEN_STORE", None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(get, timeout: float = 180.0) -> None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"service not ready after {timeout:.0f} s")


@dataclasses.dataclass
class LiveService:
    url: str
    root: Path
    proc: subprocess.Popen
    log: Path
    keys: dict = dataclasses.field(default_factory=lambda: dict(KEYS))

    @property
    def store_url(self) -> str:
        return f"sqlite:///{self.root / 'var' / 'feedback' / 'store.db'}"

    @property
    def blobs(self) -> str:
        return str(self.root / "var" / "feedback" / "images")

    def client(self, role: str | None = None, timeout: float = 300.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=auth(role) if role else {}, timeout=timeout)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_live(root: Path, workers: int = 2, **extra) -> LiveService:
    """``bentoml serve service.service:CXRGen`` on a free port, ready (warm-up done) when returned."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, **service_env(root, CXRGEN_WORKERS=workers, **extra)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = root / "serve.log"
    bentoml = Path(sys.executable).parent / "bentoml"
    proc = subprocess.Popen([str(bentoml), "serve", "service.service:CXRGen", "--port", str(port)], cwd=REPO,
                            env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    live = LiveService(url=f"http://127.0.0.1:{port}", root=root, proc=proc, log=log)
    try:
        with httpx.Client(base_url=live.url, timeout=10) as c:
            wait_ready(c.get)
    except Exception:
        live.stop()
        raise RuntimeError(f"bentoml serve did not become ready; its log:\n{log.read_text()[-4000:]}") from None
    return live
