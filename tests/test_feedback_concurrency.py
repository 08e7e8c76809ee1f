"""32 concurrent writers (threads, and processes started with spawn) on SQLite and PostgreSQL: every
acknowledged write is stored exactly once, retried and duplicate keys give one record, and the feed
read by ``read_after`` is 1..N without gaps (training/feedback/stress.py does the writing and checking)."""

import threading

import pytest

from training.feedback import store as fs, stress


@pytest.fixture
def store(store_url, tmp_path):
    with fs.open_store(store_url, blobs=tmp_path / "blobs") as s:
        yield s


def test_32_writer_threads(store):
    assert stress.check(store, stress.run_threads(store, writers=32, n=10)) == 1 + 32 * 10 * 2 + 10


def test_32_writers_in_2_processes(store):
    url = store.url.render_as_string(hide_password=False)
    results = stress.run_processes(url, store.blobs.root, writers=32, n=5, processes=2)
    assert stress.check(store, results) == 1 + 32 * 5 * 2 + 5


def test_a_polling_reader_misses_nothing(store):
    """A reader following the cursor while 16 threads write sees every event exactly once, in order."""
    done, seen, cursor = threading.Event(), [], 0
    writer = threading.Thread(target=lambda: (stress.run_threads(store, writers=16, n=5), done.set()))
    writer.start()
    while True:
        finished = done.is_set()
        batch = store.read_after(cursor)
        seen += [e.seq for e in batch.events]
        cursor = batch.cursor
        if finished:
            break
    writer.join()
    assert seen == list(range(1, store.cursor() + 1)) and cursor == store.cursor() == 1 + 16 * 5 * 2 + 5


@pytest.mark.slow
def test_32_writer_processes(store):
    url = store.url.render_as_string(hide_password=False)
    results = stress.run_processes(url, store.blobs.root, writers=32, n=10, processes=32)
    assert stress.check(store, results) == 1 + 32 * 10 * 2 + 10
