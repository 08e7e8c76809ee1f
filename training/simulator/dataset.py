"""Write a simulated data set in the MIMIC-CXR-JPG layout, resumably and on all cores.

Layout (the same one ``training.data.mimic`` reads for real MIMIC-CXR-JPG):
  files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg   8-bit JPEG, quality 95, as MIMIC-CXR-JPG
  files/pXX/pXXXXXXXX/sXXXXXXXX.txt              the study's report (MIMIC-CXR report format)
  mimic-cxr-2.0.0-{chexpert,metadata,split}.csv.gz
  ground_truth.jsonl                              every simulator parameter, one row per image
  simulate_config.json                            the settings, checked when a run resumes

Resume: an image counts as done when its JPEG exists and its ground-truth row was
appended (images are written atomically, then the row). A re-run renders only what
is missing; the CSVs are rebuilt from the ground truth at the end.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import textwrap
from pathlib import Path

import pandas as pd

from ..findings import OBSERVATIONS, labels
from .anatomy import load_anatomy
from .render import render_case
from .sampler import SampledCase, case_rng, sample_case

CONFIG_FILE = "simulate_config.json"
GT_FILE = "ground_truth.jsonl"
SPLITS = (("train", 0.8), ("validate", 0.1), ("test", 0.1))


@dataclasses.dataclass
class SimulateConfig:
    out: str  # output folder (created); an existing one is resumed
    n: int = 1000  # number of images (one frontal image per study, one study per patient)
    size: int = 256  # image side in pixels, 128-512
    seed: int = 0  # every image is a pure function of (seed, index)
    workers: int = 0  # processes; 0 = one per CPU core
    real_fraction: float = 0.5  # share of cases drawn from real IU reports (the rest balanced)
    jpeg_quality: int = 95  # MIMIC-CXR-JPG used quality 95

    def validate(self) -> None:
        if not 128 <= self.size <= 512:
            raise ValueError(f"--size must be between 128 and 512 pixels, got {self.size}")
        if self.n < 1:
            raise ValueError(f"--n must be at least 1, got {self.n}")
        if not 0.0 <= self.real_fraction <= 1.0:
            raise ValueError(f"--real-fraction must be in [0, 1], got {self.real_fraction}")
        if self.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {self.workers}")

    def content_key(self) -> dict:
        """Settings that change what an image looks like: a resumed run must match them."""
        return {"size": self.size, "seed": self.seed, "real_fraction": self.real_fraction,
                "jpeg_quality": self.jpeg_quality}


def ids(seed: int, index: int) -> tuple[int, int, str]:
    """MIMIC-style (subject_id, study_id, dicom_id), deterministic per (seed, index)."""
    h = case_rng(seed, index).getrandbits(160)
    dicom = "-".join(f"{(h >> (32 * i)) & 0xFFFFFFFF:08x}" for i in range(5))
    return 10_000_000 + index, 50_000_000 + index, dicom


def image_path(root: Path, subject: int, study: int, dicom: str) -> Path:
    return root / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg"


def split_of(seed: int, index: int) -> str:
    u = case_rng(seed + 7919, index).random()
    acc = 0.0
    for name, frac in SPLITS:
        acc += frac
        if u < acc:
            return name
    return SPLITS[-1][0]


def report_text(s: SampledCase) -> str:
    """The report in MIMIC-CXR's free-text format (upper-case section headers)."""
    exam = "CHEST (PA AND LAT)" if s.case.geometry.view == "PA" else "CHEST (PORTABLE AP)"
    parts = ["FINAL REPORT", f"EXAMINATION:  {exam}", f"INDICATION:  {s.indication or '___ with chest pain.'}",
             "COMPARISON:  None."]
    if s.findings_text:
        parts.append("FINDINGS:\n" + textwrap.fill(s.findings_text, 78))
    if s.impression_text:
        parts.append("IMPRESSION:\n" + textwrap.fill(s.impression_text, 78))
    return "\n \n".join(" " + p.replace("\n", "\n ") for p in parts) + "\n"


