"""``cxrgen loop`` (issue 8, section 2) on tiny components: the micro checkpoint (32 px), the committed panel and
reused rewards, 32 px rewards retrained for one epoch, one ddpo iteration of 3 steps per round."""

from __future__ import annotations

import json
import math

import pytest

from micro_model import micro_checkpoint
from training.align import loop as L
from training.align.loop_config import LoopConfig

PROMPTS = ("Moderate left pleural effusion.\nCardiomegaly.\nNo acute cardiopulmonary process.\n"
           "Right upper lobe pneumonia.\n")
HELD = ('{"prompt": "Large right pleural effusion.", "findings": [{"kind": "pleural_effusion", "side": "right", '
        '"severity": "large"}]}\n{"prompt": "Normal chest.", "findings": []}\n')
TINY_REWARD = dict(image_size=32, channels=[8, 16], features=16, batch_size=16, epochs=1, val_fraction=0,
                   test_fraction=0)
TINY_ALIGN = dict(prompts_per_iter=2, images_per_prompt=2, min_count=1, save_every=1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    (root / "prompts.txt").write_text(PROMPTS)
    (root / "held.jsonl").write_text(HELD)
    (root / "reward.json").write_text(json.dumps(TINY_REWARD))
    (root / "align.json").write_text(json.dumps(TINY_ALIGN))
    return {"root": root, "model": micro_checkpoint(root / "ckpt", "micro", reports=300)}


def _cfg(world, name: str, **kw) -> LoopConfig:
    r = world["root"]
    base = dict(out=str(r / name), model=str(world["model"]), prompts_file=str(r / "prompts.txt"), gen_prompts=3,
                gen_images=2, steps=3, guidance=2.0, reward_config=str(r / "reward.json"), reward_data="",
                iterations=1, align_config=str(r / "align.json"), eval_prompts_file=str(r / "held.jsonl"))
    base.update(kw)
    return LoopConfig(**base)


def _json(path):
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def first_round(world):
    """One round that must pass the gate (any change of the target passes, the guard cannot fail)."""
    cfg = _cfg(world, "loop", min_gain=-1.0, reward_tolerance=1.0, promote_to=str(world["root"] / "promoted"))
    return cfg, L.run_loop(cfg, progress=False)


def test_one_round_end_to_end(world, first_round, capsys):
    from training.expert.raters import DEFAULT_RATERS
    from training.model.checkpoint import Manifest

    cfg, summary = first_round
    out, rnd = world["root"] / "loop", world["root"] / "loop" / "round-1"
    # 1. generate: 3 drawn prompts x 2 images, a `cxrgen generate` folder
    assert len(list((rnd / "generated").glob("*.png"))) == 6 and (rnd / "prompts.jsonl").is_file()
    # 2. the panel rated every image and compared the 3 same-prompt pairs into the loop's store
    fb = _json(rnd / "steps" / "feedback.json")
    n = len(DEFAULT_RATERS)
    assert fb["source"] == "panel" and fb["ratings"] == 6 * n and fb["comparisons"] == 3 * n
    assert fb["cursor_start"] == 0 and fb["cursor_end"] == fb["new_events"] == n + 6 + 6 * n + 3 * n
    # 3. the store-driven rewards retrained on the store up to the round's cursor; the others linked in
    rw = _json(rnd / "steps" / "rewards.json")["rewards"]
    for k in ("plausibility", "comparative"):
        assert rw[k]["retrained"] and rw[k]["store_cursor"] == fb["cursor_end"]
    assert all(not rw[k]["retrained"] and (rnd / "rewards" / k).is_symlink() for k in ("posture", "diagnosis",
                                                                                        "consistency"))
    # 4. align from the starting model; 5. both models evaluated on the same held-out prompts
    m = Manifest.read(rnd / "align" / "checkpoint")
    assert m.parent_version == "micro" and m.version == "micro+ddpo-loop1" and m.stage == "align:ddpo"
    ev = _json(rnd / "steps" / "evaluate.json")
    for side in ("current", "candidate"):
        assert ev[side]["heldout_n"] == 2 and {"reward", "panel_plausible_rate"} <= set(ev[side])
    assert set(ev["rewards"]) == {"plausibility", "posture", "diagnosis", "consistency"}
    # 6. the gate, the report, the promotion
    report = _json(rnd / "report.json")
    assert report["decision"] == "promoted" and [c["metric"] for c in report["checks"]] == ["panel_plausible_rate",
                                                                                           "reward"]
    assert all(c["passed"] for c in report["checks"]) and "panel_plausible_rate" in report["reason"]
    assert report["metrics"]["reward"]["current"] == pytest.approx(ev["current"]["reward"])
    assert "# Loop round 1: promoted" in (rnd / "report.md").read_text()
    cur = _json(out / "current.json")
    assert cur == {"model": str(rnd / "align" / "checkpoint"), "version": "micro+ddpo-loop1", "round": 1}
    assert summary["promoted"] == [1] and summary["current"] == cur["model"]
    assert Manifest.read(world["root"] / "promoted").version == "micro+ddpo-loop1"


def test_rerun_does_no_work_and_more_rounds_run_only_the_new_ones(world, first_round, monkeypatch, capsys):
    from training.model.checkpoint import Manifest

    cfg, _ = first_round
    out = world["root"] / "loop"
    stamps = {p: p.stat().st_mtime_ns for p in (out / "round-1").rglob("*") if p.is_file()}
    with monkeypatch.context() as mp:  # a finished loop runs no step
        mp.setattr(L, "run_round", lambda *a, **k: pytest.fail("a finished round ran again"))
        capsys.readouterr()
        again = L.run_loop(cfg, progress=False)
        line = json.loads(capsys.readouterr().out.splitlines()[0])
    assert line["round"] == 1 and line["cached"] and line["decision"] == "promoted" and again["promoted"] == [1]
    more = _cfg(world, "loop", min_gain=-1.0, reward_tolerance=1.0, promote_to=str(world["root"] / "promoted"),
                rounds=2)
    summary = L.run_loop(more, progress=False)
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}  # round 1 untouched
    r2 = out / "round-2"
    begin, r1 = _json(r2 / "round.json"), _json(out / "round-1" / "steps" / "feedback.json")
    assert begin["model"] == str(out / "round-1" / "align" / "checkpoint")  # from the promoted model
    assert begin["cursor_start"] == r1["cursor_end"] < _json(r2 / "steps" / "feedback.json")["cursor_end"]
    m2 = Manifest.read(r2 / "align" / "checkpoint")
    assert m2.parent_version == "micro+ddpo-loop1"
    # Its parents back to the model the loop started from, nearest first.
    assert [a["version"] for a in m2.lineage] == ["micro+ddpo-loop1", "micro"]
    assert m2.lineage[0]["stage"] == "align:ddpo"
    assert summary["promoted"] == [1, 2] and _json(out / "current.json")["round"] == 2
    assert Manifest.read(world["root"] / "promoted").version == "micro+ddpo-loop2"
    # A round cut short after alignment resumes at its evaluation: no step before it runs again.
    for name in ("evaluate.json", "done.json"):
        (r2 / "steps" / name).unlink()
    (r2 / "report.json").unlink()
    with monkeypatch.context() as mp:
        for step in ("generate_step", "feedback_step", "rewards_step", "align_step"):
            mp.setattr(L, step, lambda *a, _s=step, **k: pytest.fail(f"{_s} ran again"))
        assert L.run_loop(more, progress=False)["promoted"] == [1, 2]
    assert (r2 / "steps" / "evaluate.json").is_file() and _json(r2 / "report.json")["decision"] == "promoted"
    with pytest.raises(ValueError, match="other settings.*steps"):
        L.run_loop(_cfg(world, "loop", steps=4, rounds=2), progress=False)


