"""``cxrgen expert train / rate / report`` end to end on tiny cartoon data and a SQLite store in tmp."""

import json

import pytest

from training.cli import main
from training.expert.testing import write_fake_dataset, write_fake_generated
from training.findings import Finding

PROMPTS = [[Finding("pleural_effusion", "left", "moderate")], [Finding("cardiomegaly", severity="large")], []]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Fake simulated data, a fake generated folder and a panel trained on them by the CLI."""
    root = tmp_path_factory.mktemp("expert")
    data = write_fake_dataset(root / "sim", n=60, size=64)
    gen = write_fake_generated(root / "gen", PROMPTS, n=3)
    panel = root / "panel"
    rc = main(["expert", "train", "--data", str(data), "--generated", str(gen), "--out", str(panel),
               "--epochs", "1", "--critic-epochs", "1", "--reader-size", "32", "--critic-size", "32",
               "--width", "4", "--batch-size", "16"])
    assert rc == 0
    return {"root": root, "data": data, "gen": gen, "panel": panel, "store": f"sqlite:///{root / 'store.db'}"}


def _rate(world, *extra, store=None):
    return main(["expert", "rate", "--generated", str(world["gen"]), "--store", store or world["store"],
                 "--panel", str(world["panel"]), *extra])


def test_train_writes_the_panel_folder(world):
    meta = json.loads((world["panel"] / "panel.json").read_text())
    assert (world["panel"] / "panel.safetensors").is_file() and (world["panel"] / "train_log.jsonl").is_file()
    for k in ("reader_auroc", "pose_mae", "critic_auroc_real_vs_generated", "critic_auroc_real_vs_corrupted"):
        assert k in meta["metrics"]
    assert set(meta["calibration"]["anatomy_bands"]) and meta["version"].startswith("panel-")
    assert meta["data"]["simulate_seed"] == 2 and len(meta["raters"]) >= 5


def test_rate_writes_every_rating_once_and_pairs(world, tmp_path, capsys):
    from training.expert.raters import DEFAULT_RATERS
    from training.feedback.store import open_store

    url = f"sqlite:///{tmp_path / 'rate.db'}"
    assert _rate(world, "--pairs", "--seed", "3", store=url) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    n_img, n_raters = 9, len(DEFAULT_RATERS)
    assert first["images"] == n_img and first["ratings"] == n_img * n_raters
    assert first["comparisons"] == 3 * 3 * n_raters  # 3 prompts x 3 pairs x raters
    assert first["new_events"] == n_raters + n_img + n_img * n_raters + first["comparisons"]
    with open_store(url) as store:
        gens = store.generations()
        ratings = store.ratings()
        comparisons = store.comparisons()
        raters = {r.id for r in store.raters()}
    assert len(gens) == n_img and raters == {r.id for r in DEFAULT_RATERS}
    assert len(ratings) == n_img * n_raters and len(comparisons) == first["comparisons"]
    assert all(1 <= r.score <= 5 and r.comment for r in ratings)
    assert all(r.plausible == (not r.failed) for r in ratings)
    assert gens[0].findings == [PROMPTS[0][0].to_dict()] and gens[0].model_version == "fake-v0"
    # Re-running is a no-op: same ids, nothing new in the feed.
    assert _rate(world, "--pairs", "--seed", "3", store=url) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["new_events"] == 0 and again["generations"] == first["generations"]


def test_same_seed_same_ratings_in_two_stores(world, tmp_path, capsys):
    from training.feedback.store import open_store

    def ratings(url):
        assert main(["expert", "rate", "--generated", str(world["gen"]), "--store", url,
                     "--panel", str(world["panel"]), "--seed", "5"]) == 0
        with open_store(url) as s:
            return sorted((r.rater_id, r.plausible, tuple(r.failed), r.score, r.comment, r.key) for r in s.ratings())

    assert ratings(f"sqlite:///{tmp_path / 'a.db'}") == ratings(f"sqlite:///{tmp_path / 'b.db'}")


def test_report_writes_json(world, capsys):
    assert _rate(world, "--pairs") == 0
    out = world["root"] / "report.json"
    assert main(["expert", "report", "--store", world["store"], "--panel", str(world["panel"]),
                 "--data", str(world["data"]), "--split", "train", "--n", "12", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    real, gen = report["real"], report["generated"]
    assert real["items"] == 12 and 0 <= real["plausible_rate_majority"] <= 1
    assert set(real["failed_share"]) == {"finding_absent", "wrong_side", "wrong_size", "unprompted_finding",
                                         "anatomy", "posture", "artefact"}
    assert set(real["agreement_with_majority"]) == {r["id"] for r in report["raters"]}
    assert "fake-v0" in gen["by_model_version"] and gen["overall"]["items"] == 9
    assert gen["comparisons"]["pairs"] >= 9 and "leave_one_out" in gen["comparisons"]
    assert '"panel_version"' in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["rate", "--generated", "{root}/missing"], "--generated folder not found"),
    (["rate", "--generated", "{gen}", "--panel", "{root}/no-panel"], "panel folder not found"),
    (["rate", "--generated", "{gen}", "--raters", "sim-junior-resident,dr-who"], "unknown rater id"),
    (["rate", "--generated", "{gen}", "--seed", "-1"], "--seed must be an integer >= 0"),
    (["report", "--no-store", "--data", "{root}/missing"], "--data folder not found"),
    (["train", "--data", "{root}/missing", "--generated", "{gen}"], "--data folder not found"),
])
def test_clear_errors(world, capsys, args, message):
    fmt = {"root": world["root"], "gen": world["gen"]}
    argv = ["expert"] + [a.format(**fmt) for a in args]
    if args[0] in ("rate", "report") and "--panel" not in args:
        argv += ["--panel", str(world["panel"])]
    if args[0] in ("rate", "report") and "--no-store" not in args:
        argv += ["--store", world["store"]]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_train_refuses_the_other_eyes_data(tmp_path):
    from training.expert.train import check_data_seed

    (tmp_path / "simulate_config.json").write_text(json.dumps({"seed": 1}))
    with pytest.raises(ValueError, match="evaluation judge"):
        check_data_seed(tmp_path)


def test_rate_from_store_rates_what_others_put_there_once(world, tmp_path, capsys):
    """Generations the service (or an import) wrote, rated in place; the same keys as rating the folder."""
    from training.expert.data import read_generated
    from training.expert.raters import DEFAULT_RATERS
    from training.feedback.store import open_store

    url = f"sqlite:///{tmp_path / 'service.db'}"
    with open_store(url) as store:
        for im in read_generated(world["gen"]):
            store.add_generation(image=str(im.path), prompt=im.prompt, findings=list(im.findings), seed=im.seed,
                                 sampler=dict(im.sampler), model_version=im.model_version)
        cursor = store.cursor()
    args = ["expert", "rate", "--from-store", "--store", url, "--panel", str(world["panel"])]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["images"] == 9 and first["ratings"] == 9 * len(DEFAULT_RATERS)
    assert main(args) == 0 and json.loads(capsys.readouterr().out.strip().splitlines()[-1])["new_events"] == 0
    assert _rate(world, store=url) == 0  # the folder itself: nothing new either
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["new_events"] == 0
    assert main([*args, "--after", str(cursor + 10_000)]) == 0  # nothing after that cursor
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == 0
    with open_store(url) as store:
        assert len(store.ratings()) == 9 * len(DEFAULT_RATERS)
