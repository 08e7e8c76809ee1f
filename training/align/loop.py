"""``cxrgen loop``: rounds of generate -> rate -> retrain rewards -> align -> evaluate -> gate (issue 8, section 2).

One round K, each step writing into OUT/round-K/ and marking itself done in OUT/round-K/steps/<step>.json, so
that re-running the same command skips finished steps and finished rounds:

1. generate  the current model draws images of ``gen_prompts`` training prompts (a `cxrgen generate` folder,
             round-K/generated/); skipped when real experts' feedback comes from --feedback;
2. feedback  the simulated panel rates every image and compares same-prompt pairs into the store
             (training/expert/rate.py), or the new events of --feedback (a service's /feedback/stream, another
             store, or an NDJSON export: real experts) are imported; the store's cursor range (start, end] is
             the round's feedback;
3. rewards   plausibility and comparative retrain on the store into round-K/rewards/ (the trainers read the
             whole store up to the round's end cursor: they have no "after cursor" option); posture,
             diagnosis and consistency learn from simulated data and are linked in unchanged;
4. align     ``training.align.run.align`` from the current model on the round's rewards (round-K/align/);
5. evaluate  the current model and the candidate on the same held-out prompts with the same seeds
             (``heldout.probe``: the round's reward, the panel, the judge when given);
6. gate      promoted only if the target (default the panel's plausible rate) rises by more than
             ``min_gain`` and no guard falls past its tolerance; round-K/report.json and report.md say why,
             OUT/current.json names the model the next round starts from.

Module-level imports are torch-free: ``cxrgen --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

from training.artifacts import jsonable

from .loop_config import LoopConfig, RESUMABLE

PROMOTED, KEPT = "promoted", "kept"


# ----------------------------------------------------------------------------- the gate (a pure function)


def gate(current: dict, candidate: dict, target: str, min_gain: float, guards: dict[str, float]) -> dict:
    """Promote or keep: {"promote", "reason", "checks": [{metric, role, current, candidate, change, rule,
    passed}]}. Every metric is better when higher. The target must rise by more than ``min_gain``; each guard
    may fall at most its tolerance. A guard neither side measured (NaN / absent on both) is skipped and says so;
    one only the current model has is a failure."""
    checks = [_check(target, "target", current.get(target), candidate.get(target), min_gain)]
    checks += [_check(m, "guard", current.get(m), candidate.get(m), tol) for m, tol in guards.items()]
    failed = [c for c in checks if c["passed"] is False]
    if not failed:
        t = checks[0]
        return {"promote": True, "checks": checks,
                "reason": f"target {target} went {_f(t['current'])} -> {_f(t['candidate'])} ({t['change']:+.4f}, "
                          f"more than the {min_gain} required) and no guard fell past its tolerance"}
    return {"promote": False, "checks": checks, "reason": "; ".join(c["why"] for c in failed)}


def _check(metric: str, role: str, a, b, limit: float) -> dict:
    a, b = _num(a), _num(b)
    rule = f"change > {limit}" if role == "target" else f"change >= -{limit}"
    out = {"metric": metric, "role": role, "current": a, "candidate": b, "rule": rule,
           "change": None if a is None or b is None else b - a}
    if a is None and b is None and role == "guard":
        return {**out, "passed": None, "why": f"{metric} not measured on either model: skipped"}
    if b is None:
        return {**out, "passed": False, "why": f"{metric} not measured on the candidate"}
    if a is None:
        ok = role == "guard"  # nothing to fall from; a target must show a gain
        return {**out, "passed": ok, "why": f"{metric} not measured on the current model"}
    d = b - a
    if role == "target":
        return {**out, "passed": d > limit,
                "why": f"target {metric} did not rise by more than {limit}: {_f(a)} -> {_f(b)} ({d:+.4f})"}
    return {**out, "passed": d >= -limit,
            "why": f"guard {metric} fell past its tolerance {limit}: {_f(a)} -> {_f(b)} ({d:+.4f})"}


def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


# ----------------------------------------------------------------------------- files of a loop folder


def _write_json(path: Path, d: dict) -> None:
    """Atomically: a kill mid-write leaves the previous file (or none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(jsonable(d), indent=1) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


class Round:
    """OUT/round-K/: the round's folders, its step markers (steps/<step>.json: the step's result) and log."""

    def __init__(self, out: Path, k: int):
        self.k, self.dir = k, out / f"round-{k}"

    def result(self, step: str) -> dict | None:
        return _read_json(self.dir / "steps" / f"{step}.json")

    def mark(self, step: str, result: dict) -> dict:
        _write_json(self.dir / "steps" / f"{step}.json", result)
        return result

    @property
    def finished(self) -> bool:
        return (self.dir / "steps" / "done.json").is_file()

    @property
    def report(self) -> dict | None:
        return _read_json(self.dir / "report.json")

    def run(self, step: str, fn, progress: bool) -> dict:
        """The step's stored result, or run it (its prints go to round-K/log.txt) and store the result."""
        done = self.result(step)
        if done is not None:
            return done
        if progress:
            print(f"loop round {self.k}: {step}", file=sys.stderr, flush=True)
        t = time.perf_counter()
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "log.txt", "a") as log, contextlib.redirect_stdout(log):
            result = fn()
        return self.mark(step, {**result, "seconds": round(time.perf_counter() - t, 1)})


