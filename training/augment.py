"""Augmentation batches (issue 9; sharded, issue 11): many synthetic CXRs for a classifier, in MIMIC-CXR-JPG layout.

A batch is planned from a label distribution (finding kind -> weight, ``no_finding`` for normal
studies) or a list of prompts, with a seed. Every image is a function of (seed, global index g)
alone, like the simulator's cases: its prompt and findings come from a generator seeded by
(seed, g), and its attempt j is sampled from the seed ``seed + j * count + g`` (attempt 0: seed + g).
So the same request gives the same images however it is cut: a shard ``i/n`` makes exactly the
images of its index range, and the shards of a request merged (``merge``) equal the request made at
once (tested; the images to floating-point rounding: a shard runs the network at other batch sizes, and
a kernel chosen by shape may round differently). With a minimum plausibility score, an image whose attempt scores below it is redrawn
(its next attempt, up to ``MAX_ATTEMPTS_FACTOR`` attempts), so the label mix stays the planned one;
an image that never passes is listed as ``rejected`` and the acceptance rate is reported.

The output folder is what ``cxrgen simulate`` writes and ``training.data.mimic.MimicCXRDataset``
reads (images, reports, the three CSV tables, ``ground_truth.jsonl``), plus ``manifest.json``
(written last: a folder without it is unfinished). ``progress.jsonl`` journals finished images
while a run goes on, so a run that is cut short (a pre-empted pod) resumes where it stopped.
``pack`` makes the ``.tar.gz`` the service hands out.

The service runs this as a BentoML task; ``cxrgen augment --local`` runs the same ``run`` on this
machine, one shard per GPU pod of a Kubernetes Indexed Job (k8s/bulk-augment).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import tarfile
import textwrap
from pathlib import Path
from typing import Callable

NO_FINDING = "no_finding"
MAX_ATTEMPTS_FACTOR = 10  # rejection sampling draws an image at most this many times
SERVICE_MAX_COUNT = 10_000  # one batch through the service (its request budget)
LOCAL_MAX_COUNT = 100_000_000  # one bulk request run by shards on this machine or a cluster
MANIFEST = "manifest.json"
JOURNAL = "progress.jsonl"  # header line, then one line per finished image; removed when the run completes


@dataclasses.dataclass
class AugmentSpec:
    """One augmentation batch; every field is checked by ``validate``."""

    count: int  # images to deliver (1-10,000 through the service; up to 10^8 with --local shards)
    seed: int = 0  # image g: prompt from a generator seeded (seed, g); attempt j sampled with seed + j * count + g
    labels: dict[str, float] | None = None  # finding kind (or "no_finding") -> weight; normalised
    prompts: list[str] | None = None  # or: cycle through these prompts (findings read from the text)
    min_plausibility: float | None = None  # reject images whose plausibility score is below this
    steps: int = 25  # sampling steps
    guidance: float = 4.0  # classifier-free guidance scale
    scheduler: str = "ddim"  # sampler name (training.generation.SCHEDULERS)
    size: int | None = None  # image side (None: the model's)

    def validate(self, max_count: int = SERVICE_MAX_COUNT) -> "AugmentSpec":
        from .findings import KINDS

        if not 1 <= self.count <= max_count:
            raise ValueError(f"count must be in [1, {max_count}], got {self.count}")
        if (self.labels is None) == (self.prompts is None):
            raise ValueError("give exactly one of labels (a label distribution) or prompts (a prompt list)")
        if self.labels is not None:
            unknown = sorted(set(self.labels) - set(KINDS) - {NO_FINDING})
            if unknown:
                raise ValueError(f"labels: unknown finding kind(s) {unknown}; known: {sorted(KINDS) + [NO_FINDING]}")
            if any(w < 0 for w in self.labels.values()) or sum(self.labels.values()) <= 0:
                raise ValueError("labels: weights must be >= 0 with a positive sum")
        if self.prompts is not None and not [p for p in self.prompts if p.strip()]:
            raise ValueError("prompts: give at least one non-empty prompt")
        if self.min_plausibility is not None and not 0 <= self.min_plausibility <= 1:
            raise ValueError(f"min_plausibility must be in [0, 1], got {self.min_plausibility}")
        return self


# ----------------------------------------------------------------------------- shards


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> (i, n): shard i of n, numbered from 0 (as Kubernetes' JOB_COMPLETION_INDEX is)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m:
        raise ValueError(f"--shard {text!r}: expected I/N, e.g. 0/8 (shard I of N, 0 <= I < N)")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1:
        raise ValueError(f"--shard {text}: N must be >= 1")
    if i >= n:
        raise ValueError(f"--shard {text}: I must be in [0, {n - 1}] (shards are numbered from 0)")
    return i, n


def shard_range(count: int, index: int, n: int) -> range:
    """The global image indices of shard ``index`` of ``n``: contiguous, disjoint, covering [0, count)."""
    if not (1 <= n <= count and 0 <= index < n):
        raise ValueError(f"shard {index}/{n} of {count} images: need 0 <= I < N <= count")
    return range(count * index // n, count * (index + 1) // n)


def image_rng(seed: int, index: int) -> random.Random:
    """The generator of image ``index``'s prompt, a function of (seed, index) only (cf. the simulator's)."""
    digest = hashlib.sha256(f"cxrgen-augment:{seed}:{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def attempt_seed(spec: AugmentSpec, index: int, attempt: int) -> int:
    """Sampling seed of attempt ``attempt`` of image ``index``: distinct for every (index, attempt) pair."""
    return spec.seed + attempt * spec.count + index


def plan(spec: AugmentSpec, indices) -> list[tuple[str, list]]:
    """(prompt, findings) of each global image index, deterministic in (``spec.seed``, index)."""
    from .data.reports import findings_from_text
    from .generation import findings_prompt
    from .simulator.sheet import variant

    if spec.prompts is not None:
        prompts = [p.strip() for p in spec.prompts if p.strip()]
        return [(prompts[g % len(prompts)], findings_from_text(prompts[g % len(prompts)])) for g in indices]
    kinds = sorted(spec.labels)
    weights = [spec.labels[k] for k in kinds]
    out = []
    for g in indices:
        rng = image_rng(spec.seed, g)
        kind = rng.choices(kinds, weights)[0]
        found = [] if kind == NO_FINDING else list(variant(kind, rng.randrange(12)))
        out.append((findings_prompt(found, spec.seed + g), found))
    return out


def report(prompt: str, view: str = "PA") -> str:
    """A MIMIC-style report whose impression is the prompt (the loader's default prompt section)."""
    exam = "CHEST (PA AND LAT)" if view == "PA" else "CHEST (PORTABLE AP)"
    parts = ["FINAL REPORT", f"EXAMINATION:  {exam}", "INDICATION:  Synthetic image (cxrgen augment).",
             "IMPRESSION:\n" + textwrap.fill(prompt, 78)]
    return "\n \n".join(" " + p.replace("\n", "\n ") for p in parts) + "\n"


def write_image(root: Path, index: int, seed: int, image, prompt: str, findings: list, scores: dict) -> dict:
    """Write image ``index`` (a (H, W) array in [0, 1]) and its report; return its ground-truth row."""
    from PIL import Image

    from .findings import labels
    from .simulator.dataset import ids, image_path

    subject, study, dicom = ids(seed, index)
    path = image_path(root, subject, study, dicom)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.jpg")
    Image.fromarray((image * 255).round().clip(0, 255).astype("uint8"), mode="L").save(tmp, quality=95)
    os.replace(tmp, path)
    path.parent.with_suffix(".txt").write_text(report(prompt))
    size = int(image.shape[-1])
    return {"index": index, "dicom_id": dicom, "subject_id": subject, "study_id": study, "seed": seed,
            "split": "train", "view": "PA", "size": size, "findings": [f.to_dict() for f in findings],
            "labels": labels(findings), "prompt": prompt, "scores": scores, "synthetic": True}


def run(spec: AugmentSpec, out: str | Path, sample: Callable, progress: Callable[[int, int], None] | None = None,
        chunk: int = 8, model_version: str = "", shard: tuple[int, int] = (0, 1),
        max_count: int = SERVICE_MAX_COUNT) -> dict:
    """Generate the images of shard ``shard`` (i, n) of the request into ``out``; returns the manifest (also
    written, last). The default shard (0, 1) is the whole request.

    ``sample(prompts, findings, seeds) -> (images (N, H, W) in [0, 1], scores [dict per image])`` does
    the sampling (the service passes its batcher, so jobs share the GPU with online requests; ``--local``
    passes a pipeline of this process); ``progress(accepted, sampled)`` is called after every chunk. A
    folder left by an interrupted run of the same request and shard is resumed; a finished one is returned.
    """
    # 1. The request, this shard's share of it, and what an earlier run of it finished already.
    spec.validate(max_count)
    part = shard_range(spec.count, *shard)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    header = {"spec": dataclasses.asdict(spec), "shard": _shard_info(part, *shard)}
    finished = _finished_manifest(root, header)
    if finished is not None:
        return finished
    done = _resume(root, header)  # index -> (attempts, row or None when every attempt was rejected)
    todo = [g for g in part if g not in done]
    planned = dict(zip(todo, plan(spec, todo)))
    # 2. Sample: a chunk of (image, attempt) pairs at a time; a rejected attempt goes to the back of the queue.
    queue = collections.deque((g, 0) for g in todo)
    sampled = sum(a for a, _ in done.values())
    with open(root / JOURNAL, "a") as journal:
        while queue:
            batch = [queue.popleft() for _ in range(min(chunk, len(queue)))]
            seeds = [attempt_seed(spec, g, j) for g, j in batch]
            images, scores = sample([planned[g][0] for g, _ in batch],
                                    [[f.to_dict() for f in planned[g][1]] for g, _ in batch], seeds)
            for (g, j), seed, img, sc in zip(batch, seeds, images, scores):
                if spec.min_plausibility is None or sc.get("plausibility", 0.0) >= spec.min_plausibility:
                    prompt, found = planned[g]
                    done[g] = (j + 1, write_image(root, g, seed, img, prompt, list(found), sc))
                elif j + 1 < MAX_ATTEMPTS_FACTOR:
                    queue.append((g, j + 1))
                    continue
                else:
                    done[g] = (j + 1, None)
                journal.write(json.dumps({"index": g, "attempts": done[g][0], "row": done[g][1]}) + "\n")
            journal.flush()
            os.fsync(journal.fileno())  # the JPEGs are written before the line that says they exist
            sampled += len(batch)
            if progress:
                progress(sum(r is not None for _, r in done.values()), sampled)
    # 3. The tables, then the manifest (last: it marks the folder finished), then the journal goes.
    rows = [done[g][1] for g in part if done[g][1] is not None]
    if part and not rows:
        raise RuntimeError(f"no image reached min_plausibility {spec.min_plausibility} in {sampled} draws")
    manifest = _manifest(spec, model_version, header["shard"], rows,
                         sampled=sum(a for a, _ in done.values()),
                         rejected=[g for g in part if done[g][1] is None])
    _write_result(root, rows, manifest)
    (root / JOURNAL).unlink(missing_ok=True)
    return manifest


def _shard_info(part: range, index: int, n: int) -> dict:
    return {"index": index, "count": n, "start": part.start, "end": part.stop}


def _manifest(spec: AugmentSpec | dict, model_version: str, shard: dict, rows: list[dict], sampled: int,
              rejected: list[int]) -> dict:
    requested = shard["end"] - shard["start"]
    return {"spec": spec if isinstance(spec, dict) else dataclasses.asdict(spec), "model_version": model_version,
            "shard": shard, "requested": requested, "accepted": len(rows), "sampled": sampled,
            "acceptance_rate": round(len(rows) / sampled, 4) if sampled else 0.0,
            "complete": len(rows) == requested, "rejected": rejected,
            "images": [{"index": r["index"], "dicom_id": r["dicom_id"], "prompt": r["prompt"], "seed": r["seed"],
                        "findings": r["findings"], "scores": r["scores"]} for r in rows]}


def _write_result(root: Path, rows: list[dict], manifest: dict) -> None:
    from .simulator.dataset import write_tables

    write_tables(root, rows)
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, root / MANIFEST)