def test_feedback_from_an_ndjson_export_drives_a_round_without_the_panel(world, first_round, monkeypatch):
    """Real experts' ratings (an export of a store) drive the round; the gate keeps the model when the target
    cannot rise by min_gain, and current.json stays at the starting model."""
    from training.feedback.exchange import export_events
    from training.feedback.store import open_store

    first_round  # the store of the first loop stands in for the service's
    src = world["root"] / "loop" / "feedback"
    export = world["root"] / "experts.ndjson"
    with open_store(f"sqlite:///{src / 'store.db'}", src / "images") as store, open(export, "w") as f:
        export_events(store, f)
    # These experts rated but never compared: comparative has nothing new to learn and is kept.
    kept = [x for x in export.read_text().splitlines(keepends=True) if json.loads(x)["kind"] != "comparison"]
    export.write_text("".join(kept))
    n = len(kept)
    monkeypatch.setattr("training.expert.rate.rate_folder", lambda *a, **k: pytest.fail("the panel was asked"))
    cfg = _cfg(world, "experts", feedback=str(export), min_gain=1.0)
    summary = L.run_loop(cfg, progress=False)
    rnd = world["root"] / "experts" / "round-1"
    fb = _json(rnd / "steps" / "feedback.json")
    assert fb["source"] == str(export) and fb["events_read"] == n and fb["new_events"] == n and fb["cursor_start"] == 0
    assert not (rnd / "generated").exists() and not (rnd / "steps" / "generate.json").exists()
    rw = _json(rnd / "steps" / "rewards.json")["rewards"]
    assert rw["plausibility"]["retrained"] and rw["plausibility"]["store_cursor"] == n
    assert not rw["comparative"]["retrained"] and "no comparisons" in rw["comparative"]["note"]
    assert (rnd / "rewards" / "comparative").is_symlink()
    report = _json(rnd / "report.json")
    assert report["decision"] == "kept" and summary["kept"] == [1]
    assert "target panel_plausible_rate did not rise by more than 1.0" in report["reason"]
    assert _json(world["root"] / "experts" / "current.json") == {"model": str(world["model"]), "version": "micro",
                                                                 "round": 0}


