"""The feedback store's records, idempotency, refused references and image blobs, on SQLite and PostgreSQL."""

import hashlib
import io

import numpy as np
import pytest

from training.feedback import store as fs

EFFUSION = [{"kind": "pleural_effusion", "side": "left", "severity": "moderate"}]


def image(i: int = 0) -> np.ndarray:
    rng = np.random.default_rng(i)
    return rng.integers(0, 256, (16, 16), dtype=np.uint8)


@pytest.fixture
def store(store_url, tmp_path):
    with fs.open_store(store_url, blobs=tmp_path / "blobs") as s:
        yield s


def add_gen(store, i=0, prompt="Moderate left pleural effusion.", **kw):
    fields = dict(image=image(i), prompt=prompt, findings=EFFUSION, seed=i, sampler={"steps": 25},
                  model_version="tiny-v1")
    return store.add_generation(**{**fields, **kw})


def snapshot(store):
    return store.counts(), store.cursor(), store.read_after(0)


def test_records_round_trip(store):
    assert store.add_rater("rad-1", "radiologist", "board certified") == "rad-1"
    gid = add_gen(store)
    rid = store.add_rating(generation_id=gid, rater_id="rad-1", plausible=False, failed=["posture", "artefact"],
                           score=2, comment="tilted")
    g2 = add_gen(store, 1)
    cid = store.add_comparison(generation_a=gid, generation_b=g2, preferred="b", rater_id="rad-1")
    g = store.generation(gid)
    assert (g.prompt, g.findings, g.seed, g.sampler, g.model_version) == (
        "Moderate left pleural effusion.", EFFUSION, 0, {"steps": 25}, "tiny-v1")
    r = store.ratings()[0]
    assert (r.id, r.generation_id, r.plausible, r.failed, r.score, r.comment) == (
        rid, gid, False, ["posture", "artefact"], 2, "tilted")
    c = store.comparisons()[0]
    assert (c.id, c.generation_a, c.generation_b, c.preferred) == (cid, gid, g2, "b")
    assert store.raters()[0].to_dict()["qualification"] == "board certified"
    assert [e.kind for e in store.read_after(0).events] == ["rater", "generation", "rating", "generation",
                                                            "comparison"]
    assert store.cursor() == 5 and store.ratings(after=3) == [] and store.comparisons(after=4)[0].id == cid
    assert [x.id for x in store.generations([g2, gid])] == [g2, gid]


def test_image_is_a_content_addressed_file(store, tmp_path):
    gid = add_gen(store)
    g = store.generation(gid)
    data = store.image_path(gid).read_bytes()
    assert hashlib.sha256(data).hexdigest() == g.image_sha256
    assert store.image_path(gid) == tmp_path / "blobs" / g.image_sha256[:2] / f"{g.image_sha256}.png"
    np.testing.assert_array_equal(store.image(gid), image(0))
    assert not list((tmp_path / "blobs").rglob("*.tmp"))


def test_image_forms(store, tmp_path):
    from PIL import Image

    a = image(3)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    (tmp_path / "x.jpg").write_bytes(b"")
    Image.fromarray(a).save(tmp_path / "x.png")
    ids = [add_gen(store, 3, image=a), add_gen(store, 3, image=buf.getvalue(), seed=10),
           add_gen(store, 3, image=tmp_path / "x.png", seed=11), add_gen(store, 3, image=a / 255.0, seed=12)]
    for gid in ids:
        np.testing.assert_array_equal(store.image(gid), a)
    with pytest.raises(ValueError, match="not an image file"):
        add_gen(store, image=tmp_path / "x.jpg")
    with pytest.raises(FileNotFoundError):
        add_gen(store, image=tmp_path / "missing.png")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        add_gen(store, image=a * 2.0)


def test_retried_writes_return_the_first_id(store):
    store.add_rater("r", "resident")
    assert store.add_rater("r", "radiologist") == "r" and store.raters()[0].role == "resident"
    gid = add_gen(store)
    assert add_gen(store) == gid  # default key: image hash, prompt, seed, model version
    assert add_gen(store, key="k1") == add_gen(store, key="k1") != gid
    rating = dict(generation_id=gid, rater_id="r", plausible=True)
    assert store.add_rating(**rating) == store.add_rating(**rating)
    assert store.add_rating(**rating, key="rk") == store.add_rating(**rating, key="rk", comment="retry")
    g2 = add_gen(store, 1)
    comp = dict(generation_a=gid, generation_b=g2, preferred="tie", rater_id="r")
    assert store.add_comparison(**comp) == store.add_comparison(**comp)
    assert store.counts() == {"raters": 1, "generations": 3, "ratings": 2, "comparisons": 1}
    assert store.cursor() == 7


