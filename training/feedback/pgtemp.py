"""A throwaway PostgreSQL cluster for the store's tests and benchmark (issue 7, section 1).

``TempCluster`` runs Debian's PostgreSQL binaries (``/usr/lib/postgresql/<version>/bin``, package
``postgresql``): ``initdb`` into a temporary folder, then ``pg_ctl start`` with ``listen_addresses=''``,
so the server listens only on a Unix socket inside that folder: no port is opened, nothing outside
this machine can reach it, and two clusters never collide. initdb refuses to run as root, so as root
the server runs as the unprivileged ``postgres`` user (created when missing) via ``runuser``.
``stop()`` shuts it down and deletes the folder.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

SUPERUSER = "postgres"  # the cluster's superuser role (local trust authentication)
OS_USER = "postgres"  # who runs the server when we are root


def find_bindir() -> Path | None:
    """The folder holding initdb and pg_ctl: $CXRGEN_PG_BINDIR, the newest Debian version, or PATH."""
    env = os.environ.get("CXRGEN_PG_BINDIR")
    candidates = [env] if env else []
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
                         if Path(p).parent.name.isdigit() else 0, reverse=True)
    if shutil.which("initdb"):
        candidates.append(str(Path(shutil.which("initdb")).parent))
    for c in candidates:
        if (Path(c) / "initdb").is_file() and (Path(c) / "pg_ctl").is_file():
            return Path(c)
    return None


def _ensure_os_user() -> str:
    try:
        pwd.getpwnam(OS_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", OS_USER],
                       check=True, capture_output=True)
    return OS_USER


class TempCluster:
    """A PostgreSQL server on a Unix socket in a temporary folder; a context manager.

    durable=False turns off fsync / synchronous_commit / full_page_writes (tests: faster, and a crash
    loses nothing that matters); the benchmark uses durable=True, PostgreSQL's defaults.
    """

    def __init__(self, bindir: Path | None = None, durable: bool = False, max_connections: int = 300):
        self.bindir = bindir or find_bindir()
        if self.bindir is None:
            raise FileNotFoundError("PostgreSQL binaries (initdb, pg_ctl) not found; install Debian's postgresql "
                                    "package or set CXRGEN_PG_BINDIR")
        self.durable = durable
        self.max_connections = max_connections
        self.folder: Path | None = None
        self._as_user: list[str] = []

    def _run(self, *args: str) -> None:
        cmd = self._as_user + [str(self.bindir / args[0]), *args[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C", "LANG": "C"})
        if proc.returncode != 0:
            log = (self.folder / "server.log") if self.folder else None
            tail = log.read_text()[-2000:] if log and log.is_file() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()} {tail}")

    def start(self) -> "TempCluster":
        self.folder = Path(tempfile.mkdtemp(prefix="cxrgen-pg-"))
        if os.geteuid() == 0:
            user = _ensure_os_user()
            shutil.chown(self.folder, user=user)
            self._as_user = ["runuser", "-u", user, "--"]
        data = self.folder / "data"
        self._run("initdb", "-D", str(data), "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8", "--no-locale",
                  "--no-sync", "--no-instructions")
        opts = [f"-c listen_addresses='' -k {self.folder} -c max_connections={self.max_connections}"]
        if not self.durable:
            opts.append("-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        self._run("pg_ctl", "-D", str(data), "-l", str(self.folder / "server.log"), "-o", " ".join(opts),
                  "-w", "-t", "60", "start")
        return self

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL of a database on this cluster (psycopg 3, Unix socket, no password)."""
        return f"postgresql+psycopg://{SUPERUSER}@/{database}?host={self.folder}"

    def create_database(self, name: str) -> str:
        """Create an empty database; returns its URL."""
        import psycopg

        with psycopg.connect(host=str(self.folder), user=SUPERUSER, dbname="postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.folder is None:
            return
        try:
            self._run("pg_ctl", "-D", str(self.folder / "data"), "-m", "fast", "-w", "-t", "30", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def __enter__(self) -> "TempCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
