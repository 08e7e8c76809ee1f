"""The service in-process (issue 9): endpoints, validation, auth, feedback, stream, reload, augment, batching."""

from __future__ import annotations

import base64
import io
import json
import logging
import tarfile
import threading
import tomllib

import numpy as np
import pytest
from PIL import Image

from service_support import DEFAULT_VERSION, REPO, auth, png_pixels


def gen(client, role="client", **body):
    body.setdefault("steps", 3)
    return client.post("/generate", json=body, headers=auth(role))


def test_generate_scores_stores_and_carries_provenance(service_app, tmp_path):
    from training.feedback.store import open_store
    from training.provenance import read_png_provenance

    r = gen(service_app, prompt="Moderate left pleural effusion.", n=2, seed=7)
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["findings"] == [{"kind": "pleural_effusion", "side": "left", "severity": "moderate"}]
    assert [im["seed"] for im in d["images"]] == [7, 8]
    for im in d["images"]:
        assert {"plausibility", "comparative", "posture", "diagnosis", "consistency", "combined"} <= set(im["scores"])
        assert all(0 <= v <= 1 for v in im["scores"].values())
        assert len(im["finding_agreement"]) == 14
        path = tmp_path / f"{im['id']}.png"
        path.write_bytes(base64.b64decode(im["image"]))
        prov = read_png_provenance(path)
        assert (prov.seed, prov.prompt, prov.steps, prov.model_version) == (im["seed"], d["prompt"], 3,
                                                                           d["model_version"])
        assert prov.scores == pytest.approx(im["scores"])
    root = service_app.root / "var" / "feedback"
    with open_store(f"sqlite:///{root / 'store.db'}", root / "images") as store:
        g = store.generation(d["images"][1]["id"])
        assert (g.prompt, g.seed, g.sampler["steps"]) == (d["prompt"], 8, 3)
        stored = np.asarray(Image.open(store.image_path(g.id)).convert("L"))
        assert np.array_equal(stored, png_pixels(d["images"][1]["image"]))


def test_same_seed_same_image_as_the_cli_generator(service_app):
    """A batch of the service gives image i the generator seeded seed + i, as `cxrgen generate` does."""
    from training.generation import DEFAULT_MODEL, generate
    from training.model.checkpoint import load_pipeline

    r = gen(service_app, prompt="Cardiomegaly.", n=2, seed=3, steps=4)
    assert r.status_code == 200, r.text
    served = np.stack([png_pixels(im["image"]) for im in r.json()["images"]]).astype(float) / 255
    pipe, _ = load_pipeline(DEFAULT_MODEL)
    direct = generate(pipe, ["Cardiomegaly."] * 2, 3, 4, 4.0, "", 2, 128)
    assert np.abs(served - direct).max() <= 2 / 255  # 8-bit rounding, float batching order


def test_findings_only_dicom_and_png_endpoint(service_app):
    import pydicom

    r = gen(service_app, findings=[{"kind": "pneumothorax", "side": "right", "severity": "large"}], format="dicom")
    assert r.status_code == 200, r.text
    d = r.json()
    assert "pneumothorax" in d["prompt"].lower()
    im = d["images"][0]
    assert im["media_type"] == "application/dicom"
    ds = pydicom.dcmread(io.BytesIO(base64.b64decode(im["image"])))
    assert ds.ConversionType == "SYN" and ds.Rows == 128
    r = service_app.post("/generate/png", json={"prompt": "Normal chest.", "steps": 2, "seed": 4},
                         headers=auth("client"))
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-cxrgen-seed"] == "4" and int(r.headers["x-cxrgen-id"]) > 0
    assert Image.open(io.BytesIO(r.content)).size == (128, 128)


def test_idempotency_key_returns_the_stored_images(service_app):
    first = gen(service_app, prompt="Small right pleural effusion.", n=2, seed=1, key="retry-abc")
    again = gen(service_app, prompt="Small right pleural effusion.", n=2, seed=1, key="retry-abc")
    assert first.status_code == again.status_code == 200
    assert [i["id"] for i in first.json()["images"]] == [i["id"] for i in again.json()["images"]]
    dicom = gen(service_app, prompt="Small right pleural effusion.", n=2, seed=1, key="retry-abc", format="dicom")
    assert [i["media_type"] for i in dicom.json()["images"]] == ["application/dicom"] * 2
    assert [i["id"] for i in dicom.json()["images"]] == [i["id"] for i in first.json()["images"]]