def _finished_manifest(root: Path, header: dict) -> dict | None:
    """The manifest of a finished run of the same request and shard; an error for another request's folder."""
    f = root / MANIFEST
    if not f.is_file():
        return None
    m = json.loads(f.read_text())
    if m.get("spec") != header["spec"] or m.get("shard") != header["shard"]:
        raise ValueError(f"{root} holds another request or shard (its {MANIFEST} differs); use a new --out")
    return m


def _resume(root: Path, header: dict) -> dict[int, tuple[int, dict | None]]:
    """Images an interrupted run of the same request and shard finished (its journal); starts a new journal
    when there is none. A torn last line (the run died while writing it) is ignored: that chunk is redone."""
    f = root / JOURNAL
    if not f.is_file() or f.stat().st_size == 0:
        f.write_text(json.dumps({"header": header}) + "\n")
        return {}
    lines = f.read_text().splitlines()
    try:
        first = json.loads(lines[0])["header"]
    except (ValueError, KeyError, TypeError):
        first = None
    if first != header:
        raise ValueError(f"{root} holds another request or shard ({JOURNAL} differs); use a new --out")
    done: dict[int, tuple[int, dict | None]] = {}
    for line in lines[1:]:
        try:
            e = json.loads(line)
        except ValueError:
            break
        done[int(e["index"])] = (int(e["attempts"]), e["row"])
    with open(f, "w") as out:  # rewrite without a torn tail, so appends start on a line of their own
        out.write("".join(json.dumps(x) + "\n" for x in
                          [{"header": header}, *({"index": g, "attempts": a, "row": r} for g, (a, r) in done.items())]))
    return done


