"""``cxrgen feedback export`` / ``import``: feedback moves between stores (SQLite -> PostgreSQL here),
ids are remapped through idempotency keys, a re-import is a no-op, and an export resumes at a cursor."""

import json

import numpy as np
import pytest

from training.cli import main
from training.feedback import store as fs


def fill(store, offset=0):
    store.add_rater("rad-1", "radiologist", "FRCR")
    gids = [store.add_generation(image=np.full((8, 8), offset + i, np.uint8), prompt="p", seed=i,
                                 findings=[{"kind": "cardiomegaly"}], sampler={"steps": 2}, model_version="v")
            for i in range(3)]
    store.add_rating(generation_id=gids[1], rater_id="rad-1", plausible=False, failed=["anatomy"], score=1)
    store.add_comparison(generation_a=gids[2], generation_b=gids[1], preferred="a", rater_id="rad-1")
    return gids


def content(store):
    """What a store holds, without local ids or paths."""
    gens = {g.id: g for g in store.generations()}
    return ([(g.key, g.prompt, g.findings, g.seed, g.image_sha256, g.created) for g in gens.values()],
            [(gens[r.generation_id].key, r.plausible, r.failed, r.score, r.key, r.created) for r in store.ratings()],
            [(gens[c.generation_a].key, gens[c.generation_b].key, c.preferred, c.key) for c in store.comparisons()],
            [r.to_dict() for r in store.raters()])


def test_export_import_round_trip(tmp_path, pg_url, capsys):
    src_url = f"sqlite:///{tmp_path / 'src.db'}"
    with fs.open_store(src_url) as src:
        fill(src)
    out = tmp_path / "feedback.ndjson"
    assert main(["feedback", "export", "--after", "0", "--store", src_url, "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["cursor"] == 6
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["seq"] for x in lines] == [1, 2, 3, 4, 5, 6] and "image_png_base64" in lines[1]["record"]
    with fs.open_store(pg_url, blobs=tmp_path / "pg-blobs") as dst:
        fill(dst, offset=100)  # the target already holds other generations: ids will differ
        before = dst.cursor()
        for _ in range(2):  # the second import is a no-op
            assert main(["feedback", "import", str(out), "--store", pg_url, "--blobs", str(tmp_path / "pg-blobs")]) == 0
        assert dst.cursor() == before + 5  # the rater was there already
        with fs.open_store(src_url) as src:
            mine = content(src)
        theirs = content(dst)
        assert all(x in theirs[i] for i in range(3) for x in mine[i])
        gid = dst.generation_id(lines[1]["record"]["key"])
        np.testing.assert_array_equal(dst.image(gid), np.zeros((8, 8), np.uint8))


def test_export_after_a_cursor_and_without_images(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 's.db'}"
    with fs.open_store(url) as s:
        fill(s)
    assert main(["feedback", "export", "--after", "4", "--store", url, "--no-images"]) == 0
    captured = capsys.readouterr()
    events = [json.loads(x) for x in captured.out.splitlines()]
    assert [e["kind"] for e in events] == ["rating", "comparison"] and json.loads(captured.err)["cursor"] == 6
    assert events[0]["record"]["generation_key"].startswith("generation:")
    # Without images, an import into a store whose blob folder lacks them is refused, naming the line.
    assert main(["feedback", "export", "--store", url, "--no-images", "--out", str(tmp_path / "all.ndjson")]) == 0
    capsys.readouterr()
    assert main(["feedback", "import", str(tmp_path / "all.ndjson"), "--store", f"sqlite:///{tmp_path}/o/o.db"]) == 2
    err = capsys.readouterr().err
    assert "all.ndjson:2" in err and "without images" in err
    # A store sharing the blob folder (same machine) has the images: the import works.
    assert main(["feedback", "import", str(tmp_path / "all.ndjson"), "--store", f"sqlite:///{tmp_path}/o.db"]) == 0


def test_import_rejects_bad_lines(tmp_path, capsys):
    bad = tmp_path / "bad.ndjson"
    bad.write_text('{"kind": "rating"}\n')
    assert main(["feedback", "import", str(bad), "--store", f"sqlite:///{tmp_path}/t.db"]) == 2
    assert "bad.ndjson:1" in capsys.readouterr().err
    bad.write_text('{"seq": 1, "kind": "rating", "record": {"generation_key": "nope"}}\n')
    assert main(["feedback", "import", str(bad), "--store", f"sqlite:///{tmp_path}/t.db"]) == 2
    assert "no generation with key 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["feedback", "export", "--after", "x"])
