"""Ratings-based rewards against the real feedback store (training.feedback.store): they read its public API,
record the cursor they stopped at, and train from a store given by URL alone."""

import json

import pytest
import torch

from training.reward import base as rb
from training.reward.config import RewardConfig
from training.reward.data import read_snapshot
from training.reward.testing import toy_store

fs = pytest.importorskip("training.feedback.store")

TINY = dict(image_size=32, channels=(8, 16), features=16, batch_size=16, epochs=2, max_weak_positives=0,
            val_fraction=0.25, test_fraction=0.25)


@pytest.fixture(scope="module")
def store_url(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    url = f"sqlite:///{root / 'store.db'}"
    store = fs.open_store(url)
    toy_store(store, n_prompts=8, per_prompt=4, size=32, seed=0)
    return url


def test_snapshot_reads_everything_up_to_one_cursor(store_url):
    store = fs.open_store(store_url, upgrade=False)
    snap = read_snapshot(store, store_url)
    assert len(snap.generations) == 32 and len(snap.ratings) == 96 and len(snap.comparisons) == 24
    assert snap.cursor == store.cursor() and snap.url == store_url
    assert [r.generation_id for r in snap.ratings] == [r.generation_id for r in store.ratings()]


@pytest.mark.parametrize("kind", ["plausibility", "comparative"])
def test_training_from_a_store_url_records_its_cursor(store_url, tmp_path, kind):
    before = fs.open_store(store_url, upgrade=False).cursor()
    cfg = RewardConfig(kind=kind, store=store_url, out=str(tmp_path / kind), data="", **TINY)
    out = rb.trainer(kind)(cfg)
    m = json.loads((out / rb.MANIFEST).read_text())
    assert m["data"]["store_cursor"] == before and m["data"]["store_url"] == store_url
    assert m["config"]["store"] == store_url and m["kind"] == kind
    # feedback that arrives later is beyond the recorded cursor: the next round reads exactly it
    store = fs.open_store(store_url, upgrade=False)
    gid = store.generations()[0].id
    store.add_rater(f"late-{kind}", "radiologist")
    store.add_rating(generation_id=gid, rater_id=f"late-{kind}", plausible=True)
    late = store.read_after(m["data"]["store_cursor"]).events
    assert [e.kind for e in late][-2:] == ["rater", "rating"] and late[-1].record.rater_id == f"late-{kind}"
    assert rb.load_reward(out).score(torch.zeros(2, 1, 32, 32)).shape == (2,)


def test_an_empty_store_is_a_clear_error(tmp_path):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    fs.open_store(url)
    cfg = RewardConfig(kind="plausibility", store=url, out=str(tmp_path / "p"), data="", **TINY)
    with pytest.raises(ValueError, match="holds no ratings up to cursor 0"):
        rb.trainer("plausibility")(cfg)