def check_resume(out: Path, cfg: LoopConfig) -> None:
    """OUT/config.json: written by the first run; a rerun may change only RESUMABLE settings."""
    import dataclasses

    old = _read_json(out / "config.json")
    if old is not None:
        diff = sorted(k for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE and old.get(k) != v)
        if diff:
            raise ValueError(f"{out} holds a loop with other settings ({', '.join(diff)}); use a new --out")
    _write_json(out / "config.json", dataclasses.asdict(cfg))


def model_version(path: str | Path) -> str:
    from training.model.checkpoint import Manifest

    m = Manifest.read(Path(path))
    return m.version if m else Path(path).name


def start_loop(out: Path, cfg: LoopConfig) -> None:
    """OUT/start.json (the starting model) and OUT/current.json ({"model", "version", "round"}: the model the
    next round starts from; round 0 is the starting model), written by the first run."""
    if not (out / "start.json").is_file():
        _write_json(out / "start.json", {"model": str(cfg.model_path), "version": model_version(cfg.model_path)})
    if not (out / "current.json").is_file():
        _write_json(out / "current.json", {**_read_json(out / "start.json"), "round": 0})


# ----------------------------------------------------------------------------- 1. generate


def training_prompts(cfg: LoopConfig) -> list:
    from training.generation import read_data_prompts, read_prompts_file

    if cfg.prompts_from:
        return read_data_prompts(cfg.prompts_from, cfg.split, cfg.limit)
    return read_prompts_file(cfg.prompts_file)


def run_command(register, argv: list[str]) -> int:
    """A cxrgen subcommand through its own parser (its flags' defaults and checks), in this process."""
    p = argparse.ArgumentParser(prog="cxrgen")
    register(p.add_subparsers(dest="command"))
    args = p.parse_args(argv)
    return int(args.func(args) or 0)


def generate_step(cfg: LoopConfig, rnd: Round, model: str) -> dict:
    """A new draw of training prompts (round-K/prompts.jsonl), ``gen_images`` images each: `cxrgen generate`."""
    from training.generation import register

    rng = random.Random(cfg.seed * 1_000_003 + rnd.k)
    pool = training_prompts(cfg)
    chosen = rng.sample(pool, min(cfg.gen_prompts, len(pool)))
    prompts = rnd.dir / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "findings": [f.to_dict() for f in fs]}) + "\n"
                               for p, fs in chosen))
    final, tmp = rnd.dir / "generated", rnd.dir / "generated.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # a generation cut short appends to nothing
    seed = cfg.seed + 100_000 * rnd.k  # image i: seed + i, new images every round
    run_command(register, ["generate", "--prompts-file", str(prompts), "--n", str(cfg.gen_images), "--seed",
                           str(seed), "--steps", str(cfg.steps), "--guidance", str(cfg.guidance), "--batch-size",
                           str(cfg.batch_size), "--model", model, "--out", str(tmp), "--device", cfg.device])
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return {"folder": str(final), "prompts": len(chosen), "images": len(chosen) * cfg.gen_images, "seed": seed}


