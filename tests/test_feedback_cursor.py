"""The store's cursor never skips a late commit (issue 7, section 1), on SQLite and PostgreSQL.

The trap: a sequence hands writer A id 10 and writer B id 11; B commits first, a reader sees 11,
moves its cursor to 11, and never sees 10. Here writer A holds its transaction open (a test hook
pauses it inside the write) while writer B writes from another thread and a reader polls.
"""

import threading
import time

import numpy as np
import pytest

from training.feedback import store as fs


def gen(store, i: int) -> int:
    return store.add_generation(image=np.full((8, 8), i, np.uint8), prompt="p", findings=[], seed=i, sampler={},
                                model_version="v")


class Held:
    """Pause the first write of ``store`` at ``stage`` until released."""

    def __init__(self, store, stage: str):
        self.inside, self.release, self.stage, self.store = threading.Event(), threading.Event(), stage, store
        store._hook = self

    def __call__(self, stage: str) -> None:
        if stage == self.stage:
            self.store._hook = None  # only this write
            self.inside.set()
            assert self.release.wait(60)


def start(fn) -> tuple[threading.Thread, dict]:
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("id", fn()), daemon=True)
    t.start()
    return t, out


@pytest.fixture
def three(store_url, tmp_path):
    stores = [fs.open_store(store_url, blobs=tmp_path / "blobs") for _ in range(3)]
    yield stores
    for s in stores:
        s.close()


def test_reader_waits_for_a_write_held_open_before_commit(three):
    a, b, reader = three
    a.add_rater("r", "radiologist")
    base = reader.cursor()
    held = Held(a, "before_commit")  # A holds its generation and its feed row, uncommitted
    ta, out_a = start(lambda: gen(a, 1))
    assert held.inside.wait(30)
    tb, out_b = start(lambda: gen(b, 2))
    time.sleep(0.5)  # B has had time to commit, if anything let it
    seen = reader.read_after(base)
    assert seen.events == [] and seen.cursor == base and reader.cursor() == base
    assert tb.is_alive(), "B committed while A held the feed: seq order would not be commit order"
    held.release.set()
    ta.join(30), tb.join(30)
    batch = reader.read_after(seen.cursor)
    assert [e.record.id for e in batch.events] == [out_a["id"], out_b["id"]]
    assert [e.seq for e in batch.events] == [base + 1, base + 2] and batch.cursor == base + 2


def test_a_write_held_before_its_feed_row_comes_after_the_cursor(three):
    """A holds its generation row (it has the smaller row id) but no seq yet: B commits first, and
    A's later commit still lands after every cursor a reader has handed out."""
    a, b, reader = three
    held = Held(a, "before_feed")
    ta, out_a = start(lambda: gen(a, 1))
    assert held.inside.wait(30)
    if a.engine.dialect.name == "sqlite":  # SQLite: A already has the one write lock; B must wait
        tb, out_b = start(lambda: gen(b, 2))
        time.sleep(0.3)
        assert tb.is_alive() and reader.read_after(0).events == []
        held.release.set()
    else:  # PostgreSQL: B commits while A is open
        out_b = {"id": gen(b, 2)}
        first = reader.read_after(0)
        assert [e.record.id for e in first.events] == [out_b["id"]]
        assert out_b["id"] > 1  # A took row id 1 first, yet B is seq 1: ids alone would mislead
        held.release.set()
        ta.join(30)
        late = reader.read_after(first.cursor)
        assert [e.record.id for e in late.events] == [out_a["id"]] and late.events[0].seq == first.cursor + 1
        return
    ta.join(30), tb.join(30)
    assert [e.record.id for e in reader.read_after(0).events] == [out_a["id"], out_b["id"]]


def test_read_after_pages_without_skipping(three):
    a, _, reader = three
    ids = [gen(a, i) for i in range(7)]
    cursor, seen = 0, []
    while True:
        batch = reader.read_after(cursor, limit=3)
        if not batch.events:
            break
        seen += [e.record.id for e in batch.events]
        cursor = batch.cursor
    assert seen == ids and cursor == reader.cursor() == 7
    with pytest.raises(fs.StoreError, match="cursor"):
        reader.read_after(-1)