@pytest.mark.parametrize("body,field", [
    ({"n": 1}, None),  # neither prompt nor findings
    ({"prompt": "x", "n": 17}, "n"),
    ({"prompt": "x", "steps": 0}, "steps"),
    ({"prompt": "x" * 1001}, "prompt"),
    ({"prompt": "x", "size": 100}, "size"),
    ({"prompt": "x", "scheduler": "magic"}, "scheduler"),
    ({"prompt": "x", "format": "gif"}, "format"),
    ({"prompt": "x", "colour": "red"}, "colour"),
    ({"findings": [{"kind": "dragon"}]}, "findings"),
    ({"findings": [{"kind": "cardiomegaly", "side": "left"}]}, "findings"),
    ({"prompt": "x", "n": 16, "steps": 100, "size": 512}, None),  # over the work budget
])
def test_bad_generate_requests_are_400_naming_the_field(service_app, body, field):
    r = service_app.post("/generate", json=body, headers=auth("client"))
    assert r.status_code == 400, r.text
    d = r.json()
    assert "error" in d
    if field:
        assert any(field in [str(x) for x in e["loc"]] for e in d["detail"]), d
    else:
        assert d["detail"][0]["msg"]


def test_malformed_bodies_are_4xx(service_app):
    h = {**auth("client"), "content-type": "application/json"}
    for raw in (b"{", b"[]", b"null", b'"text"', "{\"prompt\": \"\udcff\"}".encode("utf-8", "surrogatepass")):
        r = service_app.post("/generate", content=raw, headers=h)
        assert 400 <= r.status_code < 500, (raw, r.status_code, r.text)


def test_auth_roles(service_app):
    body = {"prompt": "x", "steps": 1}
    assert service_app.post("/generate", json=body).status_code == 401
    assert service_app.post("/generate", json=body, headers={"Authorization": "Bearer wrong-key-0123456789"}
                            ).status_code == 401
    r = service_app.post("/generate", json=body, headers=auth("rater"))
    assert r.status_code == 403 and "client" in r.json()["error"]
    assert service_app.get("/feedback/stream", headers=auth("client")).status_code == 403
    assert service_app.post("/models/reload", json={"source": "x"}, headers=auth("client")).status_code == 403
    assert service_app.post("/generate", json=body, headers={"X-API-Key": auth("admin")["Authorization"][7:]}
                            ).status_code == 200
    for path in ("/livez", "/readyz", "/ui"):  # /metrics too: scraped without a key in test_service_e2e
        assert service_app.get(path).status_code == 200, path


def test_key_configuration_errors_name_the_problem():
    from service.security import KeyError_, parse_keys, required_role

    keys = parse_keys("abcdefghijklmnop:client,rater")
    assert list(keys.values()) == [("env-1", frozenset({"client", "rater"}))]
    for bad in ("short:client", "abcdefghijklmnop:wizard", "abcdefghijklmnop"):
        with pytest.raises(KeyError_):
            parse_keys(bad)
    assert required_role("GET", "/feedback/stream") == "trainer"
    assert required_role("GET", "/livez") is None
    assert required_role("DELETE", "/anything") == "any"


def test_oversized_bodies_are_413(service_app):
    big = {"prompt": "x", "negative_prompt": "y" * 2_000_000}
    r = service_app.post("/generate", json=big, headers=auth("client"))
    assert r.status_code == 413 and r.json()["field"] == "body"

    def chunks():  # no Content-Length: counted while read
        for _ in range(40):
            yield b"x" * 50_000

    r = service_app.post("/generate", content=chunks(), headers={**auth("client"), "content-type": "application/json"})
    assert r.status_code == 413


