"""Reliability of the served API (issue 11, section 4): load, crash, reload under load, bad artefacts, auth.

Every test drives a real ``bentoml serve`` on loopback (tests/service_support.py). Each has a short
version that CI runs (``make test``) and a long one marked ``slow``; ``CXRGEN_RELIABILITY_SECONDS``
sets the long versions' load duration (default 120 s; RELIABILITY.md says why not longer). With ``CXRGEN_RELIABILITY_OUT`` naming a JSON
file, every test merges its measurements into it: ``benchmarks/reliability.py`` reruns the long
versions that way and renders RELIABILITY.md from the file.

Fuzzing is tests/test_service_schema.py (schemathesis over every operation of the OpenAPI schema).
Tests elsewhere that these extend rather than repeat: test_service.py (auth on a few routes, reload
of a missing / partial checkpoint in-process, the job table's orphan rule), test_service_e2e.py (a
job running at a crash is reported failed; a missing checkpoint at start-up).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from service_support import DEFAULT_VERSION, KEYS, auth, record_measurement as record, start_live

MiB = 2**20


@dataclasses.dataclass(frozen=True)
class Scale:
    name: str
    seconds: float  # measured load (load test; the reload test reloads for as long)
    clients: int  # concurrent clients under load (the crash test always has 32 writers, as issue 11 asks)
    crash_seconds: float  # the 32 writers write this long before the kill
    workers: int  # server worker processes in the crash test


SHORT = Scale("short", seconds=20, clients=6, crash_seconds=5, workers=1)
_LONG_S = float(os.environ.get("CXRGEN_RELIABILITY_SECONDS", "120"))
LONG = Scale("long", seconds=_LONG_S, clients=12, crash_seconds=min(60.0, _LONG_S / 5), workers=2)
SCALES = [pytest.param(SHORT, id="short"), pytest.param(LONG, id="long", marks=pytest.mark.slow)]
PROMPTS = ("Moderate left pleural effusion.", "Cardiomegaly.", "No acute cardiopulmonary process.",
           "Right upper lobe pneumonia.")
# Generation at the API's smallest size and 2 steps: the requests exercise batching, scoring and storage,
# and a 2-core CPU still answers hundreds of them in a short run (25 steps at 128 px take ~0.7 s each).
GEN = {"steps": 2, "size": 64}
# RSS growth allowed over the measured phase of the load test, which starts once RSS has stopped rising
# (``warm_up``). Under the full mix on two workers RSS rises by tens of MiB over the first several thousand
# requests and then moves within tens of MiB either way (benchmarks/rss_phases.py, RSS growth per 60 s phase:
# benchmarks/results/rss-phases-cpu.json; MALLOC_ARENA_MAX=2 no better). Not pinned down per part; likely allocator arenas of the request threads,
# SQLite's page cache per pooled connection (2 MiB each, filling as the store grows), torch's per-shape caches,
# BentoML's metrics files. A
# fixed 24 s warm-up ended inside that rise and a 120 s run read it as 5 KiB per request. Before
# service/bentoml_fixes.py BentoML's request timer kept every request's OpenTelemetry span for
# traffic.timeout = 3600 s: 5-6 KiB per request, linearly (RELIABILITY.md); that, or a leak of a 64 px image
# per generation (16 KiB as float32, ~25 MiB over the ~1,600 generations of a 120 s run), never levels off:
# the warm-up then ends at its cap and the measured phase exceeds this bound.
RSS_TOLERANCE = 32 * MiB
WARM_STEADY = 4 * MiB  # a warm-up chunk that grew RSS by no more than this counts as level


def warm_up(live, scale: "Scale") -> dict:
    """Drive the mix in chunks of max(5 s, seconds / 8) until RSS has stayed level for two chunks in a row,
    for at most twice the measured phase; what it took."""
    chunk, cap = max(5.0, scale.seconds / 8), 2 * scale.seconds
    start = last = live.rss()
    level, took, requests, growth = 0, 0.0, 0, []
    while took < cap and level < 2:
        run = f"warm-{scale.name}-{len(growth)}"
        requests += len(drive(live, scale.clients, chunk, live.ids, live.pairs, run=run))
        took += chunk
        time.sleep(1)
        now = live.rss()
        growth.append(round((now - last) / MiB, 1))
        level = level + 1 if now - last <= WARM_STEADY else 0
        last = now
    return {"warmup_s": took, "warmup_requests": requests, "warmup_level": level >= 2,
            "rss_start_mib": round(start / MiB, 1), "warmup_growth_mib": growth}


def limits_env() -> dict:
    """Per-key rate limiting (issue 11, section 5) would turn these tests' clients away with 429: off. What is
    measured here is the service under load, not its limiter (tested on its own)."""
    return {"CXRGEN_RATE_LIMITS": "off"}


# ---------------------------------------------------------------- the load generator


@dataclasses.dataclass
class Outcome:
    route: str
    status: int  # 0: no answer (connection refused or reset, timeout)
    seconds: float


def _mix(ids: list[int], pairs: list[tuple[int, int]]):
    """(route, weight, request) for the load: generation mixed with the cheap routes a deployment serves."""

    def generate(c, rng, tag):
        return c.post("/generate", json={"prompt": rng.choice(PROMPTS), "seed": rng.randrange(10**6), **GEN},
                      headers=auth("client"))

    def png(c, rng, tag):
        return c.post("/generate/png", json={"prompt": rng.choice(PROMPTS), **GEN}, headers=auth("client"))

    def rating(c, rng, tag):
        return c.post("/feedback/rating", json={"generation_id": rng.choice(ids), "rater_id": f"load-{tag[0]}",
                                                "plausible": rng.random() < 0.5, "key": f"load-{tag[0]}-{tag[1]}"},
                      headers=auth("rater"))

    def comparison(c, rng, tag):
        a, b = rng.choice(pairs)
        return c.post("/feedback/comparison", json={"generation_a": a, "generation_b": b, "rater_id": f"load-{tag[0]}",
                                                    "preferred": rng.choice("ab"), "key": f"load-c-{tag[0]}-{tag[1]}"},
                      headers=auth("rater"))

    return [
        ("generate", 3, generate),
        ("generate/png", 1, png),
        ("feedback/rating", 3, rating),
        ("feedback/comparison", 1, comparison),
        ("models", 1, lambda c, rng, tag: c.get("/models", headers=auth("client"))),
        ("metrics", 1, lambda c, rng, tag: c.get("/metrics")),
        ("feedback/queue", 1, lambda c, rng, tag: c.get(f"/feedback/queue?rater=load-{tag[0]}&limit=5",
                                                      headers=auth("rater"))),
        ("image", 1, lambda c, rng, tag: c.get(f"/generations/{rng.choice(ids)}/image.png", headers=auth("rater"))),
        ("feedback/stream", 1, lambda c, rng, tag: c.get("/feedback/stream?images=false&limit=50",
                                                       headers=auth("trainer"))),
    ]


def drive(live, clients: int, seconds: float, ids, pairs, stop: threading.Event | None = None,
          run: str = "load") -> list[Outcome]:
    """``clients`` threads sending the mix back to back for ``seconds`` (or until ``stop``); every answer."""
    mix = _mix(ids, pairs)
    routes, weights = [m[0] for m in mix], [m[1] for m in mix]
    deadline = time.monotonic() + seconds
    out: list[Outcome] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        rng = random.Random(f"{run}-{n}")
        mine = []
        with httpx.Client(base_url=live.url, timeout=120) as c:
            i = 0
            while time.monotonic() < deadline and not (stop and stop.is_set()):
                k = rng.choices(range(len(mix)), weights)[0]
                t = time.perf_counter()
                try:
                    r = mix[k][2](c, rng, (f"{run}-{n}", i))
                    if routes[k] == "feedback/stream":
                        ok = r.status_code == 200 and json.loads(r.text.splitlines()[-1])["kind"] == "end"
                        status = r.status_code if ok else 599  # a stream cut short is an error too
                    else:
                        status = r.status_code
                except httpx.TransportError:
                    status = 0
                mine.append(Outcome(routes[k], status, time.perf_counter() - t))
                i += 1
        with lock:
            out.extend(mine)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def summary(outcomes: list[Outcome], seconds: float) -> dict:
    """Requests, errors (anything but 2xx), latency percentiles overall and per route."""

    def pct(xs):
        xs = np.asarray(xs)
        return {"n": int(xs.size), "p50_s": round(float(np.percentile(xs, 50)), 4),
                "p99_s": round(float(np.percentile(xs, 99)), 4)} if xs.size else {"n": 0}

    errors = [o for o in outcomes if not 200 <= o.status < 300]
    routes = sorted({o.route for o in outcomes})
    return {"requests": len(outcomes), "errors": len(errors), "seconds": round(seconds, 1),
            "requests_per_s": round(len(outcomes) / max(seconds, 1e-9), 2),
            "error_examples": sorted({f"{o.route} -> {o.status}" for o in errors})[:10],
            "latency": pct([o.seconds for o in outcomes]),
            "by_route": {r: pct([o.seconds for o in outcomes if o.route == r]) for r in routes}}


# ---------------------------------------------------------------- one server for load, reload and auth


def seed_generations(live) -> None:
    """Eight stored generations (four prompts, two each) for the mix's feedback routes: ``live.ids`` and
    ``live.pairs`` (the two images of each prompt)."""
    ids, pairs = [], []
    with live.client("client") as c:
        for i, prompt in enumerate(PROMPTS):
            r = c.post("/generate", json={"prompt": prompt, "n": 2, "seed": i, **GEN})
            assert r.status_code == 200, r.text
            got = [im["id"] for im in r.json()["images"]]
            ids += got
            pairs.append(tuple(got))
    live.ids, live.pairs = ids, pairs


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A real server with two workers, API keys and eight stored generations (four prompts, two each)."""
    live = start_live(tmp_path_factory.mktemp("reliability"), workers=2, **limits_env())
    try:
        seed_generations(live)
        yield live
    finally:
        live.stop()


