"""CLI commands of the service side: ``cxrgen import`` (a checkpoint into the BentoML model store) and
``cxrgen augment``: ``--url`` (a client for the augmentation batch endpoint), ``--local`` (the same batch,
or one shard of a bulk request, generated in this process: what each pod of the Kubernetes Indexed Job
runs) and ``--merge`` (the shards into one data set). Registered through the ``cxrgen.commands`` entry
points, so ``training.cli`` never imports this package."""

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
    p = sub.add_parser("augment", help="augmentation batches: from a running service, on this machine (sharded), "
                                       "or merge shards",
                       description="Three modes. --url URL: POST an augmentation batch (up to 10,000 images) to "
                                   "the service, follow its progress and write the result (a .tar.gz in "
                                   "MIMIC-CXR-JPG layout with manifest.json) to --out; the API key comes from "
                                   "$CXRGEN_API_KEY. --local: generate the batch in this process (no service) into "
                                   "the folder --out (MIMIC-CXR-JPG layout, manifest.json written last); with "
                                   "--shard I/N only the images of shard I of N (up to 10^8 images in all, one "
                                   "shard per GPU), each image a function of (seed, index) so shards are "
                                   "reproducible and disjoint; an interrupted run resumes. --merge PART...: combine "
                                   "the finished shard folders of one request into --out, checking that none is "
                                   "missing or given twice. --url and --local need --count and one of --labels or "
                                   "--prompts-file.")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--url", help="service base URL, e.g. http://localhost:3000")
    mode.add_argument("--local", action="store_true", help="generate here, without a service")
    mode.add_argument("--merge", nargs="+", metavar="PART", help="finished shard folders (cxrgen augment --local "
                                                                 "--shard) to combine into --out")
    p.add_argument("--count", type=int, default=None,
                   help="images to deliver: the whole request, across all shards (--url: 1-10000)")
    p.add_argument("--labels", default=None,
                   help="label distribution: kind=weight,... e.g. pleural_effusion=1,no_finding=2")
    p.add_argument("--prompts-file", default=None, help="a text file, one prompt per line")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-plausibility", type=float, default=None, help="reject images scoring below (0-1)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--out", required=True, help="--url: the .tar.gz to write; --local, --merge: the folder")
    p.add_argument("--poll", type=float, default=2.0, help="--url: seconds between status checks")
    p.add_argument("--timeout", type=float, default=24 * 3600, help="--url: give up after this many seconds")
    local = p.add_argument_group("--local")
    local.add_argument("--shard", default="0/1", metavar="I/N",
                       help="generate only shard I of N (0 <= I < N, e.g. $JOB_COMPLETION_INDEX/8); default 0/1")
    local.add_argument("--model", default=None, help="checkpoint or export folder (default models/default)")
    local.add_argument("--backend", default=None, help="torch, onnxruntime, tensorrt (as cxrgen generate)")
    local.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1")
    local.add_argument("--reward-dir", default=None, help="reward models that score each image (default "
                                                          "models/rewards)")
    local.add_argument("--no-score", action="store_true", help="no reward scores (not with --min-plausibility)")
    local.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale")
    local.add_argument("--scheduler", default="ddim", help="sampler (as cxrgen generate --scheduler)")
    local.add_argument("--batch-size", type=int, default=8, help="images per denoising batch")
    p.add_argument("--copy", action="store_true", help="--merge: copy the images instead of hard-linking them")
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


def request_body(args) -> dict:
    """The batch the flags ask for, as the service's AugmentRequest body (also the --local spec)."""
    if args.count is None:
        raise ValueError("--count is required with --url and --local")
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
    return body


def run_augment(args) -> int:
    if args.merge:
        return run_merge(args)
    if args.shard != "0/1" and not args.local:
        raise ValueError("--shard works with --local only (the service makes a whole batch)")
    body = request_body(args)
    return run_local(args, body) if args.local else run_remote(args, body)


def run_local(args, body: dict) -> int:
    """One shard (default: all) of the request, generated here into the folder --out."""
    from training.augment import LOCAL_MAX_COUNT, AugmentSpec, local_sampler, parse_shard, run, shard_range

    shard = parse_shard(args.shard)
    spec = AugmentSpec(guidance=args.guidance, scheduler=args.scheduler, **body).validate(LOCAL_MAX_COUNT)
    if shard[1] > spec.count:
        raise ValueError(f"--shard {args.shard}: more shards than images ({spec.count}); use N <= --count")
    if args.batch_size < 1 or args.steps < 1:
        raise ValueError("--batch-size and --steps must be >= 1")
    part = shard_range(spec.count, *shard)
    sample, version = local_sampler(spec, args.model, args.device, args.backend, args.reward_dir,
                                    score=not args.no_score, batch_size=args.batch_size)
    print(json.dumps({"shard": args.shard, "images": [part.start, part.stop], "model": version}), file=sys.stderr)
    manifest = run(spec, args.out, sample, chunk=args.batch_size, model_version=version, shard=shard,
                   max_count=LOCAL_MAX_COUNT,
                   progress=lambda done, sampled: print(f"\r{done}/{len(part)} accepted of {sampled} sampled",
                                                        end="", file=sys.stderr))
    print(file=sys.stderr)
    print(json.dumps({"out": args.out, "shard": manifest["shard"], "accepted": manifest["accepted"],
                      "sampled": manifest["sampled"], "acceptance_rate": manifest["acceptance_rate"],
                      "complete": manifest["complete"]}))
    return 0


def run_merge(args) -> int:
    from training.augment import merge

    m = merge(args.merge, args.out, copy=args.copy)
    print(json.dumps({"out": args.out, "parts": len(args.merge), "accepted": m["accepted"], "sampled": m["sampled"],
                      "acceptance_rate": m["acceptance_rate"], "complete": m["complete"]}))
    return 0


def run_remote(args, body: dict) -> int:
    from training.remote import request

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