# ----------------------------------------------------------------------------- 2. feedback


def open_loop_store(cfg: LoopConfig):
    from training.feedback.store import open_store

    return open_store(cfg.store_url, cfg.store_blobs)


def panel_feedback(cfg: LoopConfig, store, folder: str) -> dict:
    """The panel rates every image of the folder and compares its same-prompt pairs (`cxrgen expert rate`)."""
    from training.expert.panel import Panel
    from training.expert.rate import rate_folder
    from training.expert.raters import select_raters

    panel = Panel.load(cfg.panel_path)
    raters = select_raters([s.strip() for s in cfg.raters.split(",") if s.strip()] if cfg.raters else None)
    s = rate_folder(store, panel, folder, raters, seed=cfg.seed, pairs=True, max_pairs=cfg.max_pairs)
    return {"source": "panel", "panel_version": s.panel_version, "raters": s.raters, "images": s.images,
            "ratings": s.ratings, "plausible": s.plausible, "comparisons": s.comparisons}


def import_feedback(cfg: LoopConfig, after: int) -> dict:
    """Real experts: the events of --feedback after cursor ``after`` of that source (the cursor the previous
    round reached): a service's /feedback/stream (as `cxrgen feedback import URL`), another store, or an NDJSON
    export (read whole: importing is idempotent, so what is stored already adds nothing)."""
    from training.feedback.db import safe_url
    from training.feedback.exchange import import_events, iter_export
    from training.feedback.store import open_store

    src = cfg.feedback
    if cfg.feedback_kind == "service":
        from training.feedback.command import import_url

        with open_loop_store(cfg) as store:
            res = import_url(store, src, after)
        return {"source": src, "events_read": res["events"], "source_cursor": res.get("stream_cursor")}
    if cfg.feedback_kind == "store":
        reached = [after]

        def lines(source):
            for line, cursor in iter_export(source, after):
                reached[0] = cursor
                yield line

        with open_store(src, cfg.feedback_blobs, upgrade=False) as source, open_loop_store(cfg) as store:
            n = import_events(store, lines(source), src)
        return {"source": safe_url(source.url), "events_read": n, "source_cursor": reached[0]}
    with open_loop_store(cfg) as store, open(src) as f:
        return {"source": src, "events_read": import_events(store, f, src)}


def feedback_step(cfg: LoopConfig, start: int, generated: dict | None, previous: dict | None) -> dict:
    """Step 2; the round's feedback is the store's events in (start, cursor_end]."""
    if cfg.feedback:
        info = import_feedback(cfg, (previous or {}).get("source_cursor") or 0)
    else:
        with open_loop_store(cfg) as store:
            info = panel_feedback(cfg, store, generated["folder"])
    with open_loop_store(cfg) as store:
        end, counts = store.cursor(), store.counts()
    return {**info, "cursor_start": start, "cursor_end": end, "new_events": end - start, "store_counts": counts}


# ----------------------------------------------------------------------------- 3. rewards


def _link(src: Path, dst: Path) -> None:
    """``dst`` -> ``src`` (a symlink; a copy where links are refused)."""
    if dst.is_symlink() or dst.is_file():
        dst.unlink()
    elif dst.is_dir():
        shutil.rmtree(dst)
    try:
        dst.symlink_to(src.resolve(), target_is_directory=True)
    except OSError:
        shutil.copytree(src, dst)


