"""Where a finding lies on a simulated film: its footprint, from rendering the exam with and without it.

The simulator draws a finding in the CT, so its place on the film is known only after projection (pose, elastic
warp, blur). ``finding_masks`` renders each exam of a simulated folder again, as it was and without each wanted
kind (``render_case(..., without=...)``: every other random draw kept), and keeps the pixels the kind brightened
by at least ``rel`` of its peak. Lesions are denser than the lung around them, so they brighten the film.

File ``<data>/finding_masks.npz`` (``MASKS_FILE``): ``dicom_id`` (N,), ``masks`` (N, grid, grid) uint8 with bit
``i`` set where ``kinds[i]`` lies (max-pooled from the film's side to ``grid``), ``kinds``, ``grid``, ``rel``,
``size``. Exams showing none of the kinds are not stored: their masks are empty by construction. The evaluation
judge's spot head learns from these masks (``JudgeConfig.spot_kinds``); they are the simulator's ground truth,
not any model's output.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

MASKS_FILE = "finding_masks.npz"
LESION_KINDS: tuple[str, ...] = ("calcified_granuloma", "nodule", "mass")


def _footprint(task: tuple) -> tuple[str, np.ndarray]:
    """(dicom_id, (grid, grid) uint8 bit mask) of one exam (runs in a worker process)."""
    import torch
    import torch.nn.functional as F

    from .anatomy import load_anatomy
    from .render import render_case
    from .sampler import sample_case

    row, kinds, size, grid, rel, real_fraction = task
    anat = load_anatomy()
    case = sample_case(int(row["seed"]), int(row["index"]), real_fraction).case
    full = render_case(anat, case, size)[0]
    out = torch.zeros(grid, grid, dtype=torch.uint8)
    present = {f["kind"] for f in row["findings"]}
    for bit, kind in enumerate(kinds):
        if kind not in present:
            continue
        d = (full - render_case(anat, case, size, without=frozenset([kind]))[0]).clamp(min=0)
        if float(d.max()) <= 0:
            continue  # drawn outside the field of view or hidden: nothing on the film
        m = (d > rel * d.max()).float()[None, None]
        m = F.adaptive_max_pool2d(m, grid)[0, 0] > 0
        out |= m.to(torch.uint8) << bit
    return row["dicom_id"], out.numpy()


def finding_masks(root: str | Path, kinds: tuple[str, ...] = LESION_KINDS, grid: int = 64, rel: float = 0.3,
                  workers: int = 0, progress: bool = True) -> Path:
    """Write ``root/MASKS_FILE`` for every exam of the simulated folder ``root`` that shows one of ``kinds``."""
    from tqdm import tqdm

    from ..findings import KINDS
    from .dataset import CONFIG_FILE, GT_FILE, worker_map

    root = Path(root)
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if not kinds or unknown:
        raise ValueError(f"mask kinds must be simulator kinds {sorted(KINDS)}; got {list(kinds) or 'none'}")
    if len(kinds) > 8:
        raise ValueError(f"at most 8 mask kinds fit the uint8 bit mask, got {len(kinds)}")
    if not 0 < rel < 1:
        raise ValueError(f"rel must be in (0, 1), got {rel}")
    cfg_path, gt_path = root / CONFIG_FILE, root / GT_FILE
    if not cfg_path.is_file() or not gt_path.is_file():
        raise FileNotFoundError(f"{root} is not a simulated data set (no {CONFIG_FILE} / {GT_FILE})")
    cfg = json.loads(cfg_path.read_text())
    size = int(cfg["size"])
    if not 1 <= grid <= size or size % grid:
        raise ValueError(f"grid must divide the films' side {size}, got {grid}")
    rows = [json.loads(line) for line in gt_path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if any(f["kind"] in kinds for f in r["findings"])]
    tasks = [(r, kinds, size, grid, rel, float(cfg.get("real_fraction", 0.5))) for r in rows]
    workers = min(workers or os.cpu_count() or 1, max(1, len(tasks)))
    ids, masks = [], []
    bar = tqdm(total=len(tasks), desc="finding masks", unit="exam", disable=not progress)
    try:
        for dicom, m in worker_map(_footprint, tasks, workers, ordered=True, chunksize=8):
            ids.append(dicom)
            masks.append(m)
            bar.update()
    finally:
        bar.close()
    out = root / MASKS_FILE
    tmp = out.with_name(out.stem + ".tmp.npz")
    np.savez_compressed(tmp, dicom_id=np.array(ids, dtype=str),
                        masks=np.stack(masks) if masks else np.zeros((0, grid, grid), np.uint8),
                        kinds=np.array(kinds, dtype=str), grid=grid, rel=rel, size=size)
    os.replace(tmp, out)
    return out


def load_masks(path: str | Path, kinds: tuple[str, ...] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """({dicom_id: (grid, grid) bool union of ``kinds``}, facts) from a ``finding_masks`` file.

    ``kinds`` None: all the file's kinds. A kind the file lacks is a ValueError naming it.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MASKS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no finding masks; make them with `cxrgen simulate --out DATA ... "
                                f"--finding-masks KINDS` (the data set's own settings)")
    with np.load(path) as z:
        have = [str(k) for k in z["kinds"]]
        want = list(kinds) if kinds else have
        missing = [k for k in want if k not in have]
        if missing:
            raise ValueError(f"{path} holds masks of {have}, not of {missing}")
        bits = sum(1 << have.index(k) for k in want)
        masks = (z["masks"] & bits) > 0
        facts = {"kinds": want, "grid": int(z["grid"]), "rel": float(z["rel"]), "size": int(z["size"])}
        return dict(zip((str(d) for d in z["dicom_id"]), masks)), facts


def grid_masks(data: str | Path, dicom_ids: list[str], kinds: tuple[str, ...], grid: tuple[int, int]):
    """(N, K, h, w) bool torch tensor: the cells of a ``grid`` (a latent grid) each kind's finding mask touches
    on each film (max-pooled from the masks' own grid); all False for a film without that kind."""
    import torch
    import torch.nn.functional as F

    out = torch.zeros(len(dicom_ids), len(kinds), *grid, dtype=torch.bool)
    for k, kind in enumerate(kinds):
        table, _ = load_masks(data, (kind,))
        rows = [i for i, d in enumerate(dicom_ids) if d in table and table[d].any()]
        if rows:
            m = torch.from_numpy(np.stack([table[dicom_ids[i]] for i in rows]).astype(np.float32))[:, None]
            out[rows, k] = F.adaptive_max_pool2d(m, grid)[:, 0] > 0
    return out