# ----------------------------------------------------------------------------- merging shards


def merge(parts: list[str | Path], out: str | Path, copy: bool = False) -> dict:
    """Combine the finished shards of one request into ``out`` (MIMIC-CXR-JPG layout + manifest), equal to
    the request made unsharded. Checks first, writes nothing on failure: every part has its manifest (the
    shard finished), all belong to the same request and model, and shards 0..N-1 each appear exactly once.
    Image files are hard-linked (copied across file systems, or with ``copy``)."""
    # 1. Read and check the parts.
    parts = [Path(p) for p in parts]
    manifests = []
    for p in parts:
        if not (p / MANIFEST).is_file():
            raise ValueError(f"{p}: no {MANIFEST}: that shard did not finish (or it is not a cxrgen augment folder)")
        manifests.append(json.loads((p / MANIFEST).read_text()))
    _check_parts(parts, manifests)
    out = Path(out)
    if (out / MANIFEST).exists() or (out / "files").exists():
        raise ValueError(f"{out} holds a data set already; merge into a new folder")
    # 2. Link every image and report, refusing any path two parts share (a duplicated image).
    out.mkdir(parents=True, exist_ok=True)
    for p in parts:
        for folder, _, names in os.walk(p / "files"):  # streamed: a million-image part is millions of paths
            rel = Path(folder).relative_to(p)
            (out / rel).mkdir(parents=True, exist_ok=True)
            for name in names:
                if (out / rel / name).exists():
                    raise ValueError(f"{rel / name} is in more than one part: a duplicated image")
                _link_or_copy(Path(folder) / name, out / rel / name, copy)
    # 3. The tables and the manifest, in global index order.
    from .simulator.dataset import GT_FILE

    order = sorted(range(len(parts)), key=lambda k: manifests[k]["shard"]["index"])
    rows = [json.loads(line) for k in order for line in (parts[k] / GT_FILE).read_text().splitlines() if line]
    first = manifests[order[0]]
    shard = _shard_info(range(0, first["spec"]["count"]), 0, 1)
    manifest = _manifest(first["spec"], first["model_version"], shard, rows,
                         sampled=sum(m["sampled"] for m in manifests),
                         rejected=sorted(g for m in manifests for g in m["rejected"]))
    manifest["merged_from"] = {"parts": len(parts), "shards": first["shard"]["count"]}
    _write_result(out, rows, manifest)
    return manifest


