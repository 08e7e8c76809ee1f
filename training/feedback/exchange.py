"""NDJSON export / import of the feedback store: feedback moves between machines and stores.

One event per line, in feed order: ``{"seq": ..., "kind": ..., "record": {...}}``. Record ids are
local to a store, so the export also names every generation by its idempotency key: a generation
record carries ``key`` (and its image as base64 PNG under ``image_png_base64`` unless exported without
images), a rating ``generation_key``, a comparison ``generation_a_key`` / ``generation_b_key``. Import
replays the events through the store's public writes with the exported keys and creation times, so
ids are remapped through the keys and importing the same file twice adds nothing.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import IO, Iterable

from .errors import StoreError
from .store import FeedbackStore

PAGE = 500  # events read per query


def export_events(store: FeedbackStore, out: IO[str], after: int = 0, images: bool = True) -> tuple[int, int]:
    """Write every event after cursor ``after`` as NDJSON; returns (events written, final cursor)."""
    n, cursor = 0, after
    for line, cursor in iter_export(store, after, images):
        out.write(line)
        n += 1
    return n, cursor


def iter_export(store: FeedbackStore, after: int = 0, images: bool = True, page: int = PAGE):
    """(NDJSON line, cursor after it) for every event after ``after``, read a page at a time: what the
    export file and the service's ``/feedback/stream`` are made of."""
    cursor, keys = after, {}
    while True:
        batch = store.read_after(cursor, limit=page)
        if not batch.events:
            return
        for e in batch.events:
            yield json.dumps({"seq": e.seq, "kind": e.kind, "record": _exported(store, e, keys, images)}) + "\n", e.seq
        cursor = batch.cursor


def _exported(store: FeedbackStore, e, keys: dict, images: bool) -> dict:
    d = e.record.to_dict()
    if e.kind == "generation":
        keys[d["id"]] = d["key"]
        d.pop("image_path")
        if images:
            d["image_png_base64"] = base64.b64encode(store.image_bytes(d["id"])).decode("ascii")
    elif e.kind == "rating":
        d["generation_key"] = _key(store, keys, d["generation_id"])
    elif e.kind == "comparison":
        d["generation_a_key"] = _key(store, keys, d["generation_a"])
        d["generation_b_key"] = _key(store, keys, d["generation_b"])
    return d


def _key(store: FeedbackStore, keys: dict, gid: int) -> str:
    if gid not in keys:  # exported before the cursor: look it up
        keys[gid] = store.generation(gid).key
    return keys[gid]


def import_events(store: FeedbackStore, lines: Iterable[str], source: str = "input") -> int:
    """Replay exported events into ``store`` (idempotent); returns how many events were read."""
    n = 0
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{source}:{lineno}"
        try:
            event = json.loads(line)
            kind, rec = event["kind"], event.get("record", event.get("error"))
            if kind not in ("end", "error"):
                rec = event["record"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise StoreError(f"{where}: not a feedback event line ({type(e).__name__}: {e})") from e
        if kind == "end":  # the service stream's final status line: nothing to import
            continue
        if kind == "error":
            raise StoreError(f"{where}: the stream ended with a server error: {rec if rec else event}")
        if kind not in IMPORTERS:
            raise StoreError(f"{where}: unknown event kind {kind!r}; known: {', '.join(IMPORTERS)}")
        try:
            IMPORTERS[kind](store, rec)
        except KeyError as e:
            raise StoreError(f"{where}: {kind} record lacks field {e}") from e
        except StoreError as e:
            raise StoreError(f"{where}: {e}") from e
        n += 1
    return n


def _import_rater(store: FeedbackStore, r: dict) -> None:
    store.add_rater(r["id"], r["role"], r.get("qualification", ""), created=r.get("created"))


def _import_generation(store: FeedbackStore, r: dict) -> None:
    if "image_png_base64" in r:
        data = base64.b64decode(r["image_png_base64"])
        if hashlib.sha256(data).hexdigest() != r["image_sha256"]:
            raise StoreError(f"generation {r['key']!r}: image does not match its image_sha256 (corrupt export)")
    else:  # exported with --no-images: the image must already be in this store's blob folder
        path = store.blobs.path(store.blobs.location(r["image_sha256"]))
        if not path.is_file():
            raise StoreError(f"generation {r['key']!r}: exported without images and {path} is missing; "
                             "export again without --no-images")
        data = path.read_bytes()
    store.add_generation(image=data, prompt=r["prompt"], findings=r["findings"], seed=r["seed"],
                         sampler=r["sampler"], model_version=r["model_version"], key=r["key"],
                         created=r.get("created"))


def _generation_id(store: FeedbackStore, key: str) -> int:
    gid = store.generation_id(key)
    if gid is None:
        raise StoreError(f"no generation with key {key!r} in the target store (import the whole export, "
                         "or one that starts at cursor 0)")
    return gid


def _import_rating(store: FeedbackStore, r: dict) -> None:
    store.add_rating(generation_id=_generation_id(store, r["generation_key"]), rater_id=r["rater_id"],
                     plausible=r["plausible"], failed=r["failed"], score=r["score"], comment=r["comment"],
                     key=r["key"], created=r.get("created"))


def _import_comparison(store: FeedbackStore, r: dict) -> None:
    store.add_comparison(generation_a=_generation_id(store, r["generation_a_key"]),
                         generation_b=_generation_id(store, r["generation_b_key"]), preferred=r["preferred"],
                         rater_id=r["rater_id"], key=r["key"], created=r.get("created"))


IMPORTERS = {"rater": _import_rater, "generation": _import_generation, "rating": _import_rating,
             "comparison": _import_comparison}