def test_no_prompt_text_in_logs(service_app, caplog):
    marker = "ZEBRA-MARKER-7731"
    with caplog.at_level(logging.DEBUG):
        assert service_app.post("/generate", json={"prompt": marker * 100}, headers=auth("client")).status_code == 400
        assert service_app.post("/generate", json={"prompt": marker, "n": 99}, headers=auth("client")).status_code == 400
        assert gen(service_app, prompt=f"{marker} left pleural effusion", steps=1).status_code == 200
    assert caplog.records, "expected the rejected requests to be logged"
    assert marker not in caplog.text


def _store(service_app):
    from training.feedback.store import open_store

    root = service_app.root / "var" / "feedback"
    return open_store(f"sqlite:///{root / 'store.db'}", root / "images")


def test_feedback_rating_comparison_and_stream(service_app, tmp_path):
    from training.feedback.exchange import import_events
    from training.feedback.store import open_store

    ids = [im["id"] for im in gen(service_app, prompt="Right upper lobe pneumonia.", n=2, seed=5).json()["images"]]
    rating = {"generation_id": ids[0], "rater_id": "dr-house", "plausible": False, "failed": ["wrong_side"],
              "score": 2, "key": "r-1"}
    r1 = service_app.post("/feedback/rating", json=rating, headers=auth("rater"))
    r2 = service_app.post("/feedback/rating", json=rating, headers=auth("rater"))  # a retry
    assert r1.status_code == r2.status_code == 200, r1.text
    assert r1.json()["id"] == r2.json()["id"] and r1.json()["failed"] == ["wrong_side"]
    c = service_app.post("/feedback/comparison", json={"generation_a": ids[0], "generation_b": ids[1],
                                                       "preferred": "b", "rater_id": "dr-house"}, headers=auth("rater"))
    assert c.status_code == 200, c.text
    # Bad feedback: a 4xx naming the field, and nothing stored.
    with _store(service_app) as store:
        before = store.counts()
    r = service_app.post("/feedback/rating", json={**rating, "generation_id": 10**9, "key": None},
                         headers=auth("rater"))
    assert r.status_code == 404 and r.json()["field"] == "generation_id"
    r = service_app.post("/feedback/rating", json={**rating, "failed": ["vibes"]}, headers=auth("rater"))
    assert r.status_code == 400 and r.json()["detail"][0]["loc"][0] == "failed"
    r = service_app.post("/feedback/comparison", json={"generation_a": ids[0], "generation_b": ids[0],
                                                       "preferred": "a", "rater_id": "x"}, headers=auth("rater"))
    assert r.status_code == 400
    with _store(service_app) as store:
        assert store.counts() == before
        cursor = store.cursor()
    # The stream: every event, then a status line; `after` resumes.
    r = service_app.get("/feedback/stream?after=0", headers=auth("trainer"))
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert lines[-1] == {"kind": "end", "events": len(lines) - 1, "cursor": cursor}
    assert [e["seq"] for e in lines[:-1]] == sorted(e["seq"] for e in lines[:-1])
    mine = [e for e in lines if e["kind"] == "rating" and e["record"]["rater_id"] == "dr-house"]
    assert len(mine) == 1 and mine[0]["record"]["generation_key"]
    tail = service_app.get(f"/feedback/stream?after={cursor - 1}&images=false", headers=auth("trainer"))
    assert [json.loads(x)["kind"] for x in tail.text.splitlines()] == ["comparison", "end"]
    for bad in ("after=-1", "after=x", "images=maybe"):
        r = service_app.get(f"/feedback/stream?{bad}", headers=auth("trainer"))
        assert r.status_code == 400 and r.json()["field"] in ("after", "images")
    # What the stream carries rebuilds the store elsewhere (cxrgen feedback import reads the same lines).
    with open_store(tmp_path / "copy.db", tmp_path / "blobs") as copy:
        full = service_app.get("/feedback/stream", headers=auth("trainer")).text
        import_events(copy, [x + "\n" for x in full.splitlines()])
        with _store(service_app) as store:
            assert copy.counts() == store.counts()