def rewards_step(cfg: LoopConfig, rnd: Round, fb: dict) -> dict:
    """Retrain the store-driven rewards into round-K/rewards/<kind>; link the others in from the reward dir.
    A store kind with nothing to learn from (real experts who never compared) keeps the previous round's."""
    from training.reward.base import read_manifest
    from training.reward.config import REWARD_NAMES, STORE_KINDS

    folder = rnd.dir / "rewards"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for kind in REWARD_NAMES:
        dst = folder / kind
        note = retrain(cfg, kind, dst) if kind in STORE_KINDS else "learns from simulated data"
        if note:
            src = _previous_reward(cfg, rnd, kind)
            if src is None and kind in STORE_KINDS:
                raise ValueError(f"round {rnd.k}: {kind}: {note} and no earlier {kind} reward to keep")
            if src is None:
                continue  # trained nowhere: alignment fails only if its weights ask for it
            _link(src, dst)
            note += f"; reused from {src}"
        m = read_manifest(dst)
        cursor = m.get("data", {}).get("store_cursor")
        out[kind] = {"folder": str(dst), "version": m["version"], "retrained": not note, "store_cursor": cursor,
                     "note": note or f"retrained on all of the store's feedback up to cursor {cursor}"}
    return {"rewards": out, "cursor_range": [fb["cursor_start"], fb["cursor_end"]]}


def retrain(cfg: LoopConfig, kind: str, dst: Path) -> str:
    """`cxrgen reward train --kind KIND` on the loop's store into ``dst``; "" or why it could not."""
    from training.reward.base import trainer
    from training.reward.config import RewardConfig

    rc = RewardConfig(kind=kind, out=str(dst), store=cfg.store_url, blobs=cfg.store_blobs or "",
                      data=cfg.weak_positives if kind == "plausibility" else "",
                      device="cpu" if cfg.device == "cpu" else "cuda", **{"seed": cfg.seed, **cfg.reward_overrides()})
    try:
        trainer(kind)(rc)
    except ValueError as e:  # nothing of this kind to learn from yet
        return f"not retrained ({e})"
    return ""


def _previous_reward(cfg: LoopConfig, rnd: Round, kind: str) -> Path | None:
    for k in range(rnd.k - 1, 0, -1):
        p = Round(Path(cfg.out), k).dir / "rewards" / kind
        if (p / "reward_manifest.json").is_file():
            return p
    p = cfg.reward_base / kind
    return p if (p / "reward_manifest.json").is_file() else None


# ----------------------------------------------------------------------------- 4. align, 5. evaluate


def version_of_round(cfg: LoopConfig, start_version: str, k: int) -> str:
    return f"{start_version}+{cfg.method}-loop{k}"


def align_step(cfg: LoopConfig, rnd: Round, model: str, start_version: str) -> dict:
    from training.model.checkpoint import Manifest

    from .run import align

    acfg = cfg.align_for(rnd.k, str(rnd.dir / "align"), model, str(rnd.dir / "rewards"),
                         version_of_round(cfg, start_version, rnd.k))
    ckpt = align(acfg, progress=False)
    m = Manifest.read(ckpt)
    return {"checkpoint": str(ckpt), "version": m.version, "method": m.stage, "parent": m.parent_version,
            "metrics": {k: v for k, v in m.metrics.items() if not isinstance(v, dict)},
            "feedback_cursor": m.config.get("feedback_cursor")}


