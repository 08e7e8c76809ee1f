"""Jobs: long-running requests (the service's augmentation batches) kept in the store's database.

BentoML's own task database is a SQLite file deleted whenever a server starts (issue 9), so a job's
spec, state and progress live here instead, in the same database as the feedback (SQLite or
PostgreSQL), where every replica of the service sees them. A job that was running in a process
that has gone (a restart, a crash) is marked failed by ``fail_orphans`` with what it had done, so a
job never vanishes; resubmitting the same spec gives the same images (its seeds are in the spec).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import socket
import uuid
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from .errors import StoreError
from .models import Job
from .store import FeedbackStore

STATES = ("queued", "running", "done", "failed")


def owner_id() -> str:
    """host:pid:start of this process: who runs a job. The start time makes it one process, not one pid:
    a restarted container numbers its processes as the last one did (same pod name, same pids), so a
    restarted worker could otherwise take a dead worker's job for its own and leave it running forever."""
    start = _start_ticks(os.getpid())
    return f"{socket.gethostname()}:{os.getpid()}" + (f":{start}" if start else "")


def _start_ticks(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot: /proc/PID/stat field 22); None without /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # after the command name, which may hold spaces; field 3 first
    return fields[19] if len(fields) > 19 else None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclasses.dataclass(frozen=True)
class JobRecord:
    id: str
    kind: str
    spec: dict
    state: str
    total: int
    done: int
    sampled: int
    error: str
    result: str
    owner: str
    created: str
    updated: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _record(j: Job) -> JobRecord:
    return JobRecord(id=j.id, kind=j.kind, spec=j.spec, state=j.state, total=j.total, done=j.done,
                     sampled=j.sampled, error=j.error, result=j.result, owner=j.owner,
                     created=j.created.isoformat(), updated=j.updated.isoformat())


class Jobs:
    """Create, update and read jobs in a feedback store's database; thread-safe like the store."""

    def __init__(self, store: FeedbackStore) -> None:
        self.engine = store.engine

    def create(self, kind: str, spec: dict, total: int, job_id: str | None = None) -> JobRecord:
        now = _now()
        job = Job(id=job_id or uuid.uuid4().hex, kind=kind, spec=spec, state="queued", total=int(total), done=0,
                  sampled=0, error="", result="", owner=owner_id(), created=now, updated=now)
        with Session(self.engine, expire_on_commit=False) as s, s.begin():
            if s.get(Job, job.id) is not None:
                raise StoreError(f"job {job.id!r} already exists")
            s.add(job)
        return _record(job)

    def get(self, job_id: str) -> JobRecord | None:
        with Session(self.engine) as s:
            j = s.get(Job, job_id)
            return _record(j) if j is not None else None

    def list(self, state: str | None = None, limit: int = 100) -> list[JobRecord]:
        q = select(Job).order_by(Job.created.desc()).limit(limit)
        if state is not None:
            q = q.where(Job.state == state)
        with Session(self.engine) as s:
            return [_record(j) for j in s.scalars(q)]

    def _set(self, job_id: str, **values) -> None:
        with Session(self.engine) as s, s.begin():
            n = s.execute(update(Job).where(Job.id == job_id).values(updated=_now(), **values)).rowcount
        if n != 1:
            raise StoreError(f"no job {job_id!r}")

    def start(self, job_id: str) -> None:
        self._set(job_id, state="running", owner=owner_id())

    def progress(self, job_id: str, done: int, sampled: int) -> None:
        self._set(job_id, done=int(done), sampled=int(sampled))

    def finish(self, job_id: str, result: str, done: int, sampled: int) -> None:
        self._set(job_id, state="done", result=str(result), done=int(done), sampled=int(sampled))

    def fail(self, job_id: str, error: str) -> None:
        self._set(job_id, state="failed", error=str(error)[:4000])

    def fail_orphans(self) -> list[str]:
        """Mark failed every queued / running job whose owner on this host no longer runs, i.e. jobs of
        processes that ended before finishing them. Returns their ids.

        Only owners on this host are judged: another host's jobs may still be running.
        """
        host = socket.gethostname()
        with Session(self.engine) as s, s.begin():
            rows = s.scalars(select(Job).where(Job.state.in_(("queued", "running")))).all()
            gone = [j for j in rows if j.owner.split(":", 1)[0] == host and not _owner_alive(j.owner)]
            for j in gone:
                j.state, j.updated = "failed", _now()
                j.error = (f"interrupted: the server process running it ({j.owner}) stopped after {j.done} of "
                           f"{j.total} images; submit the same request again (same seed, same images)")
            ids = [j.id for j in gone]
        return ids


def _owner_alive(owner: str) -> bool:
    """Whether the process named by host:pid[:start] still runs on this host: the pid exists (signal 0
    probes without signalling) and, where the owner names its start time, started then (not a reused pid)."""
    parts = owner.split(":")
    try:
        pid = int(parts[1])
    except (IndexError, ValueError):
        return False
    if len(parts) > 2:  # host:pid:start (written since pids are known to be reused; see owner_id)
        return _start_ticks(pid) == parts[2]
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