@pytest.mark.parametrize("scale", SCALES)
def test_load_no_errors_flat_memory(served, scale):
    """Concurrent clients for a bounded time: every request answered 2xx, RSS flat once the warm-up has levelled."""
    warm = warm_up(served, scale)
    before = served.rss()
    samples, stop = [], threading.Event()

    def sample():  # RSS every 2 s: the peak, and a trend a single pair of readings could miss
        while not stop.wait(2):
            samples.append(served.rss())

    sampler = threading.Thread(target=sample)
    sampler.start()
    t = time.monotonic()
    outcomes = drive(served, scale.clients, scale.seconds, served.ids, served.pairs, run=f"load-{scale.name}")
    took = time.monotonic() - t
    stop.set()
    sampler.join()
    time.sleep(1)
    after = served.rss()
    s = summary(outcomes, took)
    half = samples[len(samples) // 2] if samples else after
    s.update(clients=scale.clients, workers=2, **warm, rss_before_mib=round(before / MiB, 1),
             rss_mid_mib=round(half / MiB, 1), rss_after_mib=round(after / MiB, 1),
             rss_peak_mib=round(max(samples + [after]) / MiB, 1), rss_tolerance_mib=RSS_TOLERANCE / MiB)
    record(f"load[{scale.name}]", s)
    assert s["errors"] == 0, s["error_examples"]
    assert s["by_route"]["generate"]["n"] > 0 and s["by_route"]["feedback/rating"]["n"] > 0
    assert after - before <= RSS_TOLERANCE, f"RSS grew {(after - before) / MiB:.1f} MiB under load: {s}"


def _corrupt_copy(src: Path, dest: Path, how: str) -> Path:
    """A copy of a checkpoint with one file damaged as an interrupted copy or a bad disk would leave it."""
    shutil.copytree(src, dest)
    if how == "truncated unet weights":
        f = dest / "unet" / "diffusion_pytorch_model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "empty text encoder weights":
        (dest / "text_encoder" / "model.safetensors").write_bytes(b"")
    elif how == "truncated manifest":
        f = dest / "cxrgen_manifest.json"
        f.write_text(f.read_text()[:200])
    else:
        raise ValueError(how)
    return dest


CORRUPTIONS = {"truncated unet weights": "diffusion_pytorch_model.safetensors",
               "empty text encoder weights": "model.safetensors", "truncated manifest": "cxrgen_manifest.json"}


@pytest.mark.parametrize("scale", SCALES)
def test_reload_under_load_fails_no_request(served, scale, tmp_path):
    """POST /models/reload, again and again, while clients generate and write feedback: no request fails; a
    corrupt checkpoint in between gets 422 with the reason and the serving model stays."""
    from training.generation import DEFAULT_MODEL

    good = tmp_path / "v2"
    shutil.copytree(DEFAULT_MODEL, good)
    bad = _corrupt_copy(DEFAULT_MODEL, tmp_path / "bad", "truncated unet weights")
    stop, result = threading.Event(), {}
    load = threading.Thread(target=lambda: result.update(out=drive(
        served, scale.clients, scale.seconds + 120, served.ids, served.pairs, stop=stop, run=f"reload-{scale.name}")))
    t = time.monotonic()
    load.start()
    reloads, refused, sources = [], [], [str(good), str(bad), str(DEFAULT_MODEL)]
    with served.client("admin") as admin:
        i = 0
        while time.monotonic() - t < scale.seconds:
            time.sleep(2)
            source = sources[i % 3]
            r = admin.post("/models/reload", json={"source": source})
            (refused if source == str(bad) else reloads).append((r.status_code, r.json()))
            i += 1
        stop.set()
        load.join()
        took = time.monotonic() - t
        while i % 3:  # end on the default model, for the tests that follow
            if sources[i % 3] != str(bad):
                assert admin.post("/models/reload", json={"source": sources[i % 3]}).status_code == 200
            i += 1
        serving = _settled_on_default(admin)
    s = summary(result["out"], took)
    s.update(clients=scale.clients, workers=2, reloads=len(reloads), refused_reloads=len(refused),
             reloads_ok=sum(code == 200 for code, _ in reloads))
    record(f"reload[{scale.name}]", s)
    assert s["errors"] == 0, s["error_examples"]
    assert len(reloads) >= 2 and all(code == 200 for code, _ in reloads), reloads
    damaged = "unet/diffusion_pytorch_model.safetensors is damaged"
    assert refused and all(code == 422 and "still serving" in body["error"] and damaged in body["error"]
                           for code, body in refused), refused
    assert serving["path"] == str(DEFAULT_MODEL) and serving["version"] == DEFAULT_VERSION, serving


def _settled_on_default(admin) -> dict:
    """/models' serving model once every worker serves the default (after a reload, the other worker follows
    within its 1 s poll; each GET reaches one worker, so twelve in a row must all say so), without
    ``loaded_at``: each worker loaded it at its own second."""
    from training.generation import DEFAULT_MODEL

    for _ in range(60):
        seen = [admin.get("/models").json()["serving"] for _ in range(12)]
        if all(m["path"] == str(DEFAULT_MODEL) for m in seen):
            return {k: v for k, v in seen[-1].items() if k != "loaded_at"}
        time.sleep(0.5)
    raise AssertionError(f"the workers did not all return to {DEFAULT_MODEL}: {seen}")


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_a_corrupt_checkpoint_at_reload_is_422_and_the_old_model_serves(served, how, tmp_path):
    """Each way a checkpoint can be damaged (test_service.py has a missing folder and a missing unet/)."""
    from training.generation import DEFAULT_MODEL

    bad = _corrupt_copy(DEFAULT_MODEL, tmp_path / "bad", how)
    with served.client("admin") as admin:
        before = _settled_on_default(admin)
        r = admin.post("/models/reload", json={"source": str(bad)})
        assert r.status_code == 422 and r.json()["field"] == "source", r.text
        assert CORRUPTIONS[how] in r.json()["error"] and f"still serving {DEFAULT_VERSION}" in r.json()["error"]
        assert _settled_on_default(admin) == before
        g = admin.post("/generate", json={"prompt": "Cardiomegaly.", **GEN})
        assert g.status_code == 200 and g.json()["model_version"] == before["version"]
    record(f"corrupt-reload[{how}]", {"reload_status": r.status_code, "names_file": True,
                                      "reason": r.json()["error"].split(str(bad))[-1].strip(": ")[:200],
                                      "next_generate_status": g.status_code, "served_by": g.json()["model_version"]})


@pytest.mark.parametrize("how", [pytest.param(h, marks=[] if h == "truncated unet weights" else pytest.mark.slow)
                                 for h in CORRUPTIONS])
def test_a_corrupt_checkpoint_at_start_up_is_never_ready(how, tmp_path):
    """Kubernetes' view of a bad model volume: /livez 200 (no restart loop), /readyz 503, a log line naming
    the damaged file, and requests refused with 503 saying so (test_service_e2e: a missing folder)."""
    from training.generation import DEFAULT_MODEL

    bad = _corrupt_copy(DEFAULT_MODEL, tmp_path / "bad", how)
    live = start_live(tmp_path / "srv", workers=1, ready=False, CXRGEN_MODEL=bad, **limits_env())
    try:
        for _ in range(240):  # the load runs in the background; wait for its verdict in the log
            if "the models failed to load" in live.log.read_text(errors="replace"):
                break
            time.sleep(0.5)
        log = live.log.read_text(errors="replace")
        assert "the models failed to load" in log and CORRUPTIONS[how] in log, log[-3000:]
        with live.client("client") as c:
            codes = {path: c.get(path).status_code for path in ("/livez", "/readyz", "/models")}
            r = c.post("/generate", json={"prompt": "Cardiomegaly.", **GEN})
        assert codes == {"/livez": 200, "/readyz": 503, "/models": 503}, codes
        assert r.status_code == 503 and "failed to load" in r.json()["error"]
    finally:
        live.stop()
    record(f"corrupt-start[{how}]", {**codes, "/generate": r.status_code, "log_names_file": True})


# ---------------------------------------------------------------- auth on every route


def _operations(live) -> list[tuple[str, str]]:
    """(method, path) of every operation in the served OpenAPI schema, path parameters filled in."""
    schema = httpx.get(live.url + "/docs.json", timeout=30).json()
    fill = {"{gid}": "1", "{job}": "nope"}
    ops = []
    for path, item in schema["paths"].items():
        for method in item:
            if method in ("get", "post", "put", "patch", "delete"):
                for k, v in fill.items():
                    path = path.replace(k, v)
                assert "{" not in path, f"fill in the parameter of {path}"
                ops.append((method.upper(), path))
    return ops


def test_every_route_checks_keys_and_roles(served):
    """Every operation of the schema: no key and a wrong key -> 401, a key without the role -> 403, the role's
    key -> neither (a 4xx for the empty body is fine; nothing runs). Public routes answer without a key."""
    from service.security import ROLES, required_role

    ops = _operations(served)
    assert len(ops) >= 20  # generate, feedback, models, augment (and BentoML's task routes), stream, ui...
    wrong_key = {"Authorization": "Bearer not-a-key-0123456789abcdef"}
    checked = {"public": 0, "401": 0, "403": 0, "allowed": 0}
    with httpx.Client(base_url=served.url, timeout=60) as c:
        def call(method, path, headers):
            body = {"json": {}} if method in ("POST", "PUT", "PATCH") else {}
            return c.request(method, path, headers=headers, **body).status_code

        for method, path in ops:
            role = required_role(method, path)
            assert role != "any", f"{method} {path} has no rule in service/security.py RULES"
            if role is None:
                assert call(method, path, {}) < 400, (method, path)
                checked["public"] += 1
                continue
            for headers in ({}, wrong_key, {"X-API-Key": "not-a-key-0123456789abcdef"},
                            {"Authorization": KEYS[role]}):  # the right key without "Bearer "
                assert call(method, path, headers) == 401, (method, path, headers)
                checked["401"] += 1
            for other in ROLES:
                if other in (role, "admin"):
                    continue
                assert call(method, path, auth(other)) == 403, (method, path, other)
                checked["403"] += 1
            for who in (role, "admin"):
                code = call(method, path, auth(who))
                assert code not in (401, 403) and code < 500, (method, path, who, code)
                checked["allowed"] += 1
    record("auth", {"operations": len(ops), "checks": checked})


# ---------------------------------------------------------------- crash: kill -9 under 32 writers

WRITERS = 32


@dataclasses.dataclass
class Write:
    key: str
    kind: str  # "rating" | "comparison"
    body: dict
    id: int | None = None  # the id the server acknowledged


@dataclasses.dataclass
class Crash:
    """What the writers share: the kill and the restart."""
    killed: threading.Event = dataclasses.field(default_factory=threading.Event)
    restarted: threading.Event = dataclasses.field(default_factory=threading.Event)
    url: str = ""  # the restarted server's


def _writer(url: str, n: int, ids, pairs, crash: Crash, done: dict) -> None:
    """One client: writes until the server stops answering, then waits for the restart and retries its
    unacknowledged write with the same idempotency key."""
    rng = random.Random(n)
    acked, pending, errors = [], None, []
    with httpx.Client(base_url=url, timeout=30, headers=auth("rater")) as c:
        i = 0
        while pending is None:
            if rng.random() < 0.7:
                w = Write(f"crash-{n}-{i}", "rating", {"generation_id": rng.choice(ids), "rater_id": f"crash-{n}",
                                                       "plausible": rng.random() < 0.5, "score": rng.randint(1, 5)})
            else:
                a, b = rng.choice(pairs)
                w = Write(f"crash-{n}-{i}", "comparison", {"generation_a": a, "generation_b": b,
                                                           "preferred": rng.choice(["a", "b", "tie"]),
                                                           "rater_id": f"crash-{n}"})
            try:
                r = c.post(f"/feedback/{w.kind}", json={**w.body, "key": w.key})
            except httpx.TransportError:
                pending = w
                break
            if r.status_code == 200:
                w.id = r.json()["id"]
                acked.append(w)
            elif r.status_code >= 500:  # while dying, a server may still answer an error; before, it is a bug
                if not crash.killed.is_set():
                    errors.append(f"{w.key}: {r.status_code} before the kill: {r.text[:200]}")
                pending = w
            else:
                errors.append(f"{w.key}: {r.status_code} {r.text[:200]}")
                break
            i += 1
    done[n] = {"acked": acked, "pending": pending, "errors": errors}
    if pending is None or not crash.restarted.wait(600):
        return
    with httpx.Client(base_url=crash.url, timeout=60, headers=auth("rater")) as c:
        for _ in range(20):
            try:
                r = c.post(f"/feedback/{pending.kind}", json={**pending.body, "key": pending.key})
            except httpx.TransportError:
                time.sleep(1)
                continue
            if r.status_code == 200:
                pending.id = r.json()["id"]
                return
            errors.append(f"retry {pending.key}: {r.status_code} {r.text[:200]}")
            return


def _rows(store_url: str) -> dict:
    """Every rating / comparison row and feed entry in the store, read with SQL (not through the feed)."""
    import tempfile

    from sqlalchemy import select

    from training.feedback.models import Comparison, Feed, Rating
    from training.feedback.store import open_store

    with tempfile.TemporaryDirectory() as blobs, open_store(store_url, blobs) as store:
        with store.engine.connect() as conn:
            return {"rating": [tuple(r) for r in conn.execute(select(Rating.key, Rating.id, Rating.generation_id,
                                                                     Rating.plausible))],
                    "comparison": [tuple(r) for r in conn.execute(select(Comparison.key, Comparison.id,
                                                                         Comparison.generation_a,
                                                                         Comparison.preferred))],
                    "feed": [tuple(r) for r in conn.execute(select(Feed.kind, Feed.record_id))]}


@pytest.mark.parametrize("scale", SCALES)
def test_kill_9_under_32_writers_loses_and_doubles_nothing(store_url, scale, tmp_path):
    """kill -9 the whole server while 32 clients write feedback and an augmentation batch runs. After a restart
    on the same store: every acknowledged write is there once, with what was sent; each client's
    unacknowledged write, retried with its idempotency key, is there once; the batch reports failure
    (never a partial archive presented as done)."""
    root = tmp_path / "srv"
    backend = "postgresql" if store_url.startswith("postgresql") else "sqlite"
    live = start_live(root, workers=scale.workers, store=store_url, CXRGEN_WARMUP=0, **limits_env())
    crash, done = Crash(), {}
    try:
        # 1. Generations to rate, and an augmentation batch that is running when the server dies.
        with live.client("client") as c:
            ids, pairs = [], []
            for i, prompt in enumerate(PROMPTS):
                r = c.post("/generate", json={"prompt": prompt, "n": 2, "seed": i, "score": False, **GEN})
                assert r.status_code == 200, r.text
                got = [im["id"] for im in r.json()["images"]]
                ids += got
                pairs.append(tuple(got))
            task = c.post("/augment", json={"count": 10_000, "labels": {"edema": 1, "no_finding": 1}, **GEN})
            assert task.status_code == 200, task.text
            task = task.json()["task_id"]
            for _ in range(240):
                job = c.get(f"/augment/{task}").json()
                if job.get("state") == "running" and job["done"] > 0:
                    break
                time.sleep(0.25)
            assert job["state"] == "running", job
        # 2. 32 writers; kill -9 every process of the server while they write.
        writers = [threading.Thread(target=_writer, args=(live.url, n, ids, pairs, crash, done))
                   for n in range(WRITERS)]
        for w in writers:
            w.start()
        time.sleep(scale.crash_seconds)
    finally:
        crash.killed.set()
        live.crash()
    # 3. Restart on the same store and data folder; the writers retry.
    before_retry_wait = time.monotonic()
    while len(done) < WRITERS and time.monotonic() - before_retry_wait < 60:
        time.sleep(0.2)
    assert len(done) == WRITERS, "a writer never saw the server die"
    pre_restart = _rows(store_url)
    again = start_live(root, workers=scale.workers, store=store_url, CXRGEN_WARMUP=0, **limits_env())
    try:
        crash.url = again.url
        crash.restarted.set()
        for w in writers:
            w.join(120)
        with again.client("client") as c:
            job = c.get(f"/augment/{task}").json()
            result = c.get(f"/augment/{task}/result")
    finally:
        again.stop()
    # 4. What the store holds.
    runs = list(done.values())
    errors = [e for r in runs for e in r["errors"]]
    acked = [w for r in runs for w in r["acked"]]
    retried = [r["pending"] for r in runs if r["pending"] is not None]
    rows = _rows(store_url)
    by_key = {}
    for kind in ("rating", "comparison"):
        for key, rid, x, y in rows[kind]:
            if key.startswith("crash-"):
                by_key.setdefault(key, []).append((kind, rid, x, y))
    committed_unacked = sum(any(k == w.key for k, *_ in pre_restart[w.kind]) for w in retried)
    feed = [(k, rid) for k, rid in rows["feed"] if k in ("rating", "comparison")]
    out = {"backend": backend, "writers": WRITERS, "workers": scale.workers, "writes_acknowledged": len(acked),
           "acknowledged_found_once": sum(len(by_key.get(w.key, [])) == 1 for w in acked),
           "unacknowledged_retried": len(retried), "retries_acknowledged": sum(w.id is not None for w in retried),
           "unacknowledged_but_committed_before_crash": committed_unacked,
           "records_in_store": len(by_key), "duplicate_keys": sum(len(v) > 1 for v in by_key.values()),
           "duplicate_feed_entries": len(feed) - len(set(feed)), "client_errors": len(errors),
           "augment_job_after_restart": job["state"], "augment_job_done_before_crash": job["done"],
           "augment_result_status": result.status_code, "seconds_before_kill": scale.crash_seconds}
    record(f"crash[{scale.name}-{backend}]", out)
    assert not errors, errors[:5]
    assert acked and len(retried) == WRITERS  # each writer was cut off mid-stream
    for w in acked + retried:
        assert w.id is not None, f"{w.key}: retry after restart not acknowledged"
        found = by_key.get(w.key, [])
        assert len(found) == 1, (w.key, found)
        kind, rid, x, y = found[0]
        want = (w.body["generation_id"], w.body["plausible"]) if w.kind == "rating" else (
            w.body["generation_a"], w.body["preferred"])
        assert (kind, rid, x, y) == (w.kind, w.id, *want), (w, found)
    assert len(by_key) == len(acked) + len(retried)  # nothing written that no client asked for
    assert out["duplicate_feed_entries"] == 0
    # The batch running at the kill: reported failed with what it had done; no archive handed out.
    assert job["state"] == "failed" and "interrupted" in job["error"] and job["done"] > 0, job
    assert result.status_code == 409 and job["result_url"] is None
    assert not list((root / "var" / "jobs" / task).glob("*.tar.gz"))


def test_a_restarted_worker_with_a_reused_pid_does_not_keep_a_dead_workers_job(tmp_path):
    """A restarted container numbers its processes as the last one did: a job owned by this pid but an
    earlier process (another start time) is an orphan, not this process's own job (training/feedback/jobs.py)."""
    from sqlalchemy import update
    from sqlalchemy.orm import Session

    from training.feedback.jobs import Jobs, owner_id
    from training.feedback.models import Job
    from training.feedback.store import open_store

    with open_store(tmp_path / "s.db", tmp_path / "b") as store:
        jobs = Jobs(store)
        mine, dead = jobs.create("augment", {"count": 3}, 3), jobs.create("augment", {"count": 3}, 3)
        jobs.start(mine.id)
        jobs.start(dead.id)
        host, pid, start = owner_id().split(":")
        assert pid == str(os.getpid()) and start.isdigit()
        with Session(store.engine) as s, s.begin():  # same host, same pid, started earlier
            s.execute(update(Job).where(Job.id == dead.id).values(owner=f"{host}:{pid}:{int(start) - 1}"))
        assert jobs.fail_orphans() == [dead.id]
        assert jobs.get(dead.id).state == "failed" and jobs.get(mine.id).state == "running"
        with Session(store.engine) as s, s.begin():  # an owner written before start times were recorded
            s.execute(update(Job).where(Job.id == mine.id).values(owner=f"{host}:{pid}"))
        assert jobs.fail_orphans() == []