def test_feedback_from_a_service_or_a_store_resumes_at_its_cursor(world, first_round, tmp_path):
    """A service's /feedback/stream (here a stand-in HTTP server replaying an export) is imported as
    `cxrgen feedback import URL` does, asking only for what came after the previous round's cursor; so is
    another store given by URL."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from training.feedback.exchange import export_events
    from training.feedback.store import open_store

    first_round
    src = world["root"] / "loop" / "feedback"
    buf = tmp_path / "events.ndjson"
    with open_store(f"sqlite:///{src / 'store.db'}", src / "images") as store, open(buf, "w") as f:
        n, cursor = export_events(store, f)
    lines, asked = buf.read_text().splitlines(keepends=True), []

    class Stream(BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            after = int(self.path.rsplit("after=", 1)[1])
            body = [x for x in lines if json.loads(x)["seq"] > after]
            body.append(json.dumps({"kind": "end", "events": len(body), "cursor": cursor}) + "\n")
            self.send_response(200)
            self.end_headers()
            self.wfile.write("".join(body).encode())

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Stream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = _cfg(world, "stream", feedback=f"http://127.0.0.1:{server.server_port}", out=str(tmp_path / "loop"))
        first = L.import_feedback(cfg, after=0)
        again = L.import_feedback(cfg, after=first["source_cursor"])
    finally:
        server.shutdown()
    assert first == {"source": cfg.feedback, "events_read": n, "source_cursor": cursor}
    assert again["events_read"] == 0 and asked == ["/feedback/stream?after=0", f"/feedback/stream?after={cursor}"]
    with L.open_loop_store(cfg) as store:
        assert store.cursor() == n
    # Another store by URL (the service's database): the same events, then nothing new after its cursor.
    cfg = _cfg(world, "db", feedback=f"sqlite:///{src / 'store.db'}", feedback_blobs=str(src / "images"),
               out=str(tmp_path / "db"))
    first = L.import_feedback(cfg, after=0)
    assert first["events_read"] == n and first["source_cursor"] == cursor
    assert L.import_feedback(cfg, after=cursor) == {**first, "events_read": 0}


def test_gate_promotes_only_a_better_target_with_every_guard_held():
    guards = {"reward": 0.02, "judge_auroc_mean": 0.03}
    cur = {"panel_plausible_rate": 0.30, "reward": 0.50, "judge_auroc_mean": 0.80}
    ok = L.gate(cur, {"panel_plausible_rate": 0.40, "reward": 0.49, "judge_auroc_mean": 0.78},
                "panel_plausible_rate", 0.0, guards)
    assert ok["promote"] and [c["passed"] for c in ok["checks"]] == [True, True, True]
    assert ok["checks"][0]["change"] == pytest.approx(0.10)
    hacked = L.gate(cur, {"panel_plausible_rate": 0.40, "reward": 0.60, "judge_auroc_mean": 0.70},
                    "panel_plausible_rate", 0.0, guards)
    assert not hacked["promote"] and "judge_auroc_mean" in hacked["reason"] and "0.03" in hacked["reason"]
    assert [c["metric"] for c in hacked["checks"] if c["passed"] is False] == ["judge_auroc_mean"]
    flat = L.gate(cur, dict(cur), "panel_plausible_rate", 0.0, guards)  # no gain is not a gain
    assert not flat["promote"] and "did not rise" in flat["reason"] and "panel_plausible_rate" in flat["reason"]
    small = L.gate(cur, {**cur, "panel_plausible_rate": 0.32}, "panel_plausible_rate", 0.05, guards)
    assert not small["promote"]
    # A guard neither model measured (no judge classes) is skipped; one the candidate lacks fails.
    nan = float("nan")
    skipped = L.gate({**cur, "judge_auroc_mean": nan}, {**cur, "panel_plausible_rate": 0.5, "judge_auroc_mean": nan},
                     "panel_plausible_rate", 0.0, guards)
    assert skipped["promote"] and skipped["checks"][2]["passed"] is None
    lost = L.gate(cur, {"panel_plausible_rate": 0.5, "reward": 0.5}, "panel_plausible_rate", 0.0, guards)
    assert not lost["promote"] and "judge_auroc_mean not measured on the candidate" in lost["reason"]
    assert not L.gate({}, {"panel_plausible_rate": 0.5}, "panel_plausible_rate", 0.0, {})["promote"]
    assert math.isclose(LoopConfig(judge="j").guards()["judge_agreement"], 0.03)
    assert "reward" not in LoopConfig(target="reward").guards()


def test_loop_cli_errors_are_one_line(world, tmp_path, capsys):
    from training.cli import main

    ok = ["loop", "--out", str(tmp_path / "x"), "--model", str(world["model"]), "--prompts-file",
          str(world["root"] / "prompts.txt")]
    cases = [
        (["loop", "--prompts-file", str(world["root"] / "prompts.txt")], "--out is required"),
        (ok + ["--rounds", "0"], "--rounds must be >= 1"),
        (ok + ["--model", str(tmp_path / "none")], "no model at"),
        (ok[:5] + ["--prompts-from", str(tmp_path / "nodata")], "no ground_truth.jsonl"),
        (ok[:5], "give --prompts-from"),
        (ok + ["--method", "rwl"], "--real-data"),
        (ok + ["--feedback", str(tmp_path / "none.ndjson")], "neither a service URL"),
        (ok + ["--align-config", str(world["root"] / "reward.json")], "unknown field(s)"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("cxrgen loop: error:") and message in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as e:
        main(ok + ["--method", "magic"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing written before the checks


def test_promote_copies_renames_and_names_the_parents(world, tmp_path, capsys):
    """``cxrgen promote``: a checkpoint written before manifests kept a lineage gets it from the parents its config
    names; --version renames it and records the old name; what was at --to is replaced only by a complete copy."""
    import shutil

    from training.cli import main
    from training.model.checkpoint import Manifest

    parent, child = world["model"], tmp_path / "child"
    shutil.copytree(parent, child)
    Manifest(version="micro+dpo", stage="align:dpo", parent_version="micro",
             config={"align": {"model": str(parent)}}).write(child)
    dest = tmp_path / "default"
    shutil.copytree(parent, dest)  # the model being replaced
    assert main(["promote", str(child), "--to", str(dest), "--version", "micro-v2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["version"] == "micro-v2" and out["lineage"] == ["micro"]
    m = Manifest.read(dest)
    assert m.version == "micro-v2" and m.parent_version == "micro" and m.stage == "align:dpo"
    assert m.config["promoted"] == {"from_version": "micro+dpo"} and m.config["align"]["model"] == str(parent)
    assert [a["version"] for a in m.lineage] == ["micro"] and m.lineage[0]["stage"] == "init"
    assert m.ancestry()[0]["version"] == "micro-v2"
    w = "unet/diffusion_pytorch_model.safetensors"
    assert (dest / w).read_bytes() == (child / w).read_bytes()
    assert not any(p.name.startswith(".default") for p in tmp_path.iterdir())  # no temporary left behind
    # Promoting it again is a no-op; a folder that is not a checkpoint is refused before anything is written.
    before = (dest / "cxrgen_manifest.json").stat().st_mtime_ns
    assert main(["promote", str(child), "--to", str(dest), "--version", "micro-v2"]) == 0
    assert (dest / "cxrgen_manifest.json").stat().st_mtime_ns == before
    capsys.readouterr()
    (tmp_path / "empty").mkdir()
    assert main(["promote", str(tmp_path / "empty"), "--to", str(dest)]) == 2
    assert "is not a cxrgen checkpoint" in capsys.readouterr().err
    assert Manifest.read(dest).version == "micro-v2"
