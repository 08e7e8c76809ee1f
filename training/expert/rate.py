"""``cxrgen expert rate``: a generated folder -> generations, ratings and comparisons in the store.

Only the store's public API is used (``training.feedback.store``). Every write carries an
idempotency key derived from (seed, rater, generation), so a re-run writes nothing new:

  generation   the store's default key (image hash, prompt, seed, model version)
  rater        the store's default key (rater id)
  rating       panel-rating:<seed>:<rater>:<sha256(generation key)>
  comparison   panel-comparison:<seed>:<rater>:<sha256(generation key a, generation key b)>

Phases (``rate_folder``; ``rate_store`` rates generations already in the store, from phase 3):
  1. read the folder's records, resolve each image's findings (record, else parsed from the prompt)
  2. add the raters and the generations
  3. assess the images with the panel (once) and write every rater's rating of every image
  4. with ``pairs``: every rater's preference for same-prompt pairs of the folder's images
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from .data import GeneratedImage, load_images, read_generated, resolve_findings
from .panel import Assessment, Panel
from .raters import RaterProfile, compare, rate

CHUNK = 128  # images assessed at a time (bounded memory on folders of thousands)


def _h(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:40]


def item_key(image_sha256: str, prompt: str) -> str:
    """What identifies a generation for the label-noise draw: its pixels and its prompt (not a store id)."""
    return _h(image_sha256, prompt)


def rating_key(seed: int, rater_id: str, generation_key: str) -> str:
    return f"panel-rating:{seed}:{rater_id}:{_h(generation_key)}"


def comparison_key(seed: int, rater_id: str, key_a: str, key_b: str) -> str:
    return f"panel-comparison:{seed}:{rater_id}:{_h(key_a, key_b)}"


@dataclasses.dataclass
class RateSummary:
    """What a ``rate`` run did (printed as JSON by the command)."""

    folder: str
    images: int = 0
    generations: list[int] = dataclasses.field(default_factory=list)
    raters: list[str] = dataclasses.field(default_factory=list)
    ratings: int = 0  # ratings written or found (a re-run finds them all)
    plausible: int = 0  # of those, plausible
    comparisons: int = 0
    new_events: int = 0  # store cursor advance: 0 when the run changed nothing
    panel_version: str = ""


def add_raters(store, raters: Sequence[RaterProfile]) -> list[str]:
    return [store.add_rater(r.id, r.role, r.qualification) for r in raters]


def add_generations(store, images: Sequence[GeneratedImage]) -> list[tuple[int, list]]:
    """(generation id, resolved findings) per image, in folder order."""
    out = []
    for im in images:
        findings = resolve_findings(im.findings, im.prompt)
        gid = store.add_generation(image=str(im.path), prompt=im.prompt, findings=[f.to_dict() for f in findings],
                                   seed=im.seed, sampler=dict(im.sampler), model_version=im.model_version)
        out.append((gid, findings))
    return out


def write_ratings(store, panel: Panel, raters: Sequence[RaterProfile], images: Sequence[GeneratedImage],
                  gens: Sequence[tuple[int, list]], seed: int) -> tuple[dict[int, Assessment], int]:
    """Assess every image once and store every rater's rating; returns assessments and # plausible."""
    records = {r.id: r for r in store.generations([g for g, _ in gens])}
    assessed: dict[int, Assessment] = {}
    plausible = 0
    for start in range(0, len(images), CHUNK):
        chunk = list(zip(images[start:start + CHUNK], gens[start:start + CHUNK]))
        x = load_images([im.path for im, _ in chunk], panel.reader.size)
        for (im, (gid, findings)), a in zip(chunk, panel.assess(x, [f for _, (_, f) in chunk])):
            assessed[gid] = a
            rec = records[gid]
            for r in raters:
                v = rate(r, a, seed, item_key(rec.image_sha256, rec.prompt))
                store.add_rating(generation_id=gid, rater_id=r.id, plausible=v.plausible, failed=list(v.failed),
                                 score=v.score, comment=v.comment, key=rating_key(seed, r.id, rec.key))
                plausible += v.plausible
    return assessed, plausible


