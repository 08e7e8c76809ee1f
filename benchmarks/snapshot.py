"""A measurement snapshot of a ``cxrgen train`` run in progress: its resumable state's EMA weights (what the
run's final checkpoint would hold had it stopped there) in a pipeline folder beside the parent's VAE and tokenizer.

Not a release: the manifest's stage is "snapshot" and it names the run and step. The run itself is untouched
(re-running its command resumes it). Used to compare runs at the same step (README, "A finer latent grid").

Usage: python benchmarks/snapshot.py PARENT RUN OUT
  PARENT  the pipeline the run started from (its --model), RUN the run folder (with state/), OUT a new folder
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("parent")
    p.add_argument("run")
    p.add_argument("out")
    a = p.parse_args()
    run = Path(a.run)
    progress, ema_file = run / "state" / "progress.json", run / "state" / "ema.pt"
    if not progress.is_file() or not ema_file.is_file():
        p.error(f"{a.run}: no saved state with EMA weights (state/progress.json, state/ema.pt)")
    if Path(a.out).exists():
        p.error(f"{a.out} exists: give a new folder")
    import torch
    from diffusers.training_utils import EMAModel

    from training.model.checkpoint import Manifest, lineage_from, save_checkpoint
    from training.train.config import FinetuneConfig
    from training.train.loop import build_model

    config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    cfg = FinetuneConfig.from_file(run / "config.json") if config else FinetuneConfig()
    cfg.model = a.parent  # built as the run built it: its --unet-attention relayout and --image-size side
    pipe = build_model(cfg, [])
    lineage = lineage_from(Manifest.read(Path(a.parent)), a.parent)
    saved = torch.load(ema_file, weights_only=False)
    for name, averaged in saved.items():
        params = [q for q in getattr(pipe, name).parameters()]
        ema = EMAModel(params, decay=0.999)
        ema.load_state_dict(averaged)
        ema.copy_to(params)
    step = json.loads(progress.read_text())["step"]
    manifest = Manifest(version=f"{config.get('version') or run.name}-step{step}", stage="snapshot",
                        parent_version=lineage[0]["version"] if lineage else None, lineage=lineage,
                        config={"run": a.run, "step": step, "finetune": config})
    save_checkpoint(pipe, Path(a.out), manifest)
    print(f"step {step} of {a.run} -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