def evaluate_step(cfg: LoopConfig, rnd: Round, model: str, candidate: str) -> dict:
    """Both models on the same held-out prompts, same seeds, same eyes (the round's rewards, panel, judge)."""
    from training.model.checkpoint import load_pipeline

    from . import heldout
    from .run import reward_function

    data, prompts_file = cfg.heldout_sources()
    held = heldout.HeldoutSet.load(data, cfg.eval_split, cfg.eval_limit, prompts_file)
    acfg = cfg.align_for(rnd.k, str(rnd.dir / "align"), model, str(rnd.dir / "rewards"), None)
    reward_fn, versions = reward_function(acfg)
    panel_path = str(cfg.panel_path) if cfg.panel_path.is_dir() else None
    panel, raters, judge = heldout.load_eyes(panel_path, cfg.judge, cfg.raters, cfg.device)
    out = {"heldout": {"data": data, "split": cfg.eval_split if data else None, "prompts_file": prompts_file,
                       "n": len(held)}, "rewards": versions, "reward_weights": acfg.weights,
           "panel": panel.version if panel else None, "judge": cfg.judge, "seed": cfg.seed}
    for name, path in (("current", model), ("candidate", candidate)):
        pipe, _ = load_pipeline(path, device=cfg.device)
        out[name] = heldout.probe(pipe, held, reward_fn, panel, raters, judge, cfg.seed, cfg.steps, cfg.guidance)
        del pipe
    return out


# ----------------------------------------------------------------------------- 6. gate, report, promotion


def lineage_of(folder: Path) -> list[dict]:
    """The checkpoint at ``folder`` and its ancestors, nearest first (``Manifest.ancestry``). A checkpoint written
    before manifests kept a lineage has it rebuilt from the parent checkpoints its config names (``align.model`` /
    ``finetune.model``; an align run without one started from the default model), as far as they are still on
    disk and are the parent its manifest names; beyond that, the last parent version on record."""
    from training.generation import DEFAULT_MODEL
    from training.model.checkpoint import Manifest

    chain, seen = [], set()
    m = Manifest.read(folder)
    while m is not None:
        if m.lineage:
            return chain + m.ancestry()
        chain.append(m.ancestry()[0])
        seen.add(Path(folder).resolve())
        if not m.parent_version:
            return chain
        cfg = m.config
        stage = cfg.get("align") if "align" in cfg else cfg.get("finetune")
        nxt = (stage or {}).get("model") or (DEFAULT_MODEL if "align" in cfg else None)
        parent = Manifest.read(Path(nxt)) if nxt and Path(nxt).is_dir() else None
        if parent is None or parent.version != m.parent_version or Path(nxt).resolve() in seen:
            return chain + [{"version": m.parent_version}]
        folder, m = Path(nxt), parent
    return chain


def promote(src: Path, dest: Path, version: str | None = None) -> dict:
    """``cxrgen promote``: make the checkpoint at ``src`` the model at ``dest`` (e.g. models/default), its manifest
    naming its parents back to the first model on record; ``version`` renames it (the manifest records the
    version it was promoted from). Checked before anything is written; the swap is ``promote_copy``'s."""
    from training.model.checkpoint import Manifest, validate_folder

    src, dest = Path(src), Path(dest)
    problems = validate_folder(src)
    m = Manifest.read(src) if not problems else None
    if problems or m is None:
        raise ValueError(f"{src} is not a cxrgen checkpoint: " + "; ".join(problems or ["no cxrgen_manifest.json"]))
    if dest.resolve() == src.resolve():
        raise ValueError(f"--to {dest} is the checkpoint itself")
    ancestry = lineage_of(src)
    new = Manifest(**{**m.__dict__, "lineage": ancestry[1:]})
    if version and version != m.version:
        new.version = version
        new.config = {**m.config, "promoted": {"from_version": m.version}}
    promote_copy(src, dest, new)
    return {"promoted": str(dest), "version": new.version, "from": str(src),
            "lineage": [a["version"] for a in ancestry[1:]]}


def promote_copy(src: Path, dest: Path, manifest=None) -> None:
    """Copy a checkpoint to ``dest``: into a temporary sibling, then renamed (the old one moved aside first).
    ``manifest`` (a ``Manifest``) replaces the copy's before the rename."""
    from training.model.checkpoint import Manifest

    old = Manifest.read(dest) if dest.is_dir() else None
    want = manifest if manifest is not None else Manifest.read(src)
    if old is not None and old.version == want.version and old.config == want.config:
        return  # a resumed round that had copied it already
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp, aside = dest.with_name(f".{dest.name}.tmp"), dest.with_name(f".{dest.name}.old")
    for p in (tmp, aside):
        shutil.rmtree(p, ignore_errors=True)
    shutil.copytree(src, tmp, symlinks=False)
    if manifest is not None:
        manifest.write(tmp)
    if dest.exists():
        os.replace(dest, aside)
    os.replace(tmp, dest)
    shutil.rmtree(aside, ignore_errors=True)


