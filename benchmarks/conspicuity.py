"""Does the film itself carry a small finding at a given resolution? (issue 8's judge prerequisite)

A judge that misses calcified granulomas may be blind, or the films may not show them. For simulated exams with
a finding of kind K, the same exam rendered with (x+) and without it (x-) (``conditioning_gap.exam_pairs``) at each
``--sizes`` side. Per exam: the finding's peak contrast, max |x+ - x-|, and the film's own texture around that peak,
the standard deviation of the high-pass film (x- minus its 7 x 7 box blur) in a window of side/8 centred on it.
Their ratio is a contrast-to-noise ratio (CNR): about 1 means the finding is as strong as the anatomy's own
texture there (an end-on vessel looks the same); well above it, an observer who looks at the right place sees it.
It measures the data, not any model: the upper bound on what a judge reading films at that side could learn.

Usage: python benchmarks/conspicuity.py [--data runs/sim256-judge] [--kinds calcified_granuloma,nodule]
                                        [--sizes 128,256] [--n 40] [--out FILE] [--figure PNG]
Writes benchmarks/results/conspicuity-cpu.json (or --out) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from conditioning_gap import exam_pairs  # noqa: E402
from simulate import machine  # noqa: E402


def cnr(xp, xm, blur: int = 7) -> tuple[list[float], list[float]]:
    """Per exam: (peak |x+ - x-|, that peak over the high-pass texture std of x- in a window around it)."""
    import torch.nn.functional as F

    side = xp.shape[-1]
    half = max(2, side // 16)
    d = (xp - xm)[:, 0].abs()
    hp = (xm - F.avg_pool2d(xm, blur, 1, blur // 2, count_include_pad=False))[:, 0]
    peaks, ratios = [], []
    for i in range(len(d)):
        y, x = divmod(int(d[i].flatten().argmax()), side)
        window = hp[i, max(0, y - half):y + half + 1, max(0, x - half):x + half + 1]
        peak = float(d[i, y, x])
        peaks.append(peak)
        ratios.append(peak / max(float(window.std()), 1e-6))
    return peaks, ratios


def summary(peaks: list[float], ratios: list[float]) -> dict:
    import torch

    r = torch.tensor(ratios)
    return {"n": len(ratios), "peak_median": float(torch.tensor(peaks).median()),
            "cnr_median": float(r.median()), "cnr_q25": float(r.quantile(0.25)), "cnr_q75": float(r.quantile(0.75)),
            "share_cnr_below_2": float((r < 2).float().mean())}


def figure(xp, xm, path: Path, k: int = 6, crop: int = 64, zoom: int = 3) -> None:
    """Rows: exams; columns: the film, the same exam without the finding, their difference x2 (mid-grey = 0),
    each a ``crop``-px square centred on the finding's peak, enlarged ``zoom`` times."""
    import torch
    from PIL import Image

    side = xp.shape[-1]
    crop = min(crop, side)
    rows = []
    for i in range(min(k, len(xp))):
        y, x = divmod(int((xp - xm)[i, 0].abs().flatten().argmax()), side)
        y0, x0 = (min(max(0, c - crop // 2), side - crop) for c in (y, x))
        cut = lambda t: t[i, 0, y0:y0 + crop, x0:x0 + crop]  # noqa: E731
        rows.append(torch.cat([cut(xp), cut(xm), (cut(xp) - cut(xm)) * 2], 1))
    grid = torch.cat(rows, 0).clamp(-1, 1)
    img = Image.fromarray(((grid + 1) * 127.5).round().byte().numpy())
    path.parent.mkdir(parents=True, exist_ok=True)
    img.resize((img.width * zoom, img.height * zoom), Image.NEAREST).save(path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="runs/sim256-judge", help="a simulated folder (cxrgen simulate --out)")
    p.add_argument("--kinds", default="calcified_granuloma,nodule,mass")
    p.add_argument("--sizes", default="128,256", help="film sides in px, comma-separated")
    p.add_argument("--n", type=int, default=40, help="exams per kind")
    p.add_argument("--out", default="benchmarks/results/conspicuity-cpu.json")
    p.add_argument("--figure", help="a PNG of the first kind's exams at the largest side: film, without, "
                   "difference x2, cropped around the finding")
    a = p.parse_args()
    if not (REPO / a.data / "ground_truth.jsonl").is_file():
        p.error(f"--data {a.data}: no ground_truth.jsonl (this measurement needs simulated data)")
    try:
        sizes = [int(s) for s in a.sizes.split(",") if s.strip()]
    except ValueError:
        p.error(f"--sizes {a.sizes}: not a comma-separated list of integers")
    if not sizes or any(s < 32 for s in sizes):
        p.error(f"--sizes {a.sizes}: each side must be at least 32 px")
    if a.n < 1:
        p.error("--n must be at least 1")
    kinds = [k.strip() for k in a.kinds.split(",") if k.strip()]
    t0 = time.time()
    res = {}
    for size in sizes:
        pairs = exam_pairs(REPO / a.data, kinds, a.n, size)
        res[str(size)] = {kind: summary(*cnr(xp, xm)) for kind, (xp, xm, _) in pairs.items()}
        if a.figure and size == max(sizes) and kinds[0] in pairs:
            figure(*pairs[kinds[0]][:2], REPO / a.figure)
    missing = sorted(set(kinds) - {k for r in res.values() for k in r})
    out = {"benchmark": "conspicuity", "machine": machine(), "data": a.data, "n": a.n, "kinds": kinds,
           "missing_kinds": missing, "seconds": round(time.time() - t0, 1), "results": res}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print("| kind | side | exams | peak contrast | CNR median (q25-q75) | share CNR < 2 |")
    print("|---|---|---|---|---|---|")
    for size, r in res.items():
        for kind, s in r.items():
            print(f"| {kind} | {size} | {s['n']} | {s['peak_median']:.3f} | {s['cnr_median']:.1f} "
                  f"({s['cnr_q25']:.1f}-{s['cnr_q75']:.1f}) | {s['share_cnr_below_2']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