def render_one(task: tuple[str, int, int, int, float]) -> dict:
    """Render, write and describe image ``index`` (runs in a worker process)."""
    out, index, seed, size, real_fraction, quality = task
    from PIL import Image

    root = Path(out)
    s = sample_case(seed, index, real_fraction)
    img, truth = render_case(load_anatomy(), s.case, size)
    subject, study, dicom = ids(seed, index)
    path = image_path(root, subject, study, dicom)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.jpg")
    Image.fromarray((img * 255).round().byte().numpy(), mode="L").save(tmp, quality=quality)
    os.replace(tmp, path)
    path.parent.with_suffix(".txt").write_text(report_text(s))
    return {
        "index": index, "dicom_id": dicom, "subject_id": subject, "study_id": study, "seed": seed,
        "split": split_of(seed, index), "view": s.case.geometry.view, "size": size,
        "findings": truth, "labels": labels(s.case.findings),
        "pose": dataclasses.asdict(s.case.pose), "geometry": {**dataclasses.asdict(s.case.geometry),
                                                               "sid_mm": s.case.geometry.sid_mm},
        "imaging": dataclasses.asdict(s.case.imaging), "render_seed": s.case.seed,
        "report_source": s.report_source, "prompt": " ".join((s.impression_text + " " + s.findings_text).split()),
    }


def _render_twice(task):
    """One exam drawn again from (seed, index) and rendered as it was and without ``kinds`` (numpy, [0, 1])."""
    seed, index, real_fraction, kinds, size = task
    anat = load_anatomy()
    case = sample_case(seed, index, real_fraction).case
    return (render_case(anat, case, size)[0].numpy(),
            render_case(anat, case, size, without=frozenset(kinds))[0].numpy())


def render_again(root: Path, rows: list[dict], without: list[frozenset], size: int,
                 progress: bool = False, workers: int = 1):
    """Exams of the simulated folder ``root`` (``rows``: their ground_truth.jsonl objects) drawn again from
    their (seed, index) and rendered twice by the same code: as they were, and without the kinds ``without[i]``
    (every other random draw kept), in ``workers`` processes (the same images for any number). Returns (with,
    without), (N, 1, size, size) in [-1, 1]."""
    import torch
    from tqdm import tqdm

    cfg = Path(root) / CONFIG_FILE
    real_fraction = float(json.loads(cfg.read_text()).get("real_fraction", 0.5)) if cfg.is_file() else 0.5
    tasks = [(int(row["seed"]), int(row["index"]), real_fraction, sorted(kinds), size)
             for row, kinds in zip(rows, without)]
    plus, minus = [], []
    # One process: rendered here, leaving this process's torch threads alone (worker_map would set them to 1).
    results = map(_render_twice, tasks) if workers <= 1 else worker_map(_render_twice, tasks, workers)
    for a, b in tqdm(results, total=len(tasks), desc="render again", unit="exam", disable=not progress):
        plus.append(torch.from_numpy(a))
        minus.append(torch.from_numpy(b))
    as_batch = lambda xs: torch.stack(xs)[:, None] * 2 - 1  # noqa: E731
    return as_batch(plus), as_batch(minus)


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # one image per core beats threads inside small ops
    load_anatomy()


def worker_map(fn, tasks: list, workers: int, ordered: bool = True, chunksize: int = 4):
    """``fn`` over ``tasks`` in ``workers`` spawned processes (one thread each, anatomy loaded once), or in this
    process when ``workers`` is 1; yields results (in task order when ``ordered``). The pool ends with the loop."""
    if workers == 1:
        _worker_init()
        yield from map(fn, tasks)
        return
    pool = mp.get_context("spawn").Pool(workers, initializer=_worker_init)
    try:
        yield from (pool.imap if ordered else pool.imap_unordered)(fn, tasks, chunksize=chunksize)
    finally:
        pool.terminate()