def test_rating_page_queue_and_images(service_app):
    gen(service_app, prompt="Left lower lobe atelectasis.", n=2, seed=9)
    r = service_app.get("/feedback/queue?rater=new-rater&mode=rate&limit=3", headers=auth("rater"))
    assert r.status_code == 200 and len(r.json()["items"]) == 3
    item = r.json()["items"][0]
    img = service_app.get(item["image_url"], headers=auth("rater"))
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
    pairs = service_app.get("/feedback/queue?rater=new-rater&mode=compare", headers=auth("rater")).json()["items"]
    assert pairs and all(p["a"]["id"] != p["b"]["id"] for p in pairs)
    assert service_app.get("/feedback/queue?rater=new-rater&mode=judge", headers=auth("rater")).status_code == 400
    assert service_app.get("/generations/999999/image.png", headers=auth("rater")).status_code == 404
    assert service_app.get("/feedback/criteria", headers=auth("rater")).json()["criteria"][0] == "finding_absent"


def test_models_and_reload(service_app, tmp_path):
    import shutil

    from training.generation import DEFAULT_MODEL

    m = service_app.get("/models", headers=auth("client")).json()
    assert m["serving"]["version"] == DEFAULT_VERSION and "plausibility" in m["rewards"]
    bad = service_app.post("/models/reload", json={"source": str(tmp_path / "nothing")}, headers=auth("admin"))
    assert bad.status_code == 422 and bad.json()["field"] == "source" and "still serving" in bad.json()["error"]
    broken = tmp_path / "broken"
    shutil.copytree(DEFAULT_MODEL, broken)
    shutil.rmtree(broken / "unet")
    bad = service_app.post("/models/reload", json={"source": str(broken)}, headers=auth("admin"))
    assert bad.status_code == 422 and "unet" in bad.json()["error"]
    # A good reload while requests are in flight: none fails.
    copy = tmp_path / "v2"
    shutil.copytree(DEFAULT_MODEL, copy)
    codes = []

    def worker():
        codes.append(gen(service_app, prompt="Cardiomegaly.", steps=2).status_code)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    ok = service_app.post("/models/reload", json={"source": str(copy)}, headers=auth("admin"))
    for t in threads:
        t.join()
    assert ok.status_code == 200, ok.text
    assert codes == [200] * 4
    assert service_app.get("/models", headers=auth("client")).json()["serving"]["path"] == str(copy)
    back = service_app.post("/models/reload", json={"source": str(DEFAULT_MODEL)}, headers=auth("admin"))
    assert back.status_code == 200


def test_models_waits_for_this_workers_load(service_app):
    """Readiness is per worker: /models on a worker still loading waits for it (as /generate does) instead of a
    503 to a client another worker's /readyz sent here; a failed load answers 503 at once, naming it."""
    import time

    from service.web import RUNTIME

    engine = RUNTIME["engine"]
    model = engine.model
    engine.model = None
    engine.ready_event.clear()

    def finish_loading():
        time.sleep(0.5)
        engine.model = model
        engine.ready_event.set()

    loader = threading.Thread(target=finish_loading)
    try:
        t = time.monotonic()
        loader.start()
        r = service_app.get("/models", headers=auth("client"))
        assert r.status_code == 200 and r.json()["serving"]["version"] == model.version
        assert time.monotonic() - t >= 0.4
        loader.join()
        engine.model = None  # a load that failed: the event is set, no model
        r = service_app.get("/models", headers=auth("client"))
        assert r.status_code == 503 and "failed to load" in r.json()["error"]
    finally:
        loader.join()
        engine.model = model
        engine.ready_event.set()


