"""``cxrgen expert``: the simulated expert panel (issue 7, section 2).

  cxrgen expert train   --data runs/sim-panel --generated DIR --out models/panel
  cxrgen expert rate    --generated DIR [--store URL] [--seed S] [--panel models/panel] [--pairs]
  cxrgen expert report  [--store URL] [--data runs/sim-panel --split test --n N] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

DEFAULT_PANEL = Path(__file__).resolve().parent.parent.parent / "models" / "panel"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("expert", help="simulated expert panel: train it, rate generated images, report agreement",
                       description="Simulated radiologists who rate generated CXRs into the feedback store.")
    cmds = p.add_subparsers(dest="expert_command", metavar="SUBCOMMAND")
    _register_train(cmds)
    _register_rate(cmds)
    _register_report(cmds)
    p.set_defaults(func=lambda args: _need_subcommand(p))


def _need_subcommand(p: argparse.ArgumentParser) -> int:
    p.print_help()
    return 2


def _register_train(cmds) -> None:
    from .config import PanelConfig

    p = cmds.add_parser(
        "train", help="train the panel's reader CNN and realism critic; calibrate its checks",
        description=(
            "Train the panel on simulator ground truth (--data, from cxrgen simulate --seed 2; its train split "
            "fits, validate calibrates, test measures) and on generated images (--generated, a cxrgen generate "
            "folder: the critic's 'not real' class, with corrupted films). Writes OUT/panel.safetensors, "
            "OUT/panel.json (config, calibration, held-out metrics) and OUT/train_log.jsonl."))
    p.add_argument("--data", required=True, help="simulated MIMIC-layout data set (runs/sim-panel)")
    p.add_argument("--generated", required=True, help="folder of generated images (cxrgen generate --out)")
    p.add_argument("--out", default=str(DEFAULT_PANEL), help="panel folder (default: models/panel)")
    notes = _field_comments(PanelConfig)
    for f in dataclasses.fields(PanelConfig):
        if f.name == "anatomy_band":
            continue
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None, dest=f.name,
                       help=f"{notes.get(f.name, '')} (default {f.default})")
    p.set_defaults(func=run_train)


def _field_comments(cls) -> dict[str, str]:
    """{field: its trailing comment} from a config dataclass's source: one text for code and --help."""
    import inspect
    import re

    return {m.group(1): m.group(2).strip() for m in
            re.finditer(r"^\s+(\w+): [^=\n]+=[^#\n]+#(.*)$", inspect.getsource(cls), re.MULTILINE)}


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default=None, help="store URL (default: $CXRGEN_STORE, else sqlite:///feedback/store.db)")
    p.add_argument("--blobs", default=None, help="image folder of the store (default: next to the SQLite file)")
    p.add_argument("--panel", default=str(DEFAULT_PANEL), help="panel folder (default: models/panel)")
    p.add_argument("--seed", type=int, default=0, help="label-noise seed (default 0): same seed, same ratings")
    p.add_argument("--raters", default=None, help="comma-separated rater ids (default: the whole panel)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the panel's nets are small)")


def _register_rate(cmds) -> None:
    p = cmds.add_parser(
        "rate", help="ingest a generated folder into the store and write every rater's rating",
        description=(
            "Add every image of --generated (with its prompt, findings, seed, sampler settings and model version "
            "from generation.jsonl or the PNG provenance) to the feedback store as a generation, add the panel's "
            "raters, and write every rater's rating of every image; with --pairs also every rater's comparison "
            "of same-prompt pairs. --from-store rates the generations already in the store instead. "
            "Idempotent: re-running with the same seed writes nothing."))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--generated", help="folder of generated images (cxrgen generate --out)")
    src.add_argument("--from-store", action="store_true",
                     help="rate the generations already in the store (the service's, an import's) instead")
    p.add_argument("--after", type=int, default=0,
                   help="with --from-store: only generations that arrived after this store cursor (default 0)")
    _store_args(p)
    p.add_argument("--pairs", action="store_true", help="also compare same-prompt pairs")
    p.add_argument("--max-pairs", type=int, default=6, help="pairs per prompt at most (default 6)")
    p.set_defaults(func=run_rate)


