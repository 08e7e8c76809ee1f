"""The ``tritonserver`` that the nvidia-pytriton wheel ships, run on a model repository (tests, benchmarks,
``cxrgen export triton-serve``).

The wheel (pinned in pyproject's ``triton-server`` extra, installed with --no-deps: it asks for numpy<2)
carries Triton 2.51 with only the python backend, and one python-backend stub per Python 3.8-3.13. Three
things make that stub run this interpreter's Python and packages (what pytriton itself does, plus a fix):

1. a server folder laid out as Triton expects it: ``bin/tritonserver``, ``backends/python/`` with the stub of
   this Python version as ``triton_python_backend_stub``, ``caches/`` (a copy, once, under ``runtime_dir``);
2. ``LD_LIBRARY_PATH``: this interpreter's own ``LIBDIR`` first, then the wheel's bundled libraries. The stub
   links ``libpython3.X.so.1.0``; without the first entry it resolves to the system's libpython (Debian's
   3.11.2 here) whose C code then fails on this interpreter's 3.11.7 standard library ("'_thread.RLock'
   object has no attribute '_recursion_count'", pytriton issue 51);
3. ``PATH`` starting with this interpreter's ``bin`` folder: the embedded Python finds its prefix (and the
   virtualenv's site-packages, hence numpy, onnxruntime and cxrgen) from the ``python3`` on PATH;
   PYTHONPATH alone is not enough.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from .folder import ExportError


def wheel_dir() -> Path:
    """``site-packages/pytriton/tritonserver`` of the installed nvidia-pytriton wheel."""
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ExportError("the bundled Triton server needs the nvidia-pytriton wheel: pip install --no-deps "
                          "nvidia-pytriton==0.7.0 (make setup does), or run a Triton server of your own")
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise ExportError(f"{root} has no bin/tritonserver: a broken nvidia-pytriton install")
    return root


def runtime_dir(cache: Path | None = None) -> Path:
    """The server folder (step 1 of the module docstring), made once per wheel and Python version."""
    src = wheel_dir()
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = src / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ExportError(f"nvidia-pytriton has no python-backend stub for Python {version}")
    base = cache or Path(os.environ.get("CXRGEN_CACHE", Path.home() / ".cache" / "cxrgen"))
    dst = base / f"tritonserver-{src.stat().st_mtime_ns}-py{version}"
    if (dst / ".complete").is_file():
        return dst
    tmp = dst.with_name(dst.name + f".{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("python_backend_stubs", "__pycache__"))
    shutil.copy2(stub, tmp / "backends" / "python" / "triton_python_backend_stub")
    (tmp / ".complete").touch()
    try:
        os.replace(tmp, dst)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def server_env(base: dict | None = None) -> dict:
    """Steps 2 and 3 of the module docstring."""
    env = dict(os.environ if base is None else base)
    libs = wheel_dir().parent.parent / "nvidia_pytriton.libs"
    paths = [sysconfig.get_config_var("LIBDIR"), str(libs), env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = ":".join(p for p in paths if p)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (all sockets held open until every port is chosen)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def command(repository: Path, http_port: int, grpc_port: int, metrics_port: int | None, host: str = "127.0.0.1",
            runtime: Path | None = None) -> list[str]:
    runtime = runtime or runtime_dir()
    cmd = [str(runtime / "bin" / "tritonserver"), f"--model-repository={Path(repository).resolve()}",
           f"--backend-directory={runtime / 'backends'}", f"--cache-directory={runtime / 'caches'}",
           f"--http-address={host}", f"--http-port={http_port}", f"--grpc-address={host}",
           f"--grpc-port={grpc_port}", "--exit-on-error=true", "--strict-readiness=true",
           "--exit-timeout-secs=10", "--log-verbose=0"]
    if metrics_port is None:
        cmd.append("--allow-metrics=false")
    else:
        cmd += ["--allow-metrics=true", f"--metrics-address={host}", f"--metrics-port={metrics_port}"]
    return cmd


@dataclasses.dataclass
class TritonServer:
    """A running bundled server on loopback ports; ``stop()`` ends it (and only it)."""

    proc: subprocess.Popen
    http_port: int
    grpc_port: int
    log: Path

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc_port}"

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.is_file() else ""

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is not None:
            return
        # its own process group (start_new_session): the stub processes it started go with it
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def __enter__(self) -> "TritonServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start(repository: str | Path, log: str | Path, timeout: float = 180.0, env: dict | None = None) -> TritonServer:
    """Start the bundled server on free loopback ports; returns once every model is ready (or raises with the
    server's log when it exits or does not get ready in ``timeout`` seconds)."""
    import urllib.request

    http_port, grpc_port = free_ports(2)
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(command(Path(repository), http_port, grpc_port, None), env=server_env(env),
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    server = TritonServer(proc, http_port, grpc_port, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ExportError(f"tritonserver exited with {proc.returncode} while loading {repository}; its log:\n"
                              + server.log_tail())
        try:
            with urllib.request.urlopen(f"{server.http_url}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError:
            pass
        time.sleep(0.25)
    server.stop()
    raise ExportError(f"tritonserver was not ready after {timeout:.0f} s; its log:\n" + server.log_tail())


def serve(repository: str | Path, http_port: int, grpc_port: int, metrics_port: int | None, host: str) -> int:
    """Run the bundled server in the foreground (``cxrgen export triton-serve``) until it exits or Ctrl-C."""
    proc = subprocess.Popen(command(Path(repository), http_port, grpc_port, metrics_port, host), env=server_env())
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        return proc.wait()