def _check_parts(parts: list[Path], manifests: list[dict]) -> None:
    first = manifests[0]
    for p, m in zip(parts, manifests):
        if m["spec"] != first["spec"]:
            raise ValueError(f"{p} belongs to another request than {parts[0]} (their specs differ)")
        if m["model_version"] != first["model_version"]:
            raise ValueError(f"{p} was made by model {m['model_version']!r}, {parts[0]} by {first['model_version']!r}")
        if m["shard"]["count"] != first["shard"]["count"]:
            raise ValueError(f"{p} is a shard of {m['shard']['count']}, {parts[0]} of {first['shard']['count']}")
    n, count = first["shard"]["count"], first["spec"]["count"]
    seen = collections.Counter(m["shard"]["index"] for m in manifests)
    twice = sorted(i for i, c in seen.items() if c > 1)
    missing = sorted(set(range(n)) - set(seen))
    if twice or missing:
        raise ValueError(f"shards of {n}: " + "; ".join(
            x for x in (f"missing {missing}" if missing else "", f"given more than once {twice}" if twice else "") if x))
    for p, m in zip(parts, manifests):
        expect = shard_range(count, m["shard"]["index"], n)
        got = [im["index"] for im in m["images"]] + m["rejected"]
        if (m["shard"]["start"], m["shard"]["end"]) != (expect.start, expect.stop) or sorted(got) != list(expect):
            raise ValueError(f"{p}: its images do not cover shard {m['shard']['index']}/{n} "
                             f"(indices {expect.start}-{expect.stop - 1}) exactly once")


