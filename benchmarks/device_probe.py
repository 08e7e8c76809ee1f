"""A quick support-device check of generators: the evaluation judge's device AUROC on their images of a subset
of the test prompts (every device-positive prompt of the first --n and twice as many negatives), image i from
seed i as in ``cxrgen evaluate`` (so a model's images are the ones its full evaluation would make for those
prompts). Much cheaper than a full evaluation (a few minutes for ~180 images on 2 cores); not a substitute for it.

Usage: python benchmarks/device_probe.py NAME=MODEL [NAME=MODEL ...] [--judge runs/judge-bal]
                                         [--data runs/sim256-judge] [--n 600] [--out FILE]
Prints one line per model; --out adds the rows to a JSON file's "device_probe" object (created if absent).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from simulate import machine, named_models  # noqa: E402


def main() -> int:
    import torch

    from training.evaluate.config import EvalConfig
    from training.evaluate.harness import dataset, judge_aurocs, take
    from training.evaluate.judge import OBSERVATIONS, load_judge
    from training.generation import denoise, set_scheduler
    from training.model.checkpoint import load_pipeline

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", metavar="NAME=MODEL")
    p.add_argument("--judge", default="runs/judge-bal")
    p.add_argument("--data", default="runs/sim256-judge", help="an evaluation data folder (its test split)")
    p.add_argument("--n", type=int, default=600, help="test prompts to draw the subset from (cxrgen evaluate's --n-prompts)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--out", help="JSON file to add the results to")
    a = p.parse_args()
    models = named_models(p, a.models, REPO)
    if not (REPO / a.judge).is_dir():
        p.error(f"--judge {a.judge}: no such folder")
    _, labels, rows = take(dataset(EvalConfig(out="/dev/null", data=str(REPO / a.data)), "test", a.size), a.n)
    col = OBSERVATIONS.index("Support Devices")
    pos = [k for k in range(len(rows)) if labels[k, col] == 1]
    idx = pos + [k for k in range(len(rows)) if labels[k, col] == 0][:2 * len(pos)]
    judge = load_judge(REPO / a.judge)
    result = {"device": machine(), "judge": a.judge, "data": a.data, "n_prompts": a.n, "positives": len(pos),
              "images": len(idx), "steps": a.steps, "guidance": a.guidance, "models": {}}
    for name, folder in models:
        pipe, _ = load_pipeline(REPO / folder)
        set_scheduler(pipe, "ddim")
        images = []
        for s in range(0, len(idx), 16):
            b = idx[s:s + 16]
            images.append(torch.from_numpy(denoise(pipe, [rows[k]["prompt"] for k in b], [""] * len(b), b,
                                                   a.steps, a.guidance, a.size)))
        gen = torch.cat(images)[:, None] * 2 - 1
        auroc = judge_aurocs(judge, gen, labels[idx])["Support Devices"]
        result["models"][name] = {"model": folder, "support_devices_auroc": auroc}
        print(f"{name} ({folder}): support devices AUROC {auroc:.3f} on {len(pos)} device and "
              f"{len(idx) - len(pos)} other test prompts", flush=True)
    if a.out:
        out = REPO / a.out
        blob = json.loads(out.read_text()) if out.is_file() else {}
        blob["device_probe"] = result
        out.write_text(json.dumps(blob, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
