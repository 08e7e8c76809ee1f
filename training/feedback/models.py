"""SQLAlchemy 2 models of the feedback store (issue 7, section 1).

Five tables: ``raters``, ``generations`` (what was generated, and the content hash of the image
file; never the pixels), ``ratings`` and ``comparisons`` (expert feedback), and ``feed``, which
gives every write a sequence number, the cursor of ``FeedbackStore.read_after``. Every record
table has a unique ``key`` (the write's idempotency key). Constraint names follow one naming
convention so that Alembic migrations and these models compare equal on SQLite and PostgreSQL.
The migration in ``migrations/versions`` must describe exactly these tables
(tests/test_feedback_migrations.py checks it with Alembic's ``compare_metadata``).
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (JSON, BigInteger, Boolean, CheckConstraint, DateTime, ForeignKey, Integer, MetaData,
                        SmallInteger, String, Text, UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Fixed list of criteria a rater can mark as failed (issue 7, section 1).
CRITERIA: tuple[str, ...] = ("finding_absent", "wrong_side", "wrong_size", "unprompted_finding", "anatomy",
                             "posture", "artefact")
PREFERRED: tuple[str, ...] = ("a", "b", "tie")
KEY_LENGTH = 255  # longest idempotency key / rater id accepted

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def _key() -> Mapped[str]:
    return mapped_column(String(KEY_LENGTH), unique=True)


def _created() -> Mapped[dt.datetime]:
    return mapped_column(DateTime(timezone=True))


class Rater(Base):
    __tablename__ = "raters"
    id: Mapped[str] = mapped_column(String(KEY_LENGTH), primary_key=True)  # chosen by the caller, e.g. "panel-3"
    role: Mapped[str] = mapped_column(String(64))  # "radiologist", "resident", "simulated", ...
    qualification: Mapped[str] = mapped_column(Text)  # free text
    key: Mapped[str] = _key()
    created: Mapped[dt.datetime] = _created()


class Generation(Base):
    __tablename__ = "generations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prompt: Mapped[str] = mapped_column(Text)
    findings: Mapped[list] = mapped_column(JSON)  # list of Finding.to_dict()
    seed: Mapped[int] = mapped_column(BigInteger)
    sampler: Mapped[dict] = mapped_column(JSON)  # steps, guidance_scale, scheduler, size, ...
    model_version: Mapped[str] = mapped_column(String(KEY_LENGTH))
    image_sha256: Mapped[str] = mapped_column(String(64), index=True)
    image_location: Mapped[str] = mapped_column(String(KEY_LENGTH))  # relative to the blob folder
    key: Mapped[str] = _key()
    created: Mapped[dt.datetime] = _created()


class Rating(Base):
    __tablename__ = "ratings"
    __table_args__ = (CheckConstraint("score IS NULL OR (score >= 1 AND score <= 5)", name="score_range"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    generation_id: Mapped[int] = mapped_column(ForeignKey("generations.id"), index=True)
    rater_id: Mapped[str] = mapped_column(ForeignKey("raters.id"), index=True)
    plausible: Mapped[bool] = mapped_column(Boolean)
    failed: Mapped[list] = mapped_column(JSON)  # subset of CRITERIA, in CRITERIA's order
    score: Mapped[int | None] = mapped_column(SmallInteger, nullable=True)  # optional 1-5
    comment: Mapped[str] = mapped_column(Text)
    key: Mapped[str] = _key()
    created: Mapped[dt.datetime] = _created()


class Comparison(Base):
    __tablename__ = "comparisons"
    __table_args__ = (CheckConstraint("preferred IN ('a', 'b', 'tie')", name="preferred_choice"),
                      CheckConstraint("generation_a <> generation_b", name="two_generations"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    generation_a: Mapped[int] = mapped_column(ForeignKey("generations.id"), index=True)
    generation_b: Mapped[int] = mapped_column(ForeignKey("generations.id"), index=True)
    preferred: Mapped[str] = mapped_column(String(3))
    rater_id: Mapped[str] = mapped_column(ForeignKey("raters.id"), index=True)
    key: Mapped[str] = _key()
    created: Mapped[dt.datetime] = _created()


class Feed(Base):
    """One row per committed write. ``seq`` is assigned under a lock held until commit, so seq order is
    commit order (see ``store._append_feed``); it is not an autoincrement column on purpose."""

    __tablename__ = "feed"
    __table_args__ = (UniqueConstraint("kind", "record_id"),)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(16))  # "rater" | "generation" | "rating" | "comparison"
    record_id: Mapped[str] = mapped_column(String(KEY_LENGTH))  # the record's id, as text
    created: Mapped[dt.datetime] = _created()


class Job(Base):
    """A long-running request (the service's augmentation batches, issue 9): its spec, state and
    progress live here, not in BentoML's task database, which is deleted when a server starts."""

    __tablename__ = "jobs"
    __table_args__ = (CheckConstraint("state IN ('queued', 'running', 'done', 'failed')", name="state_choice"),)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # uuid4 hex, chosen by the caller
    kind: Mapped[str] = mapped_column(String(32))  # "augment"
    spec: Mapped[dict] = mapped_column(JSON)  # the validated request
    state: Mapped[str] = mapped_column(String(16), index=True)
    total: Mapped[int] = mapped_column(Integer)  # images wanted
    done: Mapped[int] = mapped_column(Integer)  # images accepted so far
    sampled: Mapped[int] = mapped_column(Integer)  # images generated so far (done / sampled = acceptance rate)
    error: Mapped[str] = mapped_column(Text)  # why it failed ("" otherwise)
    result: Mapped[str] = mapped_column(Text)  # path of the result archive once done ("" before)
    owner: Mapped[str] = mapped_column(String(KEY_LENGTH))  # host:pid:start of the process running it (jobs.owner_id)
    created: Mapped[dt.datetime] = _created()
    updated: Mapped[dt.datetime] = _created()


KINDS = {"rater": Rater, "generation": Generation, "rating": Rating, "comparison": Comparison}
