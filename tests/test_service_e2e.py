"""End to end against a real `bentoml serve` process with two workers (issue 9, section 7), and the same
flows against a server whose feedback store is a real PostgreSQL (issue 11, section 3)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service_support import REPO, KEYS


def cli(*args, key_role: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if key_role:
        env["CXRGEN_API_KEY"] = KEYS[key_role]
    return subprocess.run([str(Path(sys.executable).parent / "cxrgen"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def live_pg(pg_cluster, tmp_path_factory):
    """A real server (one worker) whose feedback store is a database on the test PostgreSQL cluster
    (CXRGEN_STORE), with a tight rate limit on the admin role (test_rate_limit_reaches_a_real_server)."""
    from service_support import start_live

    url = pg_cluster.create_database("e2e_service")
    live = start_live(tmp_path_factory.mktemp("live-pg"), workers=1, store=url, CXRGEN_RATE_LIMITS="admin=0.05:2")
    yield live
    live.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_live(request):
    """The session's two-worker server on SQLite, then the PostgreSQL one."""
    return request.getfixturevalue("live_service" if request.param == "sqlite" else "live_pg")


def test_generate_rate_compare_stream_and_import(any_live, tmp_path):
    from training.feedback.store import open_store

    live_service = any_live
    with live_service.client("client") as c:
        r = c.post("/generate", json={"prompt": "Large left pleural effusion.", "n": 2, "seed": 40, "steps": 3})
    assert r.status_code == 200, r.text
    ids = [im["id"] for im in r.json()["images"]]
    with live_service.client("rater") as c:
        rating = c.post("/feedback/rating", json={"generation_id": ids[0], "rater_id": "e2e-rater",
                                                  "plausible": True, "key": "e2e-rating"})
        comparison = c.post("/feedback/comparison", json={"generation_a": ids[0], "generation_b": ids[1],
                                                          "preferred": "tie", "rater_id": "e2e-rater"})
    assert rating.status_code == comparison.status_code == 200, (rating.text, comparison.text)
    with live_service.client("trainer") as c, c.stream("GET", "/feedback/stream?after=0") as s:
        lines = [json.loads(x) for x in s.iter_lines() if x]
    assert lines[-1]["kind"] == "end"
    by_kind = {}
    for e in lines[:-1]:
        by_kind.setdefault(e["kind"], []).append(e["record"])
    gens = {g["id"]: g for g in by_kind["generation"]}
    assert gens[ids[0]]["prompt"] == "Large left pleural effusion." and "image_png_base64" in gens[ids[0]]
    assert any(x["id"] == rating.json()["id"] and x["generation_id"] == ids[0] and x["plausible"]
               for x in by_kind["rating"])
    assert any(x["generation_a"] == ids[0] and x["generation_b"] == ids[1] and x["preferred"] == "tie"
               for x in by_kind["comparison"])
    # The trainer's side: `cxrgen feedback import URL` rebuilds the same records in its own store.
    copy = tmp_path / "trainer.db"
    out = cli("feedback", "import", live_service.url, "--store", str(copy), "--blobs", str(tmp_path / "blobs"),
              key_role="trainer")
    assert out.returncode == 0, out.stderr
    with open_store(copy, tmp_path / "blobs") as mine, open_store(live_service.store_url, live_service.blobs) as theirs:
        assert mine.counts() == theirs.counts()
        # What the server acknowledged is in its database (PostgreSQL for the second run), read back directly.
        assert theirs.engine.dialect.name == ("postgresql" if live_service.store else "sqlite")
        assert [g.prompt for g in theirs.generations(ids)] == ["Large left pleural effusion."] * 2
        stored = theirs.rating(rating.json()["id"])
        assert stored.generation_id == ids[0] and stored.rater_id == "e2e-rater" and stored.plausible
        pair = theirs.comparison(comparison.json()["id"])
        assert (pair.generation_a, pair.generation_b, pair.preferred) == (ids[0], ids[1], "tie")
    denied = cli("feedback", "import", live_service.url, "--store", str(copy), key_role="client")
    assert denied.returncode == 2 and "HTTP 403" in denied.stderr