def test_backend_choice_same_images_and_scores_on_onnxruntime(service_app, tmp_path):
    """Issue 10, section 6: the service on an export folder runs onnxruntime (CXRGEN_BACKEND unset: the folder
    picks it; the same goes for CXRGEN_MODEL at start-up) and answers what torch answers for the same seed."""
    from prometheus_client import REGISTRY, generate_latest

    from export.folder import ExportConfig
    from export.onnx_export import export_onnx
    from micro_model import micro_checkpoint
    from training.generation import DEFAULT_MODEL

    ckpt = micro_checkpoint(tmp_path / "ckpt", "micro-serve", reports=200)
    export = export_onnx(ExportConfig(checkpoint=str(ckpt), out=str(tmp_path / "onnx"), rewards=False))
    body = {"prompt": "Moderate left pleural effusion.", "n": 2, "seed": 21, "steps": 3, "negative_prompt": "edema"}
    served = {}
    try:
        for backend, source in (("torch", ckpt), ("onnxruntime", export)):
            r = service_app.post("/models/reload", json={"source": str(source)}, headers=auth("admin"))
            assert r.status_code == 200, r.text
            m = service_app.get("/models", headers=auth("client")).json()["serving"]
            assert (m["backend"], m["version"], m["path"]) == (backend, "micro-serve", str(source))
            r = gen(service_app, **body)
            assert r.status_code == 200, r.text
            served[backend] = r.json()
    finally:
        assert service_app.post("/models/reload", json={"source": str(DEFAULT_MODEL)},
                                headers=auth("admin")).status_code == 200
    a, b = served["torch"]["images"], served["onnxruntime"]["images"]
    assert [i["seed"] for i in a] == [i["seed"] for i in b] == [21, 22]
    pa, pb = (np.stack([png_pixels(i["image"]) for i in x]).astype(int) for x in (a, b))
    assert pa.shape == (2, 32, 32) and pa.std() > 0
    assert np.abs(pa - pb).max() <= 1 and (pa == pb).mean() > 0.99  # 8-bit rounding of images ~1e-6 apart
    assert set(a[0]["scores"]) == set(b[0]["scores"]) and "plausibility" in a[0]["scores"]
    assert max(abs(x["scores"][k] - y["scores"][k]) for x, y in zip(a, b) for k in x["scores"]) <= 1e-3
    assert [x["finding_agreement"].keys() for x in a] == [y["finding_agreement"].keys() for y in b]
    text = generate_latest(REGISTRY).decode()
    assert 'backend="onnxruntime"' in text and 'backend="torch"' in text  # the metrics' label is the real backend


def test_augment_task_gives_a_loadable_mimic_archive(service_app, tmp_path):
    import time

    from training.augment import unpack
    from training.data.mimic import LoaderConfig, MimicCXRDataset

    r = service_app.post("/augment", json={"count": 4, "labels": {"pleural_effusion": 1, "no_finding": 1},
                                           "seed": 2, "steps": 2, "min_plausibility": 0.05}, headers=auth("client"))
    assert r.status_code == 200, r.text
    task = r.json()["task_id"]
    for _ in range(240):
        s = service_app.get(f"/augment/{task}", headers=auth("client"))
        if s.status_code == 200 and s.json()["state"] in ("done", "failed"):
            break
        time.sleep(0.5)
    job = s.json()
    assert job["state"] == "done", job
    assert job["done"] == 4 and job["sampled"] >= 4 and 0 < job["acceptance_rate"] <= 1
    res = service_app.get(job["result_url"], headers=auth("client"))
    assert res.status_code == 200
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(res.content)
    root = unpack(archive, tmp_path / "x")
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["accepted"] == 4 and all(im["scores"]["plausibility"] >= 0.05 for im in manifest["images"])
    ds = MimicCXRDataset(LoaderConfig(root=root, size=64, split="train", return_ground_truth=True))
    assert len(ds) == 4
    sample = ds[0]
    assert sample["image"].shape[-1] == 64 and sample["prompt"]
    with tarfile.open(archive) as tar:
        assert all(not m.name.startswith("/") and ".." not in m.name for m in tar.getmembers())
    # Bad specs: 400 naming the problem.
    for body in ({"count": 0, "labels": {"edema": 1}}, {"count": 2}, {"count": 2, "labels": {"dragon": 1}},
                 {"count": 2, "labels": {"edema": 1}, "prompts": ["x"]}, {"count": 2, "labels": {"edema": 1},
                                                                          "min_plausibility": 2}):
        assert service_app.post("/augment", json=body, headers=auth("client")).status_code == 400, body
    assert service_app.get("/augment/nope", headers=auth("client")).status_code == 404


def test_an_interrupted_job_is_reported_failed_not_lost(tmp_path):
    from training.feedback.jobs import Jobs
    from training.feedback.store import open_store

    with open_store(tmp_path / "s.db", tmp_path / "b") as store:
        jobs = Jobs(store)
        job = jobs.create("augment", {"count": 5}, 5)
        jobs.start(job.id)
        jobs.progress(job.id, 2, 3)
        from sqlalchemy import update
        from sqlalchemy.orm import Session

        from training.feedback.models import Job

        with Session(store.engine) as s, s.begin():  # as if a process that has ended ran it
            s.execute(update(Job).where(Job.id == job.id).values(owner=job.owner.rsplit(":", 1)[0] + ":999999999"))
        assert jobs.fail_orphans() == [job.id]
        j = jobs.get(job.id)
        assert j.state == "failed" and "2 of 5" in j.error
        assert jobs.fail_orphans() == []  # this process's own jobs are never orphans


