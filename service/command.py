"""CLI commands of the service side: ``cxrgen import`` (a checkpoint into the BentoML model store) and
``cxrgen augment --url`` (a client for the augmentation batch endpoint). Registered through the
``cxrgen.commands`` entry points, so ``training.cli`` never imports this package."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path


def register_import(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="register a checkpoint in the BentoML model store (for the service)",
                       description="Copy a checkpoint folder (cxrgen train / align output, or a real SD / "
                                   "RoentGen folder) into the BentoML model store ($BENTOML_HOME/models) as "
                                   "NAME:<version>, with its manifest as metadata. The service serves the newest "
                                   "one when CXRGEN_MODEL is unset, or bento:TAG when named. Prints the tag.")
    p.add_argument("checkpoint", help="checkpoint folder")
    p.add_argument("--name", default="cxrgen-generator", help="model name in the store")
    p.set_defaults(func=run_import)


def run_import(args) -> int:
    from training.artifacts import jsonable
    from training.model.checkpoint import Manifest, validate_folder

    folder = Path(args.checkpoint)
    problems = validate_folder(folder)
    if problems:
        raise ValueError(f"{folder} is not a checkpoint: " + "; ".join(problems))
    import dataclasses

    import bentoml

    manifest = Manifest.read(folder)
    meta = jsonable(dataclasses.asdict(manifest)) if manifest else {"version": folder.name}
    meta = _no_nones(meta)
    with bentoml.models.create(args.name, metadata=meta, labels={"source": "cxrgen"}) as model:
        shutil.copytree(folder, model.path, dirs_exist_ok=True)
    stored = bentoml.models.get(model.tag)  # inside the block the model lives in a temporary folder
    print(json.dumps({"tag": str(stored.tag), "version": meta.get("version"), "path": str(stored.path)}))
    return 0


def _no_nones(x):
    """BentoML model metadata takes basic types only: drop None values, at any depth."""
    if isinstance(x, dict):
        return {str(k): _no_nones(v) for k, v in x.items() if v is not None}
    if isinstance(x, (list, tuple)):
        return [_no_nones(v) for v in x if v is not None]
    return x


def register_augment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("augment", help="request an augmentation batch from a running service and download it",
                       description="POST an augmentation batch to the service at --url, follow its progress, and "
                                   "write the result (a .tar.gz in MIMIC-CXR-JPG layout with manifest.json) to "
                                   "--out. The API key comes from $CXRGEN_API_KEY. Give --labels or --prompts-file.")
    p.add_argument("--url", required=True, help="service base URL, e.g. http://localhost:3000")
    p.add_argument("--count", type=int, required=True, help="images to deliver (1-10000)")
    p.add_argument("--labels", default=None,
                   help="label distribution: kind=weight,... e.g. pleural_effusion=1,no_finding=2")
    p.add_argument("--prompts-file", default=None, help="a text file, one prompt per line")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-plausibility", type=float, default=None, help="reject images scoring below (0-1)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--out", required=True, help="where to write the .tar.gz")
    p.add_argument("--poll", type=float, default=2.0, help="seconds between status checks")
    p.add_argument("--timeout", type=float, default=24 * 3600, help="give up after this many seconds")
    p.set_defaults(func=run_augment)


def parse_labels(text: str) -> dict[str, float]:
    out = {}
    for part in text.split(","):
        kind, _, w = part.partition("=")
        try:
            out[kind.strip()] = float(w) if w else 1.0
        except ValueError:
            raise ValueError(f"--labels: {part!r} is not kind=weight") from None
    return out


def run_augment(args) -> int:
    from training.remote import request

    if (args.labels is None) == (args.prompts_file is None):
        raise ValueError("give exactly one of --labels or --prompts-file")
    body = {"count": args.count, "seed": args.seed, "steps": args.steps}
    if args.size:
        body["size"] = args.size
    if args.min_plausibility is not None:
        body["min_plausibility"] = args.min_plausibility
    if args.labels:
        body["labels"] = parse_labels(args.labels)
    else:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts-file {path} does not exist")
        body["prompts"] = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    base = args.url.rstrip("/")
    with request("POST", f"{base}/augment", body) as r:
        task = json.load(r)["task_id"]
    print(json.dumps({"job": task}), file=sys.stderr)
    start = time.monotonic()
    while True:
        try:
            with request("GET", f"{base}/augment/{task}") as r:
                job = json.load(r)
        except ValueError as e:  # the task's row is written when it starts, a moment after the submit
            if "HTTP 404" not in str(e) or time.monotonic() - start > 60:
                raise
            time.sleep(min(args.poll, 1.0))
            continue
        print(f"\r{job['state']}: {job['done']}/{job['total']} accepted of {job['sampled']} sampled",
              end="", file=sys.stderr)
        if job["state"] == "failed":
            print(file=sys.stderr)
            raise ValueError(f"job {task} failed: {job['error']}")
        if job["state"] == "done":
            break
        if time.monotonic() - start > args.timeout:
            raise ValueError(f"job {task} not done after {args.timeout:.0f} s (still {job['state']})")
        time.sleep(args.poll)
    print(file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with request("GET", f"{base}{job['result_url']}") as r, open(out.with_suffix(".part"), "wb") as f:
        shutil.copyfileobj(r, f)
    os.replace(out.with_suffix(".part"), out)
    print(json.dumps({"job": task, "out": str(out), "accepted": job["done"], "sampled": job["sampled"],
                      "acceptance_rate": job["acceptance_rate"]}))
    return 0