@pytest.mark.parametrize("bad, error, field", [
    (dict(generation_id=999), fs.UnknownReference, "generation_id"),
    (dict(rater_id="nobody"), fs.UnknownReference, "rater_id"),
    (dict(failed=["blurry"]), fs.StoreError, "failed"),
    (dict(score=6), fs.StoreError, "score"),
    (dict(score=0), fs.StoreError, "score"),
    (dict(plausible="yes"), fs.StoreError, "plausible"),
])
def test_bad_ratings_are_refused_and_touch_nothing(store, bad, error, field):
    store.add_rater("r", "radiologist")
    gid = add_gen(store)
    before = snapshot(store)
    with pytest.raises(error, match=field):
        store.add_rating(**{**dict(generation_id=gid, rater_id="r", plausible=True), **bad})
    assert snapshot(store) == before


def test_bad_comparisons_are_refused_and_touch_nothing(store):
    store.add_rater("r", "radiologist")
    a, b = add_gen(store, 0), add_gen(store, 1)
    other = add_gen(store, 2, prompt="Normal chest radiograph.")
    before = snapshot(store)
    ok = dict(generation_a=a, generation_b=b, preferred="a", rater_id="r")
    for bad, error, field in [(dict(generation_b=other), fs.StoreError, "different prompts"),
                              (dict(generation_b=a), fs.StoreError, "two different generations"),
                              (dict(generation_a=12345), fs.UnknownReference, "generation_a"),
                              (dict(preferred="both"), fs.StoreError, "preferred"),
                              (dict(rater_id="x"), fs.UnknownReference, "rater_id")]:
        with pytest.raises(error, match=field):
            store.add_comparison(**{**ok, **bad})
    assert snapshot(store) == before


def test_bad_generations_are_refused(store):
    with pytest.raises(fs.StoreError, match=r"findings\[0\].*unknown finding kind"):
        add_gen(store, findings=[{"kind": "dragon"}])
    with pytest.raises(fs.StoreError, match="seed"):
        add_gen(store, seed="1")
    with pytest.raises(fs.UnknownReference, match="no generation with id 7"):
        store.generation(7)
    assert store.counts()["generations"] == 0 and store.cursor() == 0


def test_default_location_and_env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with fs.open_store() as s:
        add_gen(s)
        assert (tmp_path / "feedback" / "store.db").is_file() and list((tmp_path / "feedback" / "blobs").rglob("*.png"))
    monkeypatch.setenv("CXRGEN_STORE", f"sqlite:///{tmp_path}/other.db")
    monkeypatch.setenv("CXRGEN_BLOBS", str(tmp_path / "imgs"))
    with fs.open_store() as s:
        add_gen(s)
        assert s.url.database.endswith("other.db") and list((tmp_path / "imgs").rglob("*.png"))


def test_sqlite_settings(tmp_path):
    with fs.open_store(f"sqlite:///{tmp_path}/s.db") as s, s.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000


def test_urls_never_show_a_password():
    from training.feedback import db

    u = db.resolve_url("postgresql://alice:s3cret@db.example/feedback")
    assert u.drivername == "postgresql+psycopg" and "s3cret" not in db.safe_url(u)
    with pytest.raises(fs.StoreError) as e:
        fs.open_store("postgresql://alice:s3cret@/nodb?host=/nonexistent", blobs="/tmp/unused")
    assert "s3cret" not in str(e.value) and "***" in str(e.value)
    with pytest.raises(fs.StoreError, match="unsupported database"):
        db.resolve_url("mysql://x@y/z")


def test_numpy_scalars_are_accepted(store):
    store.add_rater("r", "simulated")
    gid = add_gen(store, seed=np.int64(4))
    rid = store.add_rating(generation_id=np.int64(gid), rater_id="r", plausible=np.bool_(True), score=np.int32(3))
    r = store.ratings()[0]
    assert (r.id, r.plausible, r.score, store.generation(gid).seed) == (rid, True, 3, 4)
    assert type(r.plausible) is bool and type(r.score) is int
