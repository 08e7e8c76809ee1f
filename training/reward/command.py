"""``cxrgen reward train | list`` and ``cxrgen score DIR`` (issue 7, sections 3-4).

Heavy imports (torch, the kinds) happen inside the command functions, so
``cxrgen --help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

KINDS_HELP = "plausibility, comparative, posture, diagnosis, consistency"


def _tuple_of_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def _field_comments(cls) -> dict[str, str]:
    """Each dataclass field's trailing comment in the source: the flags' help text (one source of truth)."""
    import inspect
    import re

    out, pending = {}, []
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=[^#]*(?:#\s*(.*))?$", line)
        c = re.match(r"\s+#\s*(.*)$", line)
        if m:
            out[m.group(1)] = " ".join(pending + ([m.group(2)] if m.group(2) else []))
            pending = []
        elif c and not c.group(1).startswith("---"):
            pending.append(c.group(1))
    return out


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per RewardConfig field (default None: the dataclass default applies)."""
    from .config import RewardConfig

    comments = _field_comments(RewardConfig)
    for f in dataclasses.fields(RewardConfig):
        if f.name == "kind":
            continue
        default = f.default
        kind = _tuple_of_ints if isinstance(default, tuple) else type(default)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else repr(default)
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None, dest=f.name,
                       help=f"{comments.get(f.name, '')} (default: {shown})".replace("%", "%%"))


def register_reward(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reward", help="train and list reward models",
                       description="Reward models (issue 7): train one kind, or list the trained ones.")
    rsub = p.add_subparsers(dest="reward_command", metavar="ACTION")
    t = rsub.add_parser(
        "train", help="train one reward model",
        description=(
            "Train reward KIND and write OUT/reward.safetensors, OUT/reward_manifest.json (kind, version, store "
            "cursor and URL, config, held-out metrics) and OUT/log.jsonl (default OUT: models/rewards/KIND). "
            "plausibility and comparative learn from the feedback store's ratings / comparisons (--store; "
            "plausibility also takes real images of --data as weak positives); posture, diagnosis and "
            "consistency learn from simulated data (--data, default runs/sim-reward: cxrgen simulate --seed 3)."),
)
    t.add_argument("--kind", required=True, help=KINDS_HELP)
    _add_config_flags(t)
    t.set_defaults(func=run_train)
    ls = rsub.add_parser("list", help="list trained rewards: version, store cursor, held-out metrics")
    ls.add_argument("--model-dir", default=None, help="folder of reward folders (default: models/rewards)")
    ls.set_defaults(func=run_list)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_train(args: argparse.Namespace) -> int:
    from .base import REWARD_NAMES, trainer
    from .config import RewardConfig

    if args.kind not in REWARD_NAMES:
        raise ValueError(f"unknown reward kind {args.kind!r}; known: {list(REWARD_NAMES)}")
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(RewardConfig)
             if f.name != "kind" and getattr(args, f.name, None) is not None}
    cfg = RewardConfig(kind=args.kind, **given)
    out = trainer(cfg.kind)(cfg)
    from .base import read_manifest

    manifest = read_manifest(out)
    print(json.dumps({"out": str(out), "version": manifest["version"], "data": manifest["data"],
                      "metrics": {k: v for k, v in manifest["metrics"].items() if not isinstance(v, dict)}}))
    return 0


def run_list(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .base import DEFAULT_MODEL_DIR, REWARD_NAMES, read_manifest

    root = Path(args.model_dir or DEFAULT_MODEL_DIR)
    for name in REWARD_NAMES:
        folder = root / name
        if not folder.is_dir():
            print(f"{name:<13} (not trained: {folder})")
            continue
        try:
            m = read_manifest(folder)
        except (FileNotFoundError, ValueError) as e:  # one broken / half-trained folder must not hide the rest
            print(f"{name:<13} (unusable: {e})")
            continue
        flat = {k: v for k, v in m.get("metrics", {}).items() if isinstance(v, (int, float)) and k.startswith("test")}
        print(f"{name:<13} {m.get('version')}  cursor {m.get('data', {}).get('store_cursor')}  {json.dumps(flat)}")
    return 0


def register_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score", help="score every image of a folder with the reward models",
        description=(
            "Score every PNG, JPEG and DICOM image directly in DIR with the reward models and write "
            "OUT/scores.csv (default DIR/scores.csv): a 'file' column, then one column per reward and "
            "'combined' (their weighted mean). Prompts and findings come from --prompt, else each image's "
            "provenance or DIR/generation.jsonl; prints a table."))
    p.add_argument("dir", help="folder of images")
    p.add_argument("--out", default=None, help="folder for scores.csv (default: DIR)")
    p.add_argument("--prompt", default=None, help="report text every image is scored against")
    p.add_argument("--rewards", default=None, help=f"comma-separated subset of: {KINDS_HELP} "
                                                    "(default: every reward trained under --model-dir)")
    p.add_argument("--model-dir", default=None, help="folder of reward folders (default: models/rewards)")
    p.add_argument("--batch-size", type=int, default=16, help="images read and scored at a time")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.set_defaults(func=run_score)


def run_score(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .base import available, cached_reward, parse_names
    from .folder import CSV_NAME, list_images, prompts_and_findings, score_files, table, write_csv

    names = parse_names(args.rewards) if args.rewards is not None else available(args.model_dir)
    files = list_images(args.dir)
    if not names:
        raise FileNotFoundError(f"no trained rewards under {args.model_dir or 'models/rewards'}; "
                                f"train them with `cxrgen reward train --kind K` or pass --model-dir")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    for name in names:  # every checkpoint loads (or fails with its error) before any image is read
        cached_reward(name, args.model_dir, args.device)
    prompts, findings, missing = prompts_and_findings(files, args.prompt)
    if missing:
        print(f"cxrgen score: warning: {missing} of {len(files)} images carry no prompt (no provenance, no "
              f"generation.jsonl row, no --prompt): scored as studies declared normal", file=sys.stderr)
    scores = score_files(files, prompts, findings, names, args.model_dir, args.device, args.batch_size)
    path = write_csv(Path(args.out or args.dir) / CSV_NAME, files, scores)
    print(table(files, scores))
    print(json.dumps({"scores": str(path), "images": len(files), "rewards": names}))
    return 0
