"""The picture of spin's counterfactual pairs (README): winner, loser and their difference (x4) for the first
pairs of a few kinds of change, read from a run's OUT/counterfactual.pt (`cxrgen align --method spin
--losers counterfactual`).

Usage: python benchmarks/counterfactual_figure.py [--run runs/spin-cf] [--out docs/spin_counterfactual_pairs.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Columns: which change, how many of its first pairs
COLUMNS = (("-endotracheal_tube", 1), ("-central_line", 2), ("-pleural_effusion", 1), ("+consolidation", 1),
           ("+endotracheal_tube", 1))


def main() -> int:
    import numpy as np
    import torch
    from PIL import Image

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="runs/spin-cf")
    p.add_argument("--out", default="docs/spin_counterfactual_pairs.png")
    a = p.parse_args()
    path = REPO / a.run / "counterfactual.pt"
    if not path.is_file():
        p.error(f"{path.relative_to(REPO)} not found: run cxrgen align --method spin --losers counterfactual first")
    winners, losers, changes = torch.load(path, weights_only=True)["value"]
    picked = [i for change, n in COLUMNS for i in [k for k, c in enumerate(changes) if c == change][:n]]
    cols = []
    for i in picked:
        w, lo = ((winners[i, 0] + 1) / 2).numpy(), ((losers[i, 0] + 1) / 2).numpy()
        cols.append(np.concatenate([w, lo, np.clip(np.abs(w - lo) * 4, 0, 1)], 0))
        print(i, changes[i])
    grid = (np.concatenate(cols, 1) * 255).astype("uint8")
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2)).save(REPO / a.out, optimize=True)
    print(f"wrote {a.out}: rows winner, loser, |difference| x4")
    return 0


if __name__ == "__main__":
    sys.exit(main())