def test_metrics_of_two_workers_have_every_series(live_service):
    import httpx

    text = httpx.get(live_service.url + "/metrics", timeout=30).text
    names = ("cxrgen_images_generated_total", "cxrgen_generation_seconds_bucket", "cxrgen_batch_size_bucket",
             "cxrgen_queue_depth", "cxrgen_reward_score_bucket", "cxrgen_feedback_received_total",
             "cxrgen_model_info", "cxrgen_augment_jobs_total")
    missing = [n for n in names if n not in text]
    assert not missing, missing
    # BentoML's own request metrics are there too.
    assert "bentoml_service_request_total" in text or "bentoml_api_server_request_total" in text


def test_augment_client_cli_downloads_a_loadable_batch(live_service, tmp_path):
    from training.augment import unpack
    from training.data.mimic import LoaderConfig, MimicCXRDataset

    out = tmp_path / "batch.tar.gz"
    res = cli("augment", "--url", live_service.url, "--count", "3", "--labels", "cardiomegaly=1,no_finding=1",
              "--steps", "2", "--seed", "5", "--out", str(out), "--poll", "0.5", key_role="client")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["accepted"] == 3 and out.is_file()
    ds = MimicCXRDataset(LoaderConfig(root=unpack(out, tmp_path / "x"), size=64, split="train"))
    assert len(ds) == 3
    bad = cli("augment", "--url", live_service.url, "--count", "3", "--labels", "dragon=1", "--out", str(out),
              key_role="client")
    assert bad.returncode == 2 and "dragon" in bad.stderr


def test_server_log_holds_no_prompt_text(live_service):
    marker = "OKAPI-MARKER-5521"
    with live_service.client("client") as c:
        assert c.post("/generate", json={"prompt": marker * 200}).status_code == 400
        assert c.post("/generate", json={"prompt": marker, "steps": 0}).status_code == 400
        assert c.post("/generate", json={"prompt": marker + " cardiomegaly", "steps": 1}).status_code == 200
        # Longer than the text encoder's window: diffusers would log the cut-off words (at WARNING).
        # (its tokenizer lower-cases and splits, so this marker is one plain word)
        word = "quokkazebra"
        assert c.post("/generate", json={"prompt": " ".join([word] * 80), "steps": 1}).status_code == 200
    # Every other route that takes free text: augmentation prompts (refused, and a batch that runs), a rating's
    # comment (refused, of an unknown generation, stored), the rating page's queue (a refused rater id).
    with live_service.client("client") as c:
        too_long = c.post("/augment", json={"count": 2, "prompts": [marker * 200], "steps": 1, "size": 64})
        assert too_long.status_code == 400, too_long.text
        bad = c.post("/augment", json={"count": 2, "prompts": [marker], "steps": 0})
        assert bad.status_code == 400 and marker not in bad.text, bad.text
        task = c.post("/augment", json={"count": 2, "prompts": [f"{marker} small left pleural effusion"],
                                        "steps": 1, "size": 64})
        assert task.status_code == 200, task.text
        task = task.json()["task_id"]
        for _ in range(240):
            job = c.get(f"/augment/{task}")
            if job.status_code == 200 and job.json()["state"] in ("done", "failed"):
                break
            time.sleep(0.25)
        assert job.json()["state"] == "done", job.text
    with live_service.client("rater") as c:
        gid = c.get("/feedback/queue", params={"rater": "phi-rater"}).json()["items"][0]["id"]
        assert c.post("/feedback/rating", json={"generation_id": gid, "rater_id": "phi-rater", "plausible": True,
                                                "comment": marker * 300}).status_code == 400
        assert c.post("/feedback/rating", json={"generation_id": 10**9, "rater_id": "phi-rater", "plausible": True,
                                                "comment": marker}).status_code == 404
        assert c.post("/feedback/rating", json={"generation_id": gid, "rater_id": "phi-rater", "plausible": True,
                                                "comment": marker}).status_code == 200
        assert c.get("/feedback/queue", params={"rater": marker + " x"}).status_code == 400
    log = live_service.log.read_text(errors="replace")
    assert "rejected request" in log  # the errors were logged...
    assert marker not in log and word not in log.lower()  # ...without the input
    assert marker.lower() not in log.lower()