def test_batcher_groups_compatible_requests():
    from service.config import ServeConfig
    from service.engine import Engine

    eng = Engine(ServeConfig(max_batch=4, device="cpu"))
    a = (10, 4.0, "ddim", 128)
    b = (20, 4.0, "ddim", 128)
    for settings, n in ((a, 1), (b, 1), (a, 2), (a, 2), (a, 1)):
        eng.submit(["p"] * n, [""] * n, list(range(n)), settings)
    first = eng._take()
    assert [len(p.seeds) for p in first] == [1, 2, 1]  # a-requests up to 4 images, skipping what does not fit
    assert eng._take()[0].settings == b
    assert [len(p.seeds) for p in eng._take()] == [2]
    off = Engine(ServeConfig(max_batch=1, device="cpu"))
    for _ in range(3):
        off.submit(["p"], [""], [0], a)
    assert [len(off._take()) for _ in range(3)] == [1, 1, 1]


def test_metrics_in_process(service_app):
    # BentoML's /metrics route hangs under the in-process test client (its multiprocess collector); the
    # registry it would render is read directly here, and the real endpoint in test_service_e2e.
    from prometheus_client import REGISTRY, generate_latest

    text = generate_latest(REGISTRY).decode()
    for name in ("cxrgen_images_generated_total", "cxrgen_generation_seconds", "cxrgen_batch_size",
                 "cxrgen_queue_depth", "cxrgen_reward_score", "cxrgen_feedback_received_total",
                 "cxrgen_model_info", "cxrgen_augment_jobs_total"):
        assert name in text, name
    assert "cxrgen_gpu_" not in text or __import__("torch").cuda.is_available()


def test_serve_requirements_match_the_project():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    lines = [x for x in (REPO / "requirements-serve.txt").read_text().splitlines() if x and not x.startswith("#")]
    assert lines == deps


def test_feedback_and_health_do_not_wait_behind_a_generation(service_app):
    """Every route is async: while a long generation runs, feedback, the stream and health answer."""
    ids = [im["id"] for im in gen(service_app, prompt="Cardiomegaly.", n=2, seed=3, steps=1).json()["images"]]
    result = {}
    slow = threading.Thread(target=lambda: result.update(r=gen(service_app, prompt="Mild pulmonary edema.", n=8,
                                                                 steps=60, seed=1)))
    slow.start()
    import time

    time.sleep(0.5)  # let the generation reach the batch worker
    assert slow.is_alive()
    assert service_app.get("/livez").status_code == 200
    assert service_app.get("/feedback/stream?after=0&images=false&limit=5", headers=auth("trainer")).status_code == 200
    r = service_app.post("/feedback/rating", json={"generation_id": ids[0], "rater_id": "fast", "plausible": True},
                         headers=auth("rater"))
    assert r.status_code == 200
    assert slow.is_alive(), "the generation finished first: the test proves nothing (make it longer)"
    slow.join()
    assert result["r"].status_code == 200


