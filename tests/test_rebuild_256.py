"""benchmarks/rebuild_256.py: the 256 px runs rebuilt step by step, done steps skipped, a failed step resumed."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import rebuild_256 as rb  # noqa: E402


def writer(name: str, fail_unless: str | None = None):
    """A step command that appends to RUNS/calls and writes RUNS/NAME, or exits 3 while RUNS/FAIL_UNLESS is absent."""
    code = ("import sys, pathlib; r = pathlib.Path(sys.argv[1]); (r / 'calls').open('a').write(sys.argv[2] + '\\n');"
            "g = sys.argv[3]; sys.exit(3) if g and not (r / g).exists() else (r / sys.argv[2]).write_text('ok')")
    return lambda runs: [[sys.executable, "-c", code, str(runs.resolve()), name, fail_unless or ""]]


def fake_steps():
    done = lambda name: (lambda runs: (runs / name).is_file())  # noqa: E731
    return [rb.Step("a", 1, writer("a"), done("a")),
            rb.Step("b", 1, writer("b", fail_unless="fixed"), done("b")),
            rb.Step("c", 1, writer("c"), done("c"))]


def test_a_failed_step_stops_the_rest_and_a_rerun_skips_what_is_done(tmp_path):
    out = io.StringIO()
    assert rb.rebuild(fake_steps(), tmp_path, out=out) == 1
    assert "b: failed (exit 3)" in out.getvalue() and str(tmp_path / "rebuild-logs" / "b.log") in out.getvalue()
    assert (tmp_path / "calls").read_text().split() == ["a", "b"]  # c never started
    (tmp_path / "fixed").write_text("")
    out = io.StringIO()
    assert rb.rebuild(fake_steps(), tmp_path, out=out) == 0
    assert (tmp_path / "calls").read_text().split() == ["a", "b", "b", "c"]  # a was not run again
    assert out.getvalue().splitlines()[0] == "a: done"
    assert "$ " in (tmp_path / "rebuild-logs" / "b.log").read_text()  # each command is logged before it runs


def test_until_stops_after_the_named_step_and_a_step_that_leaves_no_output_fails(tmp_path):
    assert rb.rebuild(fake_steps(), tmp_path, until="a") == 0
    assert (tmp_path / "calls").read_text().split() == ["a"]
    silent = [rb.Step("s", 1, lambda runs: [[sys.executable, "-c", "pass"]], lambda runs: False)]
    out = io.StringIO()
    assert rb.rebuild(silent, tmp_path, out=out) == 1
    assert "s: its commands ended but its output is not complete" in out.getvalue()
    with pytest.raises(ValueError, match="--until: unknown step 'z'; steps: a, b, c"):
        rb.plan(fake_steps(), tmp_path, "z")


def test_the_real_steps_know_what_is_done_and_parse_with_the_cli(tmp_path):
    runs = tmp_path / "runs"
    assert [done for _, done in rb.plan(rb.STEPS, runs)] == [False] * len(rb.STEPS)
    (runs / "sim256-judge").mkdir(parents=True)
    (runs / "sim256-judge" / "finding_masks.npz").write_bytes(b"")
    (runs / "judge-256-spot").mkdir()
    (runs / "judge-256-spot" / "judge.json").write_text("{}")
    (runs / "judge-256-spot" / "state.pt").write_bytes(b"")  # an epoch's state left: training not finished
    (runs / "u256-f1" / "state").mkdir(parents=True)
    (runs / "u256-f1" / "state" / "progress.json").write_text(json.dumps({"step": 1000}))
    done = {s.name: d for s, d in rb.plan(rb.STEPS, runs)}
    assert done == {"sim256-judge": True, "judge-256-spot": False, "dec256": False, "u256": False, "u256-f1": True,
                    "u256-f1-snap1000": False, "eval-spot-u256f1-1000": False}
    from training.cli import build_parser

    parser = build_parser()
    for step in rb.STEPS:  # every flag a step passes exists (a renamed flag would fail hours into a rebuild)
        for cmd in step.commands(Path("runs")):
            if cmd[1:3] == ["-m", "training.cli"]:
                parser.parse_args(cmd[3:])
    listed = subprocess.run([sys.executable, "benchmarks/rebuild_256.py", "--list", "--runs", str(runs)],
                            capture_output=True, text=True, cwd=REPO)
    assert listed.returncode == 0 and listed.stdout.split("\n")[0].split()[:2] == ["sim256-judge", "done"]
    assert len(listed.stdout.splitlines()) == len(rb.STEPS)


def test_a_cache_is_linked_into_the_next_run_once(tmp_path):
    (tmp_path / "u256").mkdir()
    (tmp_path / "u256" / "latents.pt").write_bytes(b"x")
    rb.link_cache("u256/latents.pt", "u256-f1/latents.pt")(tmp_path)
    assert (tmp_path / "u256-f1" / "latents.pt").stat().st_ino == (tmp_path / "u256" / "latents.pt").stat().st_ino
    rb.link_cache("u256/latents.pt", "u256-f1/latents.pt")(tmp_path)  # already there: left alone