def test_rate_limit_reaches_a_real_server(live_pg):
    """CXRGEN_RATE_LIMITS=admin=0.05:2 on that server: two admin requests pass, the third gets 429 with
    Retry-After and the limit; other keys and the health and metrics routes are not affected."""
    import httpx

    with live_pg.client("admin") as c:
        codes = [c.get("/models").status_code for _ in range(3)]
        assert codes == [200, 200, 429], codes
        r = c.get("/models")
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert r.json()["limit"] == {"role": "admin", "rate_per_s": 0.05, "burst": 2.0}, r.json()
    assert "rate limit" in r.json()["error"] and r.json()["field"] == "rate_limit"
    with live_pg.client("client") as c:
        assert c.get("/models").status_code == 200  # its own bucket
    assert all(httpx.get(live_pg.url + p, timeout=30).status_code == 200 for p in ("/readyz", "/livez") * 5)
    metrics = httpx.get(live_pg.url + "/metrics", timeout=30).text
    assert re.search(r'^cxrgen_rate_limited_total\{role="admin"\} [2-9]', metrics, re.M), metrics[-2000:]


def test_a_job_running_at_a_crash_is_reported_failed_after_restart(tmp_path):
    """BentoML deletes its task database at start; cxrgen's job row survives and says what happened."""
    import time

    from service_support import start_live

    root = tmp_path / "srv"
    live = start_live(root, workers=1, CXRGEN_WARMUP=0)
    try:
        with live.client("client") as c:
            task = c.post("/augment", json={"count": 400, "labels": {"edema": 1}, "steps": 2, "size": 64}).json()
            task = task["task_id"]
            for _ in range(240):
                r = c.get(f"/augment/{task}")
                if r.status_code == 200 and r.json()["state"] == "running" and r.json()["done"] > 0:
                    break
                time.sleep(0.25)
            assert r.json()["state"] == "running", r.text
    finally:  # a crash, not a graceful stop: the server and its workers (each in its own session) at once
        import psutil

        server = psutil.Process(live.proc.pid)
        for p in [*server.children(recursive=True), server]:
            p.kill()
        live.proc.wait(30)
    again = start_live(root, workers=1, CXRGEN_WARMUP=0)
    try:
        with again.client("client") as c:
            job = c.get(f"/augment/{task}").json()
        assert job["state"] == "failed" and "interrupted" in job["error"] and job["done"] > 0, job
    finally:
        again.stop()


def test_a_model_that_fails_to_load_keeps_the_server_alive_but_not_ready(tmp_path):
    """Kubernetes' view: /livez 200 (do not restart-loop on a bad config), /readyz 503 (send no traffic)."""
    import time

    import httpx

    from service_support import auth, free_port, service_env

    port = free_port()
    env = {**os.environ, **service_env(tmp_path, CXRGEN_MODEL=str(tmp_path / "no-such-checkpoint"))}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.Popen([str(Path(sys.executable).parent / "bentoml"), "serve", "service.service:CXRGen",
                             "--port", str(port)], cwd=REPO, env=env, stdout=open(tmp_path / "log", "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            for _ in range(120):
                try:
                    if c.get("/livez").status_code == 200 and "failed to load" in (tmp_path / "log").read_text():
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
            assert c.get("/livez").status_code == 200
            assert c.get("/readyz").status_code == 503
            r = c.post("/generate", json={"prompt": "Cardiomegaly."}, headers=auth("client"))
            assert r.status_code == 503 and "failed to load" in r.json()["error"]
        assert "no-such-checkpoint" in (tmp_path / "log").read_text()  # the log says why
    finally:
        proc.terminate()
        proc.wait(30)