def finish_round(cfg: LoopConfig, out: Path, rnd: Round, begin: dict, steps: dict) -> dict:
    """The gate, the report, the promotion; marks the round done (every part idempotent on resume)."""
    ev, al = steps["evaluate"], steps["align"]
    decision = gate(ev["current"], ev["candidate"], cfg.target, cfg.min_gain, cfg.guards())
    report = build_report(cfg, rnd, begin, steps, decision)
    _write_json(rnd.dir / "report.json", report)
    (rnd.dir / "report.md").write_text(report_markdown(report))
    if decision["promote"]:
        if cfg.promote_to:
            promote_copy(Path(al["checkpoint"]), Path(cfg.promote_to))
        _write_json(out / "current.json", {"model": al["checkpoint"], "version": al["version"], "round": rnd.k})
    rnd.mark("done", {"decision": report["decision"]})
    return report


def build_report(cfg: LoopConfig, rnd: Round, begin: dict, steps: dict, decision: dict) -> dict:
    ev, al, fb = steps["evaluate"], steps["align"], steps["feedback"]
    metrics = sorted({k for side in ("current", "candidate") for k, v in ev[side].items() if not isinstance(v, dict)})
    return {
        "round": rnd.k, "decision": PROMOTED if decision["promote"] else KEPT, "reason": decision["reason"],
        "target": cfg.target, "min_gain": cfg.min_gain, "guards": cfg.guards(), "checks": decision["checks"],
        "current": {"model": begin["model"], "version": begin["version"]},
        "candidate": {"checkpoint": al["checkpoint"], "version": al["version"], "method": al["method"]},
        "next_round_starts_from": al["checkpoint"] if decision["promote"] else begin["model"],
        "metrics": {m: {"current": ev["current"].get(m), "candidate": ev["candidate"].get(m)} for m in metrics},
        "judge_auroc_per_finding": {s: ev[s]["judge_auroc"] for s in ("current", "candidate")
                                    if "judge_auroc" in ev[s]},
        "heldout": ev["heldout"], "eval_rewards": ev["rewards"], "reward_weights": ev["reward_weights"],
        "feedback": fb, "rewards": steps["rewards"]["rewards"],
        "rewards_note": _rewards_note(steps["rewards"]["rewards"], fb),
        "generated": steps.get("generate"), "align": al,
        "seconds": {k: v.get("seconds") for k, v in steps.items() if v},
    }


def _rewards_note(rewards: dict, fb: dict) -> str:
    retrained = [k for k, v in rewards.items() if v["retrained"]]
    if not retrained:
        return "no reward was retrained this round"
    return (f"{' and '.join(retrained)} trained on all of the store's feedback up to cursor {fb['cursor_end']}, "
            f"not only this round's (cursor {fb['cursor_start']} to {fb['cursor_end']}): the reward trainers read "
            "the whole store")


