"""The store's Alembic migrations: an empty SQLite file and an empty PostgreSQL database migrate to head,
and the result is exactly the SQLAlchemy models (Alembic's autogenerate finds no difference)."""

import json

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from training.cli import main
from training.feedback import db, store as fs
from training.feedback.models import Base


def differences(engine) -> list:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        return compare_metadata(ctx, Base.metadata)


def test_empty_store_migrates_to_the_models(store_url):
    engine = db.make_engine(db.resolve_url(store_url))
    try:
        assert db.current_revision(engine) is None
        assert db.upgrade(engine) == db.head_revision() == "0002"
        assert differences(engine) == []
        assert db.upgrade(engine) == "0002"  # again: a no-op
    finally:
        engine.dispose()


def test_unmigrated_store_is_refused_without_upgrade(store_url, tmp_path):
    with pytest.raises(fs.StoreError, match="cxrgen store upgrade"):
        fs.open_store(store_url, blobs=tmp_path, upgrade=False)


def test_cli_store_upgrade_and_stats(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    assert main(["store", "stats", "--store", url]) == 2
    assert "cxrgen store upgrade" in capsys.readouterr().err
    assert main(["store", "upgrade", "--store", url]) == 0
    assert json.loads(capsys.readouterr().out)["revision"] == "0002"
    assert main(["store", "stats", "--store", url]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["generations"], stats["cursor"]) == (0, 0)


def test_writers_opening_a_fresh_store_at_once_migrate_it_once(store_url, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    def open_and_write(i):
        with fs.open_store(store_url, blobs=tmp_path / "blobs") as s:
            return s.add_rater(f"r{i}", "radiologist")

    with ThreadPoolExecutor(6) as pool:
        assert sorted(pool.map(open_and_write, range(6))) == [f"r{i}" for i in range(6)]
    with fs.open_store(store_url, blobs=tmp_path / "blobs", upgrade=False) as s:
        assert s.cursor() == 6 and differences(s.engine) == []


class _RacingCursor:
    """A cursor whose first ``fails`` WAL switches lose a lock race the way SQLite reports it."""

    def __init__(self, fails, error="database is locked"):
        self.fails, self.error, self.mode, self.tries = fails, error, "delete", 0

    def execute(self, sql):
        if sql == "PRAGMA journal_mode=WAL":
            self.tries += 1
            if self.tries <= self.fails:
                raise db.sqlite3.OperationalError(self.error)
            self.mode = "wal"
        return self

    def fetchone(self):
        return (self.mode,)


def test_switching_to_wal_retries_a_lost_lock_race_and_reraises_other_errors():
    # SQLite fails a racing WAL switch at once, without its busy handler: the store must retry it
    cur = _RacingCursor(fails=3)
    db._set_wal(cur)
    assert cur.mode == "wal" and cur.tries == 4
    already = _RacingCursor(fails=0)
    already.mode = "wal"
    db._set_wal(already)
    assert already.tries == 0  # a file already in WAL is left alone
    with pytest.raises(db.sqlite3.OperationalError, match="disk I/O"):
        db._set_wal(_RacingCursor(fails=1, error="disk I/O error"))
