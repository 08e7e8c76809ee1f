"""Does a generator draw what a device sentence asks for? The same seeds under four device prompts and under the
same prompts without the device sentence, and the difference: one figure (rows: with, without, 0.5 + 2 x the
difference) per model, and the mean absolute difference per pair. A line in the difference row is a device the
words drew; grey noise is the words moving nothing in particular.

Usage: python benchmarks/device_look.py NAME=MODEL [NAME=MODEL ...] [--out FIGURE.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from simulate import named_models  # noqa: E402

PAIRS = (("Endotracheal tube terminates 4 cm above the carina. Lungs are clear.", "Lungs are clear."),
         ("Right internal jugular central venous catheter tip in the SVC. No pneumothorax.", "No pneumothorax."),
         ("Left subclavian central line with tip in the SVC. Heart size normal.", "Heart size normal."),
         ("Endotracheal tube and right IJ central line in place. Mild cardiomegaly.", "Mild cardiomegaly."))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", metavar="NAME=MODEL")
    p.add_argument("--out", default="out/device_look.png", help="the figure (all models, one block of rows each)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    models = named_models(p, a.models, REPO)
    import numpy as np
    from PIL import Image

    from training.generation import generate, set_scheduler
    from training.model.checkpoint import load_pipeline

    rows = []
    for name, folder in models:
        pipe, _ = load_pipeline(REPO / folder)
        set_scheduler(pipe, "ddim")
        size = pipe.vae.config.sample_size
        with_dev = generate(pipe, [w for w, _ in PAIRS], a.seed, 25, 4.0, "", len(PAIRS), size)
        without = generate(pipe, [wo for _, wo in PAIRS], a.seed, 25, 4.0, "", len(PAIRS), size)
        print(name, "mean abs difference per pair:", [round(float(v), 4) for v in np.abs(with_dev - without).mean(axis=(1, 2))])
        rows += [np.concatenate(list(with_dev), 1), np.concatenate(list(without), 1),
                 np.concatenate(list(np.clip(0.5 + 2 * (with_dev - without), 0, 1)), 1)]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.concatenate(rows, 0) * 255).astype(np.uint8)).save(out)
    print("figure:", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