def same_prompt_pairs(store, gids: Sequence[int], max_pairs: int) -> list[tuple[int, int]]:
    """All pairs (lower id first) of distinct generations with one prompt, at most ``max_pairs`` per prompt."""
    by_prompt: dict[str, list[int]] = defaultdict(list)
    for rec in store.generations(sorted(set(gids))):
        by_prompt[rec.prompt].append(rec.id)
    out = []
    for ids in by_prompt.values():
        out += list(itertools.combinations(sorted(ids), 2))[:max_pairs]
    return out


def write_comparisons(store, raters: Sequence[RaterProfile], assessed: dict[int, Assessment],
                      pairs: Sequence[tuple[int, int]], seed: int) -> int:
    recs = {r.id: r for r in store.generations(sorted({g for p in pairs for g in p}))} if pairs else {}
    n = 0
    for a, b in pairs:
        ka, kb = recs[a].key, recs[b].key
        noise_key = ":".join(item_key(recs[g].image_sha256, recs[g].prompt) for g in (a, b))
        for r in raters:
            pref = compare(r, assessed[a], assessed[b], seed, noise_key)
            store.add_comparison(generation_a=a, generation_b=b, preferred=pref, rater_id=r.id,
                                 key=comparison_key(seed, r.id, ka, kb))
            n += 1
    return n


def _check(seed: int, max_pairs: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if max_pairs < 1:
        raise ValueError(f"max_pairs must be >= 1, got {max_pairs}")


def rate_folder(store, panel: Panel, folder: str | Path, raters: Sequence[RaterProfile], seed: int = 0,
                pairs: bool = False, max_pairs: int = 6) -> RateSummary:
    """Ingest and rate every image of a ``cxrgen generate`` folder (see the module docstring)."""
    _check(seed, max_pairs)
    images = read_generated(folder)  # 1.
    before = store.cursor()
    summary = RateSummary(folder=str(folder), images=len(images), panel_version=panel.version)
    summary.raters = add_raters(store, raters)  # 2.
    gens = add_generations(store, images)
    return _rate(store, panel, raters, images, gens, seed, pairs, max_pairs, summary, before)


def stored_generations(store, after: int) -> tuple[list[GeneratedImage], list[tuple[int, list]]]:
    """The generations that arrived in the store after cursor ``after`` (the service's, an import's), as
    images on the store's blob folder with their resolved findings."""
    gids = [e.record.id for e in store.read_after(after).events if e.kind == "generation"]
    images, gens = [], []
    for rec in store.generations(gids):
        images.append(GeneratedImage(Path(rec.image_path), rec.prompt, tuple(rec.findings), rec.seed,
                                     dict(rec.sampler), rec.model_version))
        gens.append((rec.id, resolve_findings(rec.findings, rec.prompt)))
    return images, gens


def rate_store(store, panel: Panel, raters: Sequence[RaterProfile], seed: int = 0, after: int = 0,
               pairs: bool = False, max_pairs: int = 6) -> RateSummary:
    """Rate the generations already in the store (those after cursor ``after``): what the service or an
    import put there. Same keys as ``rate_folder``, so an image rated either way is rated once."""
    _check(seed, max_pairs)
    before = store.cursor()
    images, gens = stored_generations(store, after)
    summary = RateSummary(folder=f"store after cursor {after}", images=len(images), panel_version=panel.version)
    summary.raters = add_raters(store, raters)
    return _rate(store, panel, raters, images, gens, seed, pairs, max_pairs, summary, before)


def _rate(store, panel, raters, images, gens, seed, pairs, max_pairs, summary: RateSummary,
          before: int) -> RateSummary:
    """Phases 3-4 of both entry points: ratings, then (with ``pairs``) comparisons."""
    summary.generations = [g for g, _ in gens]
    assessed, summary.plausible = write_ratings(store, panel, raters, images, gens, seed)  # 3.
    summary.ratings = len(images) * len(raters)
    if pairs:  # 4.
        summary.comparisons = write_comparisons(store, raters, assessed,
                                                same_prompt_pairs(store, summary.generations, max_pairs), seed)
    summary.new_events = store.cursor() - before
    return summary
