"""Store URLs, engines and schema migrations.

* A URL is ``sqlite:///path.db`` (the default, ``sqlite:///feedback/store.db``, or ``$CXRGEN_STORE``),
  ``postgresql+psycopg://user:pw@host/db``, or a plain file path (taken as SQLite). ``postgresql://``
  means psycopg 3, the driver cxrgen pins. ``safe_url`` renders a URL with its password masked; only
  that form is ever printed.
* SQLite engines set WAL (readers never block the writer), foreign keys ON (SQLite's default is off),
  and a busy timeout on every new connection. pysqlite's own transaction handling is switched off so
  that a write transaction starts with ``BEGIN IMMEDIATE`` (it takes SQLite's one write lock at once;
  see store._append_feed for why) and a read with a plain deferred ``BEGIN``.
* Migrations are Alembic scripts shipped in ``migrations/`` and run programmatically (no alembic.ini),
  under a lock so that many processes opening a fresh store at once migrate it once.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError

from .errors import StoreError

DEFAULT_URL = "sqlite:///feedback/store.db"
BUSY_TIMEOUT_S = 60  # how long a SQLite writer waits for the write lock before "database is locked"
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
MIGRATION_LOCK = 0x63787267_0001  # pg_advisory_xact_lock key serialising concurrent upgrades
WRITE = {"cxrgen_write": True}  # execution option: this connection's transaction writes


def resolve_url(url: str | URL | None = None) -> URL:
    """The store URL: ``url``, else ``$CXRGEN_STORE``, else the default SQLite file."""
    raw = url or os.environ.get("CXRGEN_STORE") or DEFAULT_URL
    if isinstance(raw, URL):
        raw = raw.render_as_string(hide_password=False)
    elif isinstance(raw, os.PathLike):
        raw = os.fspath(raw)
    if "://" not in raw:
        raw = "sqlite:///" + str(Path(raw))
    try:
        u = make_url(raw)
    except ArgumentError as e:
        raise StoreError(f"store URL {raw!r} is not a database URL: {e}") from e
    if u.drivername == "postgresql":
        u = u.set(drivername="postgresql+psycopg")
    if u.get_backend_name() not in ("sqlite", "postgresql"):
        raise StoreError(f"store URL {safe_url(u)}: unsupported database {u.get_backend_name()!r}; "
                         "known: sqlite, postgresql")
    if u.get_backend_name() == "sqlite" and u.database in (None, "", ":memory:"):
        raise StoreError("store URL: an in-memory SQLite store would vanish; give a file, sqlite:///path.db")
    return u


def safe_url(url: URL | str) -> str:
    """The URL with any password replaced by ***: the only form cxrgen prints."""
    return make_url(url).render_as_string(hide_password=True)


def make_engine(url: URL) -> Engine:
    """An engine for ``url`` with the SQLite settings above; pools sized for 32 writer threads."""
    pool = {"pool_size": 8, "max_overflow": 40, "pool_timeout": 120, "pool_pre_ping": False}
    if url.get_backend_name() != "sqlite":
        return create_engine(url, **pool)
    Path(url.database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S, "check_same_thread": False}, **pool)
    event.listen(engine, "connect", _sqlite_connect)
    event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_connect(dbapi_conn, _record) -> None:
    dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (SQLAlchemy's documented pysqlite recipe)
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")  # first: switching to WAL may have to wait
    _set_wal(cur)
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across crashes of the process
    cur.close()


def _set_wal(cur) -> None:
    """Switch the file to WAL (persistent: later connections find it set and change nothing).

    Switching a fresh file out of rollback mode needs an exclusive lock. Connections racing for it can
    meet in a lock upgrade SQLite resolves by failing one at once with "database is locked", without
    calling the busy handler (it would deadlock), so the timeout above does not cover it: retry here,
    with backoff, for as long as the busy timeout."""
    deadline, pause = time.monotonic() + BUSY_TIMEOUT_S, 0.005
    while True:
        try:
            if str(cur.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if ("locked" not in str(e) and "busy" not in str(e)) or time.monotonic() > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.25)


def _sqlite_begin(conn) -> None:
    write = conn.get_execution_options().get("cxrgen_write", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def _alembic_config(connection):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config(None)).get_current_head()


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> str:
    """Migrate the store to ``revision`` in one transaction, under a lock; returns the revision reached."""
    from alembic import command

    if revision == "head" and current_revision(engine) == head_revision():
        return head_revision()
    with engine.execution_options(**WRITE).begin() as conn:  # SQLite: BEGIN IMMEDIATE serialises upgrades
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
        command.upgrade(_alembic_config(conn), revision)
    return current_revision(engine)


def check_current(engine: Engine, url: URL) -> None:
    """Refuse a store whose schema is not at the head revision (open_store(upgrade=False))."""
    have, want = current_revision(engine), head_revision()
    if have != want:
        raise StoreError(f"store {safe_url(url)} is at schema revision {have or 'none (empty)'}, not {want}; "
                         "run `cxrgen store upgrade --store URL`")