def _check_config(root: Path, cfg: SimulateConfig) -> None:
    """Refuse to mix two data sets in one folder; remember the settings of a new one."""
    path = root / CONFIG_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); remove it or use another --out") from e
        for k, v in cfg.content_key().items():
            if old.get(k) != v:
                raise ValueError(f"{root} holds a data set made with {k}={old.get(k)!r}, not {v!r}; "
                                 "use another --out or the same settings")
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataclasses.asdict(cfg), indent=2))


def _load_done(root: Path) -> dict[int, dict]:
    """Ground-truth rows whose image exists; a torn last line (killed run) is ignored."""
    rows = {}
    path = root / GT_FILE
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if image_path(root, row["subject_id"], row["study_id"], row["dicom_id"]).is_file():
            rows[row["index"]] = row
    return rows


def _tables(rows: list[dict]) -> dict[str, pd.DataFrame]:
    chex = pd.DataFrame([{"subject_id": r["subject_id"], "study_id": r["study_id"],
                          **{o: r["labels"][o] for o in OBSERVATIONS}} for r in rows])
    meta = pd.DataFrame([{
        "dicom_id": r["dicom_id"], "subject_id": r["subject_id"], "study_id": r["study_id"],
        "PerformedProcedureStepDescription": "CHEST (PA AND LAT)" if r["view"] == "PA" else "CHEST (PORTABLE AP)",
        "ViewPosition": r["view"], "Rows": r["size"], "Columns": r["size"],
        "StudyDate": 21800101 + r["index"] % 28, "StudyTime": 120000.0 + r["index"] % 3600,
        "ProcedureCodeSequence_CodeMeaning": "CHEST (PA AND LAT)" if r["view"] == "PA" else "CHEST (PORTABLE AP)",
        "ViewCodeSequence_CodeMeaning": "postero-anterior" if r["view"] == "PA" else "antero-posterior",
        "PatientOrientationCodeSequence_CodeMeaning": "Erect" if r["view"] == "PA" else "Recumbent",
    } for r in rows])
    split = pd.DataFrame([{"dicom_id": r["dicom_id"], "study_id": r["study_id"],
                           "subject_id": r["subject_id"], "split": r["split"]} for r in rows])
    return {"chexpert": chex, "metadata": meta, "split": split}


def write_tables(root: Path, rows: list[dict]) -> None:
    for name, df in _tables(rows).items():
        path = root / f"mimic-cxr-2.0.0-{name}.csv.gz"
        tmp = path.with_name(path.name + ".tmp")
        df.to_csv(tmp, index=False, compression="gzip")
        os.replace(tmp, path)
    # Rewrite the sidecar in index order, without rows of images beyond n or torn lines.
    tmp = root / (GT_FILE + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, root / GT_FILE)


def simulate(cfg: SimulateConfig, progress: bool = True) -> dict:
    """Render what is missing of ``cfg.n`` images into ``cfg.out``; returns a summary."""
    from tqdm import tqdm

    cfg.validate()
    root = Path(cfg.out)
    _check_config(root, cfg)
    done = _load_done(root)
    todo = [i for i in range(cfg.n) if i not in done]
    tasks = [(str(root), i, cfg.seed, cfg.size, cfg.real_fraction, cfg.jpeg_quality) for i in todo]
    workers = min(cfg.workers or os.cpu_count() or 1, max(1, len(tasks)))
    bar = tqdm(total=len(tasks), desc="simulate", unit="img", disable=not progress)
    with open(root / GT_FILE, "a") as gt:
        try:
            for row in worker_map(render_one, tasks, workers, ordered=False):
                gt.write(json.dumps(row) + "\n")
                gt.flush()  # a killed run keeps every finished image
                done[row["index"]] = row
                bar.update()
        finally:
            bar.close()
    rows = [done[i] for i in range(cfg.n)]
    write_tables(root, rows)
    return {"out": str(root), "n": cfg.n, "rendered": len(tasks), "skipped": cfg.n - len(tasks)}