def _link_or_copy(src: Path, dst: Path, copy: bool) -> None:
    if not copy:
        try:
            os.link(src, dst)
            return
        except OSError:  # another file system, or links not allowed: copy
            pass
    shutil.copy2(src, dst)


# ----------------------------------------------------------------------------- sampling on this machine


def local_sampler(spec: AugmentSpec, model: str | Path | None = None, device: str = "cpu", backend: str | None = None,
                  reward_dir: str | None = None, score: bool = True, batch_size: int = 8) -> tuple[Callable, str]:
    """(``sample`` for ``run``, model version): the generator of ``cxrgen generate`` (``load_backend``: the
    torch pipeline, or an exported model's onnxruntime / TensorRT backend) and its scores, in this process."""
    import numpy as np
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from .generation import DEFAULT_MODEL, is_export_folder, load_backend

    # A bulk job's log is not a terminal, and must not quote prompts (diffusers' over-long prompt warning does).
    for lib in (diffusers_logging, transformers_logging):
        lib.disable_progress_bar()
        lib.set_verbosity_error()
    model = Path(model) if model else DEFAULT_MODEL
    if not model.exists():
        raise FileNotFoundError(f"no model at {model}; pass --model PATH (a checkpoint or export folder)")
    if spec.min_plausibility is not None and not score:
        raise ValueError("--min-plausibility needs the scores: drop --no-score")
    scorer = None
    if score and (not is_export_folder(model) or reward_dir):  # the rewards first: a missing one fails early
        from .reward.base import generation_scorer

        scorer = generation_scorer(reward_dir, device)
    be = load_backend(backend, model, device)
    if score and scorer is None:
        scorer = be.scorer()
        if scorer is None:
            raise ValueError(f"{model} has no reward graphs: pass --reward-dir or --no-score")
    be.set_scheduler(spec.scheduler)
    size = spec.size or be.native_size

    def sample(prompts: list[str], findings: list[list[dict]], seeds: list[int]):
        # A backend draws image i of a call from seed + i: one call per run of consecutive seeds
        # (a whole chunk unless rejected images are being redrawn).
        images, start = [], 0
        for stop in range(1, len(seeds) + 1):
            if stop == len(seeds) or seeds[stop] != seeds[stop - 1] + 1:
                images.append(be.generate(prompts[start:stop], seeds[start], spec.steps, spec.guidance, "",
                                          batch_size, size))
                start = stop
        images = np.concatenate(images)
        return images, (scorer(images, prompts, findings) if scorer else [{} for _ in prompts])

    return sample, be.version


def pack(folder: str | Path, archive: str | Path) -> Path:
    """``folder`` as a .tar.gz whose top-level entry is the folder's name; written atomically."""
    folder, archive = Path(folder), Path(archive)
    tmp = archive.with_name(archive.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    os.replace(tmp, archive)
    return archive


def unpack(archive: str | Path, dest: str | Path) -> Path:
    """Extract an archive made by ``pack`` (safely: no absolute paths or ``..``); returns the data root."""
    dest = Path(dest)
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(dest, filter="data")
        top = {Path(m.name).parts[0] for m in tar.getmembers()}
    if len(top) != 1:
        raise ValueError(f"{archive}: expected one top-level folder, found {sorted(top)}")
    return dest / top.pop()