def report_markdown(r: dict) -> str:
    lines = [f"# Loop round {r['round']}: {r['decision']}", "", r["reason"] + ".", "",
             f"Current model {r['current']['version']} ({r['current']['model']}); candidate "
             f"{r['candidate']['version']} ({r['candidate']['checkpoint']}, {r['candidate']['method']}). "
             f"Held-out prompts: {r['heldout']['n']}.",
             "", "| check | metric | current | candidate | change | rule | result |", "|---|---|---|---|---|---|---|"]
    for c in r["checks"]:
        res = {True: "pass", False: "FAIL", None: "skipped"}[c["passed"]]
        ch = "n/a" if c["change"] is None else f"{c['change']:+.4f}"
        lines.append(f"| {c['role']} | {c['metric']} | {_f(c['current'])} | {_f(c['candidate'])} | {ch} | "
                     f"{c['rule']} | {res} |")
    lines += ["", "| metric | current | candidate |", "|---|---|---|"]
    lines += [f"| {m} | {_fmt(v['current'])} | {_fmt(v['candidate'])} |" for m, v in r["metrics"].items()]
    fb = r["feedback"]
    lines += ["", f"Feedback: {fb['source']}, store cursor {fb['cursor_start']} -> {fb['cursor_end']} "
                  f"({fb['new_events']} new events). {r['rewards_note']}.", ""]
    return "\n".join(lines)


def _fmt(v) -> str:
    return _f(_num(v)) if isinstance(v, float) or v is None else str(v)


# ----------------------------------------------------------------------------- the loop


def run_round(cfg: LoopConfig, out: Path, k: int, progress: bool = True) -> dict:
    """Round k from the current model (steps 1-6; each done step is skipped on resume)."""
    rnd = Round(out, k)
    prev_fb = Round(out, k - 1).result("feedback") if k > 1 else None
    begin = _read_json(rnd.dir / "round.json")
    if begin is None:  # the model it starts from and the cursor its feedback counts from, fixed at its start
        cur = _read_json(out / "current.json")
        if prev_fb is None:
            with open_loop_store(cfg) as store:
                start = store.cursor()
        else:
            start = prev_fb["cursor_end"]
        begin = {"round": k, "model": cur["model"], "version": cur["version"], "cursor_start": start}
        _write_json(rnd.dir / "round.json", begin)
    model, start_version = begin["model"], _read_json(out / "start.json")["version"]
    steps: dict = {}
    if not cfg.feedback:
        steps["generate"] = rnd.run("generate", lambda: generate_step(cfg, rnd, model), progress)
    steps["feedback"] = rnd.run("feedback", lambda: feedback_step(cfg, begin["cursor_start"],
                                                                  steps.get("generate"), prev_fb), progress)
    steps["rewards"] = rnd.run("rewards", lambda: rewards_step(cfg, rnd, steps["feedback"]), progress)
    steps["align"] = rnd.run("align", lambda: align_step(cfg, rnd, model, start_version), progress)
    steps["evaluate"] = rnd.run("evaluate", lambda: evaluate_step(cfg, rnd, model, steps["align"]["checkpoint"]),
                                progress)
    return finish_round(cfg, out, rnd, begin, steps)


def round_line(report: dict, cached: bool = False) -> dict:
    """The one JSON line a round prints."""
    target = next(c for c in report["checks"] if c["role"] == "target")
    line = {"round": report["round"], "decision": report["decision"], "target": report["target"],
            "before": target["current"], "after": target["candidate"], "reason": report["reason"],
            "model": report["next_round_starts_from"]}
    return {**line, "cached": True} if cached else line


def run_loop(cfg: LoopConfig, progress: bool = True) -> dict:
    """Run (or resume) ``cfg.rounds`` rounds; prints a JSON line per round; returns the summary."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    cfg.validate()
    # Not a warning quoting the cut-off words of every long report, from every pipeline call of every step.
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    check_resume(out, cfg)
    start_loop(out, cfg)
    reports = []
    for k in range(1, cfg.rounds + 1):
        rnd = Round(out, k)
        cached = rnd.finished
        report = rnd.report if cached else run_round(cfg, out, k, progress)
        reports.append(report)
        print(json.dumps(jsonable(round_line(report, cached))), flush=True)
    cur = _read_json(out / "current.json")
    summary = {"out": str(out), "rounds": cfg.rounds, "current": cur["model"], "version": cur["version"],
               "promoted": [r["round"] for r in reports if r["decision"] == PROMOTED],
               "kept": [r["round"] for r in reports if r["decision"] == KEPT]}
    print(json.dumps(summary), flush=True)
    return summary
