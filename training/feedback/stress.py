"""Concurrent writers against one store: shared by tests/test_feedback_concurrency.py and benchmarks/store.py.

Each writer ``w`` adds the rater "stress" (all writers race to add the same rater), then ``n`` times:
a generation with its own key, the same call retried (must return the same id), a rating of it, and,
when ``shared``, a generation every writer adds under the same key ``shared-i`` (concurrent duplicate
keys: one row, one id for all). Writers run as threads sharing one ``FeedbackStore`` or as processes
(multiprocessing spawn), each with its own store; ``check`` then asserts that every acknowledged write
is stored exactly once and that the feed is 1..N without gaps.
"""

from __future__ import annotations

import collections
import multiprocessing
from concurrent.futures import ThreadPoolExecutor

import numpy as np

RATER = "stress"
PROMPT = "Moderate left pleural effusion."


def tiny_image(writer: int, i: int) -> np.ndarray:
    """A distinct 8x8 image per (writer, i); writer -1 is the image every writer shares."""
    a = np.zeros((8, 8), np.uint8)
    a[0, :4] = np.frombuffer(int(writer + 1).to_bytes(4, "little"), np.uint8)
    a[1, :4] = np.frombuffer(int(i).to_bytes(4, "little"), np.uint8)
    return a


def write_many(store, writer: int, n: int, shared: bool = True, retry: bool = True) -> dict:
    """One writer's writes; returns {"generation": {key: id}, "rating": {key: id}} of what was acknowledged.

    shared / retry False (the benchmark): only distinct writes, one generation and one rating per step.
    """
    acked = {"generation": {}, "rating": {}}
    store.add_rater(RATER, "simulated", "stress test")
    for i in range(n):
        fields = dict(prompt=PROMPT, findings=[], seed=writer * 100_000 + i, sampler={"steps": 1}, model_version="t")
        key = f"g-{writer}-{i}"
        gid = store.add_generation(image=tiny_image(writer, i), key=key, **fields)
        if retry and store.add_generation(image=tiny_image(writer, i), key=key, **fields) != gid:
            raise AssertionError(f"retried generation {key} returned another id")
        acked["generation"][key] = gid
        rkey = f"r-{writer}-{i}"
        acked["rating"][rkey] = store.add_rating(generation_id=gid, rater_id=RATER, plausible=bool(i % 2),
                                                 failed=[] if i % 2 else ["artefact"], key=rkey)
        if shared:
            skey = f"shared-{i}"
            acked["generation"][skey] = store.add_generation(image=tiny_image(-1, i), key=skey,
                                                             **{**fields, "seed": i})
    return acked


def run_threads(store, writers: int, n: int, shared: bool = True, retry: bool = True) -> list[dict]:
    """``writers`` threads writing through one store object at once."""
    with ThreadPoolExecutor(writers) as pool:
        return list(pool.map(lambda w: write_many(store, w, n, shared, retry), range(writers)))


def _process(args: tuple) -> list[dict]:
    from .store import open_store

    url, blobs, ids, n, shared = args
    with open_store(url, blobs, upgrade=False) as store:
        with ThreadPoolExecutor(len(ids)) as pool:
            return list(pool.map(lambda w: write_many(store, w, n, shared), ids))


def run_processes(url: str, blobs, writers: int, n: int, processes: int, shared: bool = True) -> list[dict]:
    """``writers`` writers spread over ``processes`` spawned processes (threads inside each)."""
    groups = [list(range(writers))[p::processes] for p in range(processes)]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes) as pool:
        parts = pool.map(_process, [(url, str(blobs), g, n, shared) for g in groups])
    return [r for part in parts for r in part]


def check(store, results: list[dict]) -> int:
    """Every acknowledged write stored exactly once, same key -> same id, feed 1..N; returns N."""
    acked = collections.defaultdict(dict)
    for r in results:
        for kind, ids in r.items():
            for key, rid in ids.items():
                if acked[kind].setdefault(key, rid) != rid:
                    raise AssertionError(f"{kind} key {key} acknowledged with two ids")
    batch = store.read_after(0)
    seqs = [e.seq for e in batch.events]
    if seqs != list(range(1, len(seqs) + 1)):
        raise AssertionError(f"feed seqs are not 1..{len(seqs)} in order")
    stored = collections.defaultdict(dict)
    for e in batch.events:
        key = e.record.id if e.kind == "rater" else e.record.key
        if key in stored[e.kind]:
            raise AssertionError(f"{e.kind} {key} appears twice in the feed")
        stored[e.kind][key] = e.record.id
    for kind in ("generation", "rating"):
        if stored[kind] != acked[kind]:
            lost = set(acked[kind]) - set(stored[kind])
            raise AssertionError(f"{kind}s: stored != acknowledged (lost {sorted(lost)[:5]}, "
                                 f"{len(stored[kind])} stored, {len(acked[kind])} acknowledged)")
    expected = {k + "s": len(stored[k]) for k in ("rater", "generation", "rating", "comparison")}
    if list(stored["rater"]) != [RATER] or store.counts() != expected:
        raise AssertionError(f"table counts {store.counts()} differ from the feed")
    return len(seqs)
