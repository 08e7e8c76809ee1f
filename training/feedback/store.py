"""The feedback store (issue 7, section 1): generations, expert ratings, comparisons, raters.

``open_store(url, blobs)`` opens a SQLite file (default) or a PostgreSQL database (db.py) plus a
folder of content-addressed image files (blobs.py). Writers call ``add_*``; the alignment and
reward trainers read what arrived since their last cursor with ``read_after``.

Guarantees, and how they are kept:

* One write = one committed transaction carrying an idempotency key, unique per record type. A
  retried write finds the key and returns the first write's id; two writers racing with the same
  key both reach the unique index, the loser gets IntegrityError, rolls back and reads the winner.
* References are checked inside the transaction before anything is inserted; a refused write raises
  ``UnknownReference`` / ``StoreError`` naming the field, and the rollback leaves the store as it was.
* The feed's ``seq`` is the cursor, and seq order is commit order (see ``_append_feed``), so a
  reader never skips a write that commits late.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import operator
import os
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from sqlalchemy import String, cast, func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from . import db
from .blobs import BlobFolder, decode, to_png_bytes
from .errors import StoreError, UnknownReference
from .models import CRITERIA, KINDS, PREFERRED, Comparison, Feed, Generation, Rater, Rating

__all__ = ["CRITERIA", "PREFERRED", "StoreError", "UnknownReference", "open_store", "FeedbackStore",
           "GenerationRecord", "RatingRecord", "ComparisonRecord", "RaterRecord", "Event", "Batch"]

FEED_LOCK = 0x63787267_0002  # pg_advisory_xact_lock key: one feed appender at a time (see _append_feed)
CHUNK = 500  # ids per IN (...) query when loading records


# ---------------------------------------------------------------- records


@dataclasses.dataclass(frozen=True)
class _Record:
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class RaterRecord(_Record):
    id: str
    role: str
    qualification: str
    created: str  # ISO 8601, UTC


@dataclasses.dataclass(frozen=True)
class GenerationRecord(_Record):
    id: int
    prompt: str
    findings: list  # Finding.to_dict() dicts
    seed: int
    sampler: dict
    model_version: str
    image_sha256: str
    image_path: str  # this store's copy of the PNG (absolute path under the blob folder)
    key: str
    created: str


@dataclasses.dataclass(frozen=True)
class RatingRecord(_Record):
    id: int
    generation_id: int
    rater_id: str
    plausible: bool
    failed: list  # criteria from CRITERIA
    score: int | None
    comment: str
    key: str
    created: str


@dataclasses.dataclass(frozen=True)
class ComparisonRecord(_Record):
    id: int
    generation_a: int
    generation_b: int
    preferred: str  # "a" | "b" | "tie"
    rater_id: str
    key: str
    created: str


@dataclasses.dataclass(frozen=True)
class Event:
    seq: int  # the feed position; read_after(seq) returns what came after this event
    kind: str  # "rater" | "generation" | "rating" | "comparison"
    record: Any  # the matching *Record


@dataclasses.dataclass(frozen=True)
class Batch:
    events: list  # list[Event] in seq order
    cursor: int  # seq of the last event returned (the cursor passed in when there were none)


def _iso(t: dt.datetime) -> str:
    if t.tzinfo is None:  # SQLite keeps no zone; cxrgen writes UTC
        t = t.replace(tzinfo=dt.timezone.utc)
    return t.astimezone(dt.timezone.utc).isoformat()


def _created(value: dt.datetime | str | None) -> dt.datetime:
    if value is None:
        return dt.datetime.now(dt.timezone.utc)
    t = dt.datetime.fromisoformat(value) if isinstance(value, str) else value
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------- validation


def _check_key(key: str | None, default: str) -> str:
    key = default if key is None else key
    if not isinstance(key, str) or not key or len(key) > 255:
        raise StoreError(f"key: must be a non-empty string of at most 255 characters, got {key!r}")
    return key


def _check_findings(findings) -> list[dict]:
    from ..findings import Finding

    if not isinstance(findings, (list, tuple)):
        raise StoreError(f"findings: expected a list of finding dicts, got {type(findings).__name__}")
    out = []
    for i, f in enumerate(findings):
        try:
            out.append((f if isinstance(f, Finding) else Finding.from_dict(f)).to_dict())
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise StoreError(f"findings[{i}]: {e}") from e
    return out


def _check_rating(plausible, failed, score, comment) -> tuple[bool, list[str], int | None]:
    """(plausible, failed in CRITERIA's order, score) normalised; numpy bools and ints are accepted."""
    if not isinstance(plausible, (bool, np.bool_)):
        raise StoreError(f"plausible: expected True or False, got {plausible!r}")
    failed = [failed] if isinstance(failed, str) else list(failed)
    unknown = [c for c in failed if c not in CRITERIA]
    if unknown:
        raise StoreError(f"failed: unknown criterion {unknown[0]!r}; known: {', '.join(CRITERIA)}")
    if score is not None and (_as_int(score) is None or not 1 <= _as_int(score) <= 5):
        raise StoreError(f"score: expected an integer 1-5 or None, got {score!r}")
    if not isinstance(comment, str):
        raise StoreError(f"comment: expected text, got {type(comment).__name__}")
    return bool(plausible), [c for c in CRITERIA if c in failed], None if score is None else _as_int(score)


# ---------------------------------------------------------------- the store


def open_store(url=None, blobs: str | os.PathLike | None = None,
               upgrade: bool = True) -> "FeedbackStore":
    """Open (and by default migrate) the store at ``url``; images under ``blobs``.

    url: ``sqlite:///path.db`` | ``postgresql+psycopg://...``; default ``$CXRGEN_STORE``, else
    ``sqlite:///feedback/store.db``. blobs: default ``$CXRGEN_BLOBS``, else ``<SQLite file's folder>/blobs``
    (PostgreSQL: ``./feedback/blobs``).
    """
    u = db.resolve_url(url)
    if blobs is None:
        blobs = os.environ.get("CXRGEN_BLOBS")
    if blobs is None:
        blobs = (Path(u.database).parent if u.get_backend_name() == "sqlite" else Path("feedback")) / "blobs"
    engine = db.make_engine(u)
    try:
        db.upgrade(engine) if upgrade else db.check_current(engine, u)
    except StoreError:
        engine.dispose()
        raise
    except Exception as e:  # cannot connect, bad credentials, ...: one line naming the (masked) URL
        engine.dispose()
        detail = " ".join(str(getattr(e, "orig", None) or e).split())  # one line, without SQLAlchemy's footer
        detail = detail.replace(u.password, "***") if u.password else detail
        raise StoreError(f"cannot open store {db.safe_url(u)}: {type(e).__name__}: {detail}") from e
    return FeedbackStore(engine, u, BlobFolder(blobs))


class FeedbackStore:
    """Read and write feedback; thread-safe (one engine, a session per call)."""

    def __init__(self, engine, url, blobs: BlobFolder):
        self.engine = engine
        self.url = url
        self.blobs = blobs
        self._writer = engine.execution_options(**db.WRITE)
        # SQLite admits one writer at a time anyway; queueing this process's threads on a lock is cheaper
        # than letting them poll SQLite's busy handler. Other processes still wait in the busy handler.
        self._thread_lock = threading.Lock() if engine.dialect.name == "sqlite" else contextlib.nullcontext()
        self._hook: Callable[[str], None] | None = None  # tests: called with "before_feed" / "before_commit"

    def __repr__(self) -> str:
        return f"FeedbackStore({db.safe_url(self.url)}, blobs={self.blobs.root})"

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------ writes

    def add_rater(self, rater_id: str, role: str, qualification: str = "", *, key: str | None = None,
                  created=None) -> str:
        """Add a rater (raters must exist before they rate); re-adding the same id returns it unchanged."""
        if not isinstance(rater_id, str) or not rater_id or len(rater_id) > 255:
            raise StoreError(f"rater_id: must be a non-empty string of at most 255 characters, got {rater_id!r}")
        if not isinstance(role, str) or not role or len(role) > 64:
            raise StoreError(f"role: must be a non-empty string of at most 64 characters, got {role!r}")
        key, created = _check_key(key, f"rater:{rater_id}"), _created(created)

        def build(s: Session):  # a fresh row per attempt: a rolled-back row is not reused
            existing = s.get(Rater, rater_id)
            return existing.id if existing is not None else Rater(
                id=rater_id, role=role, qualification=str(qualification or ""), key=key, created=created)

        return self._write("rater", key, build)

    def add_generation(self, *, image, prompt: str, findings: list, seed: int, sampler: dict,
                       model_version: str, key: str | None = None, created=None) -> int:
        """Store one generated image and what made it; the image goes to the blob folder first."""
        if not isinstance(prompt, str):
            raise StoreError(f"prompt: expected text, got {type(prompt).__name__}")
        if _as_int(seed) is None:
            raise StoreError(f"seed: expected an integer, got {seed!r}")
        seed = _as_int(seed)
        if not isinstance(sampler, dict):
            raise StoreError(f"sampler: expected a dict of settings, got {type(sampler).__name__}")
        if not isinstance(model_version, str) or not model_version:
            raise StoreError(f"model_version: expected a non-empty string, got {model_version!r}")
        findings = _check_findings(findings)
        try:
            sampler = json.loads(json.dumps(sampler))  # what the JSON column will hold; refused before any write
        except (TypeError, ValueError) as e:
            raise StoreError(f"sampler: not JSON-serialisable: {e}") from e
        sha, loc = self.blobs.put(to_png_bytes(image))  # before the row: no row names a missing file
        key, created = _check_key(key, "generation:" + _digest(sha, prompt, seed, model_version)), _created(created)
        return self._write("generation", key, lambda s: Generation(
            prompt=prompt, findings=findings, seed=seed, sampler=sampler, model_version=model_version,
            image_sha256=sha, image_location=loc, key=key, created=created))

    def add_rating(self, *, generation_id: int, rater_id: str, plausible: bool, failed: Sequence[str] = (),
                   score: int | None = None, comment: str = "", key: str | None = None, created=None) -> int:
        """Record one rater's verdict on one generation (criteria failed from CRITERIA, optional 1-5 score)."""
        plausible, failed, score = _check_rating(plausible, failed, score, comment)

        def build(s: Session) -> Rating:
            gen = _generation_row(s, generation_id, "generation_id")
            _rater_row(s, rater_id)
            return Rating(generation_id=gen.id, rater_id=rater_id, plausible=plausible, failed=failed, score=score,
                          comment=comment, key=key or "rating:" + _digest(gen.key, rater_id, plausible, failed,
                                                                          score, comment),
                          created=_created(created))

        return self._write("rating", None if key is None else _check_key(key, key), build)

    def add_comparison(self, *, generation_a: int, generation_b: int, preferred: str, rater_id: str,
                       key: str | None = None, created=None) -> int:
        """Record which of two generations of the same prompt a rater preferred ("a", "b" or "tie")."""
        if preferred not in PREFERRED:
            raise StoreError(f"preferred: expected one of {', '.join(PREFERRED)}, got {preferred!r}")
        if _as_int(generation_a) is not None and _as_int(generation_a) == _as_int(generation_b):
            raise StoreError(f"generation_b: a comparison needs two different generations, got {generation_a} twice")

        def build(s: Session) -> Comparison:
            a = _generation_row(s, generation_a, "generation_a")
            b = _generation_row(s, generation_b, "generation_b")
            if a.prompt != b.prompt:
                raise StoreError(f"generation_b: generations {a.id} and {b.id} have different prompts "
                                 f"({a.prompt[:60]!r} vs {b.prompt[:60]!r}); comparisons are within one prompt")
            _rater_row(s, rater_id)
            return Comparison(generation_a=a.id, generation_b=b.id, preferred=preferred, rater_id=rater_id,
                              key=key or "comparison:" + _digest(a.key, b.key, preferred, rater_id),
                              created=_created(created))

        return self._write("comparison", None if key is None else _check_key(key, key), build)

    # ------------------------------------------------------------ the write path

    def _write(self, kind: str, key: str | None, build: Callable[[Session], Any]):
        """One committed transaction: the first write's id if the key is stored, else insert + feed.

        ``build(session)`` validates references and returns the new row, or the id of a record already
        stored (a rater id added before). ``key`` None: the key is derived from stored rows by ``build``.
        A concurrent writer committing the same key first makes our insert fail on the unique index;
        the rollback undoes everything, and the second attempt finds the winner's id.
        """
        model = KINDS[kind]
        if key is not None:  # a retry: answer from a read, without queueing for the write lock
            with Session(self.engine) as s:
                if (found := _find(s, model, key)) is not None:
                    return found
        for attempt in (1, 2):
            try:
                with self._thread_lock, Session(self._writer, expire_on_commit=False) as s, s.begin():
                    if key is not None and (found := _find(s, model, key)) is not None:
                        return found
                    row = build(s)
                    if not isinstance(row, model):
                        return row
                    if key is None and (found := _find(s, model, row.key)) is not None:
                        return found
                    s.add(row)
                    s.flush()
                    if self._hook is not None:
                        self._hook("before_feed")
                    self._append_feed(s, kind, row.id)
                    return row.id
            except IntegrityError as e:
                if attempt == 2:
                    raise StoreError(f"{kind} with key {key!r} refused by the database: {e.orig}") from e

    def _append_feed(self, s: Session, kind: str, record_id) -> None:
        """Give this write the next feed seq, as the transaction's last statements.

        Why not an autoincrement / sequence column: those values are handed out at insert time, but
        transactions commit in any order, so a reader could see seq 11 committed, advance its cursor
        to 11, and never see seq 10 committing a moment later. Here the seq is max(seq) + 1 taken
        while holding a lock that is released only at commit: PostgreSQL's transaction-scoped advisory
        lock, SQLite's write lock (every write transaction began with BEGIN IMMEDIATE). No other writer
        can take a seq until this transaction has committed or rolled back, so seq order == commit
        order, and seqs have no gaps. The lock is taken last so that it is held only for two statements.
        """
        if self.engine.dialect.name == "postgresql":
            s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": FEED_LOCK})
        seq = s.scalar(select(func.coalesce(func.max(Feed.seq), 0))) + 1
        s.add(Feed(seq=seq, kind=kind, record_id=str(record_id), created=dt.datetime.now(dt.timezone.utc)))
        s.flush()
        if self._hook is not None:
            self._hook("before_commit")

    # ------------------------------------------------------------ reads

    def generation(self, gid: int) -> GenerationRecord:
        with Session(self.engine) as s:
            return self._generation_record(_generation_row(s, gid, "generation_id"))

    def rating(self, rid: int) -> RatingRecord:
        with Session(self.engine) as s:
            r = s.get(Rating, rid)
            if r is None:
                raise UnknownReference(f"id: no rating with id {rid}")
            return _rating_record(r)

    def comparison(self, cid: int) -> ComparisonRecord:
        with Session(self.engine) as s:
            c = s.get(Comparison, cid)
            if c is None:
                raise UnknownReference(f"id: no comparison with id {cid}")
            return _comparison_record(c)

    def generations(self, ids: Iterable[int] | None = None) -> list[GenerationRecord]:
        """Generations with these ids (in that order), or all of them in id order."""
        with Session(self.engine) as s:
            if ids is None:
                return [self._generation_record(r) for r in s.scalars(select(Generation).order_by(Generation.id))]
            ids = list(ids)
            rows = {r.id: r for chunk in _chunks(ids) for r in
                    s.scalars(select(Generation).where(Generation.id.in_(chunk)))}
        missing = [i for i in ids if i not in rows]
        if missing:
            raise UnknownReference(f"ids: no generation with id {missing[0]}")
        return [self._generation_record(rows[i]) for i in ids]

    def generation_id(self, key: str) -> int | None:
        """The id of the generation written with idempotency key ``key`` (None if there is none)."""
        with Session(self.engine) as s:
            return _find(s, Generation, key)

    def image_path(self, gid: int) -> Path:
        return Path(self.generation(gid).image_path)

    def image(self, gid: int) -> np.ndarray:
        """(H, W) uint8 pixels of a generation's image."""
        with Session(self.engine) as s:
            loc = _generation_row(s, gid, "generation_id").image_location
        return decode(self.blobs.get(loc))

    def image_bytes(self, gid: int) -> bytes:
        with Session(self.engine) as s:
            loc = _generation_row(s, gid, "generation_id").image_location
        return self.blobs.get(loc)

    def ratings(self, after: int = 0) -> list[RatingRecord]:
        return [_rating_record(r) for r in self._after(Rating, "rating", after)]

    def comparisons(self, after: int = 0) -> list[ComparisonRecord]:
        return [_comparison_record(r) for r in self._after(Comparison, "comparison", after)]

    def raters(self) -> list[RaterRecord]:
        with Session(self.engine) as s:
            return [_rater_record(r) for r in s.scalars(select(Rater).order_by(Rater.created, Rater.id))]

    def cursor(self) -> int:
        """The highest seq visible now (0 when the store is empty)."""
        with Session(self.engine) as s:
            return int(s.scalar(select(func.coalesce(func.max(Feed.seq), 0))))

    def counts(self) -> dict[str, int]:
        with Session(self.engine) as s:
            return {kind + "s": int(s.scalar(select(func.count()).select_from(model)))
                    for kind, model in KINDS.items()}

    def unrated(self, rater_id: str, limit: int = 10) -> list[GenerationRecord]:
        """Generations ``rater_id`` has not rated yet, oldest first (a rating page's queue)."""
        done = select(Rating.generation_id).where(Rating.rater_id == rater_id)
        with Session(self.engine) as s:
            q = select(Generation).where(Generation.id.not_in(done)).order_by(Generation.id).limit(limit)
            return [self._generation_record(g) for g in s.scalars(q)]

    def uncompared_pairs(self, rater_id: str, limit: int = 10) -> list[tuple[GenerationRecord, GenerationRecord]]:
        """Pairs of generations with the same prompt that ``rater_id`` has not compared (either order),
        oldest first; each generation in at most one pair of the answer."""
        a, b = Generation.__table__.alias("a"), Generation.__table__.alias("b")
        seen = select(Comparison.generation_a, Comparison.generation_b).where(Comparison.rater_id == rater_id)
        with Session(self.engine) as s:
            done = {frozenset(r) for r in s.execute(seen)}
            q = (select(a.c.id, b.c.id).join(b, (a.c.prompt == b.c.prompt) & (a.c.id < b.c.id))
                 .order_by(a.c.id, b.c.id).limit(50 * limit + 500))
            pairs, used = [], set()
            for x, y in s.execute(q):
                if frozenset((x, y)) in done or x in used or y in used:
                    continue
                pairs.append((x, y))
                used.update((x, y))
                if len(pairs) == limit:
                    break
        recs = {g.id: g for g in self.generations([i for p in pairs for i in p])}
        return [(recs[x], recs[y]) for x, y in pairs]

    def read_after(self, cursor: int = 0, limit: int | None = None) -> Batch:
        """Every event with seq > cursor, in seq order (at most ``limit``), and the cursor to read after next."""
        if isinstance(cursor, bool) or not isinstance(cursor, int) or cursor < 0:
            raise StoreError(f"cursor: expected an integer >= 0, got {cursor!r}")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise StoreError(f"limit: expected a positive integer or None, got {limit!r}")
        with Session(self.engine) as s, s.begin():
            q = select(Feed).where(Feed.seq > cursor).order_by(Feed.seq)
            feed = list(s.scalars(q.limit(limit) if limit else q))
            records = self._load(s, feed)
            events = [Event(int(f.seq), f.kind, records[f.kind, f.record_id]) for f in feed]
        return Batch(events, events[-1].seq if events else cursor)

    # ------------------------------------------------------------ helpers

    def _after(self, model, kind: str, after: int) -> list:
        with Session(self.engine) as s:
            q = (select(model).join(Feed, (Feed.kind == kind) & (Feed.record_id == cast(model.id, String)))
                 .where(Feed.seq > after).order_by(Feed.seq))
            return list(s.scalars(q))

    def _load(self, s: Session, feed: list) -> dict:
        out = {}
        for kind, model in KINDS.items():
            ids = [f.record_id if kind == "rater" else int(f.record_id) for f in feed if f.kind == kind]
            for chunk in _chunks(ids):
                for row in s.scalars(select(model).where(model.id.in_(chunk))):
                    out[kind, str(row.id)] = self._record(kind, row)
        return out

    def _record(self, kind: str, row):
        if kind == "generation":
            return self._generation_record(row)
        return {"rater": _rater_record, "rating": _rating_record, "comparison": _comparison_record}[kind](row)

    def _generation_record(self, r: Generation) -> GenerationRecord:
        return GenerationRecord(r.id, r.prompt, list(r.findings), int(r.seed), dict(r.sampler), r.model_version,
                                r.image_sha256, str(self.blobs.path(r.image_location).resolve()), r.key,
                                _iso(r.created))


def _chunks(ids: list) -> Iterable[list]:
    for i in range(0, len(ids), CHUNK):
        yield ids[i:i + CHUNK]


def _find(s: Session, model, key: str):
    return s.scalar(select(model.id).where(model.key == key))


def _as_int(value) -> int | None:
    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        return operator.index(value)  # ints and numpy integers, not floats or strings
    except TypeError:
        return None


def _generation_row(s: Session, gid, field: str) -> Generation:
    row = s.get(Generation, _as_int(gid)) if _as_int(gid) is not None else None
    if row is None:
        raise UnknownReference(f"{field}: no generation with id {gid!r} in this store")
    return row


def _rater_row(s: Session, rater_id) -> Rater:
    row = s.get(Rater, rater_id) if isinstance(rater_id, str) else None
    if row is None:
        raise UnknownReference(f"rater_id: no rater {rater_id!r} in this store; add it first with add_rater")
    return row


def _rater_record(r: Rater) -> RaterRecord:
    return RaterRecord(r.id, r.role, r.qualification, _iso(r.created))


def _rating_record(r: Rating) -> RatingRecord:
    return RatingRecord(r.id, r.generation_id, r.rater_id, bool(r.plausible), list(r.failed),
                        None if r.score is None else int(r.score), r.comment, r.key, _iso(r.created))


def _comparison_record(r: Comparison) -> ComparisonRecord:
    return ComparisonRecord(r.id, r.generation_a, r.generation_b, r.preferred, r.rater_id, r.key, _iso(r.created))
