"""Test harness for the service (issue 9): an in-process app and a real ``bentoml serve`` process.

Both use the committed default generator and rewards, a temporary data folder (SQLite store, blobs,
jobs), a temporary BentoML home and API keys for the four roles.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
# The embedded default model's version, as its manifest names it (changes when a model is promoted).
DEFAULT_VERSION = json.loads((REPO / "models" / "default" / "cxrgen_manifest.json").read_text())["version"]
KEYS = {role: f"{role}-test-key-0123456789" for role in ("client", "rater", "trainer", "admin")}
KEYS_ENV = ";".join(f"{k}:{role}" for role, k in KEYS.items())


def auth(role: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[role]}"}


def service_env(root: Path, **extra) -> dict:
    env = {"CXRGEN_DATA": str(root / "var"), "BENTOML_HOME": str(root / "bentoml"), "CXRGEN_API_KEYS": KEYS_ENV,
           "CXRGEN_WARMUP": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "BENTOML_DO_NOT_TRACK": "True",
           # The tests share one key per role among many concurrent clients (load, crash, fuzz): per-key rate
           # limits would turn those into 429s. Tests of the limits pass CXRGEN_RATE_LIMITS themselves.
           "CXRGEN_RATE_LIMITS": "off"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def record_measurement(name: str, data: dict) -> None:
    """Merge a test's measurements into the JSON file named by CXRGEN_RELIABILITY_OUT, if set
    (benchmarks/reliability.py renders RELIABILITY.md from it)."""
    out = os.environ.get("CXRGEN_RELIABILITY_OUT")
    if not out:
        return
    path = Path(out)
    merged = json.loads(path.read_text()) if path.is_file() else {}
    merged[name] = data
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(merged, indent=1, sort_keys=True))
    os.replace(tmp, path)


def png_pixels(b64: str):
    """A base64 PNG of a response (grey levels, uint8 array)."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("L"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(get, timeout: float = 180.0, path: str = "/readyz") -> None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if get(path).status_code == 200:
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
    store: str | None = None  # CXRGEN_STORE when given (PostgreSQL); None: the SQLite file under root

    @property
    def store_url(self) -> str:
        return self.store or f"sqlite:///{self.root / 'var' / 'feedback' / 'store.db'}"

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

    def processes(self) -> list:
        """The server and its workers (psutil.Process), while they run."""
        import psutil

        try:
            server = psutil.Process(self.proc.pid)
            return [server, *server.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss(self) -> int:
        """Resident memory of the server and its workers together, in bytes."""
        import psutil

        total = 0
        for p in self.processes():
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def crash(self) -> None:
        """kill -9, no warning: every process group of the server's tree at once (BentoML starts each worker
        in its own session, so the server's group alone would leave the workers running)."""
        import signal

        groups = set()
        for p in self.processes():
            try:
                groups.add(os.getpgid(p.pid))
            except ProcessLookupError:
                pass
        for g in groups:
            try:
                os.killpg(g, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(30)


def start_live(root: Path, workers: int = 2, store: str | None = None, ready: bool = True,
               **extra) -> LiveService:
    """``bentoml serve service.service:CXRGen`` on a free port, ready (warm-up done) when returned.

    ``store``: a feedback store URL (CXRGEN_STORE; default the SQLite file under ``root``). ``ready``
    False: returned once /livez answers (a server whose model fails to load never gets ready)."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("CXRGEN_STORE", "PROMETHEUS_MULTIPROC_DIR")}
    env.update(service_env(root, CXRGEN_WORKERS=workers, **extra))
    if store:
        env["CXRGEN_STORE"] = store
    log = root / "serve.log"
    bentoml = Path(sys.executable).parent / "bentoml"
    proc = subprocess.Popen([str(bentoml), "serve", "service.service:CXRGen", "--port", str(port)], cwd=REPO,
                            env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    live = LiveService(url=f"http://127.0.0.1:{port}", root=root, proc=proc, log=log, store=store)
    try:
        with httpx.Client(base_url=live.url, timeout=10) as c:
            wait_ready(c.get, path="/readyz" if ready else "/livez")
    except Exception:
        live.stop()
        raise RuntimeError(f"bentoml serve did not become ready; its log:\n{log.read_text()[-4000:]}") from None
    return live