def test_import_registers_a_checkpoint_the_service_then_serves(tmp_path, monkeypatch):
    import subprocess
    import sys
    from pathlib import Path

    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    res = subprocess.run([str(Path(sys.executable).parent / "cxrgen"), "import", str(REPO / "models" / "default")],
                         capture_output=True, text=True, timeout=300, env={**__import__("os").environ})
    assert res.returncode == 0, res.stderr
    tag = json.loads(res.stdout)["tag"]
    assert tag.startswith("cxrgen-generator:")
    # In a fresh process (BentoML caches its home per process): with no CXRGEN_MODEL the service takes the
    # newest registered checkpoint.
    probe = ("from service.engine import load_model, resolve_source; s, f = resolve_source(None); "
             "print(s, (f / 'unet').is_dir(), load_model(s, 'cpu').version)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [f"bento:{tag}", "True", DEFAULT_VERSION]
    bad = subprocess.run([str(Path(sys.executable).parent / "cxrgen"), "import", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "not a checkpoint" in bad.stderr


@pytest.mark.gpu
def test_cuda_engine_runs_fp16_with_an_fp32_vae():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from service.config import ServeConfig
    from service.engine import Engine

    eng = Engine(ServeConfig(device="auto", warmup=False))
    eng.start()
    try:
        m = eng.model
        assert m.device == "cuda" and m.backend == "torch"
        assert m.pipe.unet.dtype == torch.float16 and m.pipe.vae.dtype == torch.float32
        images, _, scored = eng.generate_sync(["Cardiomegaly."] * 2, ["", ""], [0, 1], eng.settings(10, 4.0, "ddim", None),
                                              [[{"kind": "cardiomegaly"}]] * 2)
        assert images.shape == (2, 128, 128) and np.isfinite(images).all() and images.std() > 0.02
        assert all(0 <= s["plausibility"] <= 1 for s, _ in scored)
    finally:
        eng.stop()


def test_backend_setting_is_checked(monkeypatch):
    from service.config import ServeConfig

    monkeypatch.setenv("CXRGEN_BACKEND", "tvm")
    with pytest.raises(ValueError, match="CXRGEN_BACKEND='tvm' is not a backend; known: .*onnxruntime.*triton"):
        ServeConfig.from_env()
    monkeypatch.setenv("CXRGEN_BACKEND", "triton")
    monkeypatch.setenv("CXRGEN_TRITON_URL", "grpc://127.0.0.1:8001")
    cfg = ServeConfig.from_env()
    assert (cfg.backend, cfg.triton_url) == ("triton", "grpc://127.0.0.1:8001")


def test_torch_compile_setting_reaches_the_torch_backend(monkeypatch, tmp_path):
    """CXRGEN_TORCH_COMPILE=1: the service's torch backend runs its U-Net through torch.compile (issue 10, s. 5)."""
    import torch

    from micro_model import micro_checkpoint
    from service.config import ServeConfig
    from service.engine import load_model

    assert ServeConfig.from_env().torch_compile is False
    monkeypatch.setenv("CXRGEN_TORCH_COMPILE", "1")
    cfg = ServeConfig.from_env()
    assert cfg.torch_compile is True
    ckpt = micro_checkpoint(tmp_path / "ckpt", "micro-compile", reports=200)
    model = load_model(str(ckpt), "cpu", torch_compile=cfg.torch_compile)
    assert model.runner.compiled and isinstance(model.runner.pipe.unet, torch._dynamo.eval_frame.OptimizedModule)
    assert not load_model(str(ckpt), "cpu").runner.compiled


def test_a_worker_following_a_reload_never_overwrites_a_newer_choice(tmp_path, monkeypatch):
    """Two workers share active-model.json. Worker B follows A's switch to v2; while B is still loading v2, A
    switches to v3. B must not write v2 back over v3 (all workers would end on v2, as a CI run once saw), and
    its next poll takes it to v3."""
    import types

    import service.engine as eng
    from service.config import ServeConfig

    a, b = (eng.Engine(ServeConfig(data_dir=str(tmp_path), device="cpu")) for _ in range(2))
    loads = []

    def fake_load(source, *args, **kw):
        loads.append(source)
        if source == "v2" and len(loads) == 2:  # B loading v2: A switches to v3 meanwhile
            a.reload("v3")
        return eng.Model(runner=types.SimpleNamespace(name="fake"), version=source, source=source, path=source,
                         manifest={}, device="cpu", native_size=8, loaded_at=0.0)

    monkeypatch.setattr(eng, "load_model", fake_load)
    a.reload("v2")
    b._follow()  # B reads v2 and loads it; A writes v3 during that load
    assert loads == ["v2", "v2", "v3"] and a.model.source == "v3" and b.model.source == "v2"
    assert json.loads((tmp_path / "active-model.json").read_text())["source"] == "v3"
    b._follow()
    assert b.model.source == "v3"
    b._follow()  # nothing changed since: no reload
    assert loads == ["v2", "v2", "v3", "v3"]
