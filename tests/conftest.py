"""Shared fixtures: the simulator's anatomy, and a throwaway PostgreSQL server for the feedback store.

``pg_cluster`` (session) starts PostgreSQL from Debian's binaries on a Unix socket in a temporary folder
(training/feedback/pgtemp.py) and stops it at the end; without the binaries the tests that need it are
skipped with the reason (.ci/run installs the package, so in CI they run). ``pg_url`` is a fresh empty
database per test; ``store_url`` runs a test once on SQLite and once on PostgreSQL.
"""

import itertools

import pytest

_databases = itertools.count()


@pytest.fixture(scope="session")
def anat():
    from training.simulator.anatomy import load_anatomy

    return load_anatomy()


@pytest.fixture(scope="session")
def pg_cluster():
    from training.feedback.pgtemp import TempCluster, find_bindir

    if find_bindir() is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not found under /usr/lib/postgresql/*/bin or on PATH; "
                    "install Debian's postgresql package (.ci/run does) to run the PostgreSQL store tests")
    cluster = TempCluster().start()
    yield cluster
    cluster.stop()


@pytest.fixture
def pg_url(pg_cluster):
    """URL of a new, empty database on the session's PostgreSQL cluster."""
    return pg_cluster.create_database(f"test_{next(_databases)}")


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """An empty store's URL: SQLite file in tmp_path, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("pg_url")