def _register_report(cmds) -> None:
    p = cmds.add_parser(
        "report", help="plausibility of real and generated films, Fleiss' kappa, agreement",
        description=(
            "Rate --n real simulated films of --data (in memory, not stored) and read the panel's ratings and "
            "comparisons of generated films from the store; print plausibility rates (per model version), "
            "Fleiss' kappa, each rater's agreement with the majority, the comparisons' agreement (the ceiling "
            "of a Bradley-Terry model) and the share of each failed criterion; --out writes them as JSON."))
    _store_args(p)
    p.add_argument("--data", default=None, help="simulated data set for the real-film check (runs/sim-panel)")
    p.add_argument("--split", default="test", help="split of --data (default test)")
    p.add_argument("--n", type=int, default=200, help="real films to rate (default 200)")
    p.add_argument("--no-store", action="store_true", help="real films only; do not open the store")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.set_defaults(func=run_report)


# ----------------------------------------------------------------------------- runners


def _check_seed(seed: int) -> int:
    if seed < 0:
        raise ValueError(f"--seed must be an integer >= 0, got {seed}")
    return seed


def _raters(text: str | None):
    from .raters import select_raters

    return select_raters([s.strip() for s in text.split(",") if s.strip()] if text else None)


def run_train(args: argparse.Namespace) -> int:
    from .config import PanelConfig
    from .train import train_panel

    cfg = PanelConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PanelConfig)
                         if getattr(args, f.name, None) is not None})
    for name in ("data", "generated"):
        if not Path(getattr(args, name)).is_dir():
            raise FileNotFoundError(f"--{name} folder not found: {getattr(args, name)}")
    print("expert train config:", json.dumps(dataclasses.asdict(cfg)))
    panel = train_panel(args.data, args.generated, args.out, cfg)
    m = panel.meta["metrics"]
    keys = ("reader_mean_auroc", "laterality_accuracy", "severity_accuracy", "critic_auroc_real_vs_generated",
            "critic_auroc_real_vs_corrupted")
    print(json.dumps({"out": args.out, "version": panel.version, **{k: m.get(k) for k in keys},
                      "rotation_mae_deg": m["pose_mae"]["rotation_deg"]}))
    return 0


def _open(args):
    import torch

    from .panel import Panel

    _check_seed(args.seed)
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    raters = _raters(args.raters)
    panel = Panel.load(args.panel)
    return panel, raters


def run_rate(args: argparse.Namespace) -> int:
    from training.feedback.store import open_store

    from .rate import rate_folder, rate_store

    if args.max_pairs < 1:
        raise ValueError(f"--max-pairs must be >= 1, got {args.max_pairs}")
    if args.after < 0:
        raise ValueError(f"--after must be a store cursor >= 0, got {args.after}")
    if args.generated is not None and not Path(args.generated).is_dir():
        raise FileNotFoundError(f"--generated folder not found: {args.generated}")
    panel, raters = _open(args)
    with open_store(args.store, args.blobs) as store:
        if args.from_store:
            summary = rate_store(store, panel, raters, seed=args.seed, after=args.after, pairs=args.pairs,
                                 max_pairs=args.max_pairs)
        else:
            summary = rate_folder(store, panel, args.generated, raters, seed=args.seed, pairs=args.pairs,
                                  max_pairs=args.max_pairs)
    d = dataclasses.asdict(summary)
    d["generations"] = len(d["generations"])
    print(json.dumps(d))
    return 0


def run_report(args: argparse.Namespace) -> int:
    from .panel import _jsonable
    from .report import build_report

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.data is not None and not Path(args.data).is_dir():
        raise FileNotFoundError(f"--data folder not found: {args.data}")
    panel, raters = _open(args)
    if args.no_store:
        report = build_report(panel, raters, None, args.data, args.split, args.n, args.seed)
    else:
        from training.feedback.store import open_store

        with open_store(args.store, args.blobs) as store:
            report = build_report(panel, raters, store, args.data, args.split, args.n, args.seed)
    report = _jsonable(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(_headline(report), indent=2))
    return 0


def _headline(report: dict) -> dict:
    """The numbers worth a glance (the full report goes to --out)."""
    out: dict = {"panel_version": report["panel_version"]}
    real = report.get("real")
    if real:
        out["real"] = {k: real[k] for k in ("items", "plausible_rate_majority", "plausible_rate_ratings",
                                            "fleiss_kappa", "meets_target", "failed_share")}
    gen = report.get("generated")
    if gen:
        out["generated"] = {v: {k: s[k] for k in ("items", "plausible_rate_majority", "plausible_rate_ratings",
                                                  "fleiss_kappa")} for v, s in gen["by_model_version"].items()}
        out["comparisons"] = gen["comparisons"]
    return out
