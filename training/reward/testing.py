"""A toy world for the reward tests: planted signals the rewards must find (not used in production).

* ``toy_image``: a schematic chest (body, two dark lungs, a bright heart, faint
  ribs) with an optional "effusion" (a bright blob at one lung base; the
  patient's left is the image's right, as on a PA film), an enlarged heart for
  cardiomegaly, and an in-plane rotation / shift for posture.
* ``write_toy_sim``: a MIMIC-CXR-JPG-layout data set of such images with
  reports, labels and ground truth, read by the same loader as the simulator's.
* ``FakeStore``: the feedback store's read API in memory (read_after, image,
  cursor, ratings, comparisons, generations), and ``toy_store`` filled with
  rated generations whose plausibility is planted (effusion on the declared
  side = plausible) and rated by three noisy raters.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import numpy as np

from training.findings import Finding, labels

FOV_MM = 340.0  # the simulator's field of view: shifts in mm -> fraction of the image


def toy_image(size: int, findings=(), roll_deg: float = 0.0, shift_mm: tuple[float, float] = (0.0, 0.0),
              rng: np.random.Generator | None = None) -> np.ndarray:
    """(size, size) float in [0, 1]."""
    rng = rng or np.random.default_rng(0)
    c = np.linspace(-1, 1, size)
    x, y = np.meshgrid(c, c)
    x, y = x - 2 * shift_mm[0] / FOV_MM, y + 2 * shift_mm[1] / FOV_MM
    t = math.radians(roll_deg)
    x, y = x * math.cos(t) + y * math.sin(t), -x * math.sin(t) + y * math.cos(t)
    kinds = {f.kind: f for f in findings}
    img = np.full((size, size), 0.08)
    img[(x / 0.85) ** 2 + (y / 0.95) ** 2 < 1] = 0.55  # body
    for sx in (-0.35, 0.35):
        lung = ((x - sx) / 0.25) ** 2 + ((y + 0.05) / 0.6) ** 2 < 1
        img[lung] = 0.22 + 0.05 * np.sin(y[lung] * 25) ** 2  # ribs
    heart_r = 0.32 if "cardiomegaly" in kinds else 0.2
    img[((x - 0.05) / heart_r) ** 2 + ((y - 0.25) / 0.22) ** 2 < 1] = 0.8
    eff = kinds.get("pleural_effusion")
    if eff is not None:
        sides = {"left": [0.35], "right": [-0.35], "bilateral": [-0.35, 0.35]}[eff.side.value]
        for sx in sides:
            img[(((x - sx) / 0.27) ** 2 + ((y - 0.45) / 0.2) ** 2 < 1)] = 0.75
    img = img + rng.normal(0, 0.02, img.shape)
    return np.clip(img, 0, 1)


TOY_FINDINGS = ([], [Finding("pleural_effusion", "left", "moderate")],
                [Finding("pleural_effusion", "right", "moderate")], [Finding("cardiomegaly", severity="moderate")])


def toy_report(findings, rng: random.Random) -> tuple[str, str]:
    from training.data.reports import compose_report

    return compose_report(findings, rng)


def _row(root: Path, i: int, size: int, seed: int, rng: np.random.Generator, pose_range: float) -> dict:
    from PIL import Image

    from training.simulator.dataset import ids, image_path

    findings = TOY_FINDINGS[i % len(TOY_FINDINGS)]
    roll = float(rng.uniform(-pose_range, pose_range))
    shift = (float(rng.uniform(-15, 15)), float(rng.uniform(-15, 15)))
    img = toy_image(size, findings, roll, shift, rng)
    subject, study, dicom = ids(seed, i)
    path = image_path(root, subject, study, dicom)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((img * 255).round().astype(np.uint8), mode="L").save(path, quality=95)
    found, impression = toy_report(findings, random.Random(seed * 100_003 + i))
    path.parent.with_suffix(".txt").write_text(f"FINDINGS:\n {found}\n \nIMPRESSION:\n {impression}\n")
    u = random.Random(f"{seed}-{i}").random()
    return {"index": i, "dicom_id": dicom, "subject_id": subject, "study_id": study, "seed": seed,
            "split": "train" if u < 0.7 else "validate" if u < 0.85 else "test", "view": "PA", "size": size,
            "findings": [f.to_dict() for f in findings], "labels": labels(findings),
            "pose": {"roll_deg": roll, "yaw_deg": 0.0, "pitch_deg": 0.0, "shift_x_mm": shift[0],
                     "shift_z_mm": shift[1], "inspiration": 1.3, "width_scale": 1.0},
            "prompt": " ".join((impression + " " + found).split())}


def write_toy_sim(root: str | Path, n: int = 160, size: int = 64, seed: int = 0, pose_range: float = 15.0) -> Path:
    """A MIMIC-layout data set of ``n`` toy images (see the module docstring)."""
    from training.simulator.dataset import write_tables

    root = Path(root)
    rng = np.random.default_rng(seed)
    rows = [_row(root, i, size, seed, rng, pose_range) for i in range(n)]
    write_tables(root, rows)
    (root / "simulate_config.json").write_text(json.dumps({"toy": True, "n": n, "size": size, "seed": seed}))
    return root


# ---------------------------------------------------------------------- fake store


@dataclasses.dataclass(frozen=True)
class Gen:
    id: int
    prompt: str
    findings: list
    seed: int = 0
    sampler: dict = dataclasses.field(default_factory=dict)
    model_version: str = "toy"


@dataclasses.dataclass(frozen=True)
class Rating:
    id: int
    generation_id: int
    rater_id: str
    plausible: bool
    failed: tuple = ()


@dataclasses.dataclass(frozen=True)
class Comparison:
    id: int
    generation_a: int
    generation_b: int
    preferred: str
    rater_id: str


@dataclasses.dataclass(frozen=True)
class Event:
    seq: int
    kind: str
    record: object


@dataclasses.dataclass(frozen=True)
class Batch:
    events: list
    cursor: int


class FakeStore:
    """The read half of training.feedback.store's API, in memory, plus simple adders."""

    url = "sqlite:///fake.db"

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.images: dict[int, np.ndarray] = {}

    def _add(self, kind: str, record) -> None:
        self.events.append(Event(len(self.events) + 1, kind, record))

    def add_generation(self, image: np.ndarray, prompt: str, findings) -> int:
        gid = len(self.images) + 1
        self.images[gid] = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        self._add("generation", Gen(gid, prompt, [f.to_dict() for f in findings]))
        return gid

    def add_rating(self, gid: int, rater: str, plausible: bool) -> None:
        self._add("rating", Rating(len(self.events) + 1, gid, rater, plausible))

    def add_comparison(self, a: int, b: int, preferred: str, rater: str) -> None:
        self._add("comparison", Comparison(len(self.events) + 1, a, b, preferred, rater))

    def read_after(self, cursor: int = 0, limit: int | None = None) -> Batch:
        evs = [e for e in self.events if e.seq > cursor][:limit]
        return Batch(evs, evs[-1].seq if evs else cursor)

    def cursor(self) -> int:
        return len(self.events)

    def image(self, gid: int) -> np.ndarray:
        return self.images[gid]

    def generations(self, ids=None) -> list:
        return [e.record for e in self.events if e.kind == "generation" and (ids is None or e.record.id in ids)]

    def ratings(self, after: int = 0) -> list:
        return [e.record for e in self.events if e.kind == "rating" and e.seq > after]

    def comparisons(self, after: int = 0) -> list:
        return [e.record for e in self.events if e.kind == "comparison" and e.seq > after]


