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


# ---------------------------------------------------------------- the service (issue 9)


@pytest.fixture(scope="session")
def service_app(tmp_path_factory):
    """The service in this process (TestClient over its ASGI app), ready; yields a client factory."""
    import os

    from service_support import service_env, wait_ready

    root = tmp_path_factory.mktemp("service")
    os.environ.update(service_env(root))
    from starlette.testclient import TestClient

    from _bentoml_impl.tasks.result import Sqlite3Store
    from bentoml._internal.configuration.containers import BentoMLContainer
    from service.service import CXRGen

    # `bentoml serve` creates the task table before starting workers; an in-process app must do it.
    Sqlite3Store.init_db(BentoMLContainer.result_store_file.get())
    with TestClient(CXRGen.to_asgi(), raise_server_exceptions=False) as client:
        wait_ready(client.get)
        client.root = root
        yield client


@pytest.fixture(scope="session")
def live_service(tmp_path_factory):
    """A real `bentoml serve` process with two workers, API keys and four stored generations (two
    prompts, two images each)."""
    from service_support import start_live

    live = start_live(tmp_path_factory.mktemp("live"), workers=2)
    try:
        with live.client("client") as c:
            for prompt in ("Small left pleural effusion.", "No acute cardiopulmonary process."):
                r = c.post("/generate", json={"prompt": prompt, "n": 2, "seed": 11, "steps": 25})
                assert r.status_code == 200, r.text
        yield live
    finally:
        live.stop()