def toy_store(store=None, n_prompts: int = 24, per_prompt: int = 4, size: int = 64, seed: int = 0,
              noise: float = 0.1):
    """Fill ``store`` (default a FakeStore) with rated, compared toy generations; returns it.

    Each prompt declares a left or right effusion; half its images show it on the
    declared side (plausible), the others on the other side or not at all. Three
    raters flip the truth with probability ``noise``; each pair of a prompt's
    first two images gets a comparison from every rater. Works with the real
    store too (its add_* keyword API), via ``_Adapter``.
    """
    store = store if store is not None else FakeStore()
    add = store if isinstance(store, FakeStore) else _Adapter(store)
    rng, prng = np.random.default_rng(seed), random.Random(seed)
    for p in range(n_prompts):
        side = "left" if p % 2 == 0 else "right"
        declared = [Finding("pleural_effusion", side, "moderate")]
        prompt = f"toy prompt {p}: moderate {side} pleural effusion."
        gids, truth = [], []
        for k in range(per_prompt):
            good = k % 2 == 0
            shown = declared if good else ([] if k % 4 == 3 else [Finding("pleural_effusion",
                                                                          "right" if side == "left" else "left")])
            gids.append(add.add_generation(toy_image(size, shown, 0.0, (0.0, 0.0), rng), prompt, declared))
            truth.append(good)
        for gid, good in zip(gids, truth):
            for r in ("r1", "r2", "r3"):
                add.add_rating(gid, r, good if prng.random() > noise else not good)
        for r in ("r1", "r2", "r3"):
            pref = "a" if truth[0] else "b"
            if prng.random() < noise:
                pref = "tie" if prng.random() < 0.5 else ("b" if pref == "a" else "a")
            add.add_comparison(gids[0], gids[1], pref, r)
    return store


class _Adapter:
    """toy_store's three adders on top of the real store's keyword API."""

    def __init__(self, store) -> None:
        self.store = store
        for r in ("r1", "r2", "r3"):
            store.add_rater(r, "radiologist", "toy")

    def add_generation(self, image, prompt, findings) -> int:
        return self.store.add_generation(image=image, prompt=prompt, findings=[f.to_dict() for f in findings],
                                         seed=0, sampler={}, model_version="toy")

    def add_rating(self, gid, rater, plausible) -> None:
        self.store.add_rating(generation_id=gid, rater_id=rater, plausible=bool(plausible))

    def add_comparison(self, a, b, preferred, rater) -> None:
        self.store.add_comparison(generation_a=a, generation_b=b, preferred=preferred, rater_id=rater)
