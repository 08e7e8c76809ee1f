"""Issue 8's conditioning table for several generators under one evaluation judge: the AUROC ratio per finding
(generated / real, the same judge), its mean and minimum, with the judge's real and VAE round-trip AUROCs beside
them, and the judge-independent columns (panel, MS-SSIM) that show the images are the ones evaluated before.

Each model is evaluated by ``cxrgen evaluate`` with the ablation's protocol (600 test prompts of --data plus the
hand-written held-out prompts, seed 0, no augmentation experiment) into its own folder. The evaluation keeps its
generated images (OUT/generated/*.pt, keyed by the weights, prompts, seed and sampler), so re-judging a model
evaluated before samples nothing: only the judge's passes run.

Usage: python benchmarks/rejudge.py --judge runs/judge-max --out benchmarks/results/align-rejudged-max-cpu.json \\
           baseline=runs/tiny-cpu-v2.2:runs/eval-bal-baseline default=models/default:runs/eval-bal-default ...
Each positional argument is NAME=MODEL:EVAL_FOLDER. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from align_ablation import HELDOUT, evaluate_command  # noqa: E402
from simulate import machine  # noqa: E402


def parse_model(text: str) -> tuple[str, str, str]:
    name, eq, rest = text.partition("=")
    model, colon, folder = rest.rpartition(":")
    if not (eq and colon and name and model and folder):
        raise SystemExit(f"rejudge: {text!r}: expected NAME=MODEL:EVAL_FOLDER")
    return name, model, folder


def evaluate(model: str, folder: str, a) -> dict:
    """``cxrgen evaluate`` into ``folder`` with --judge; its metrics, also kept as metrics-<judge>.json (which
    --reuse reads instead of evaluating again)."""
    kept = Path(folder) / f"metrics-{Path(a.judge).name}.json"
    if a.reuse and kept.is_file():
        return json.loads(kept.read_text())
    log = Path(folder) / f"evaluate-{Path(a.judge).name}.log"
    Path(folder).mkdir(parents=True, exist_ok=True)
    cmd = evaluate_command(folder, model, a.data, a.judge, a.n_prompts)
    with open(log, "w") as f:
        if subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode:
            raise SystemExit(f"rejudge: cxrgen evaluate failed for {model}; see {log}")
    metrics = json.loads((Path(folder) / "metrics.json").read_text())
    kept.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def lineage(model: str) -> dict:
    """The checkpoint's version, stage, parent and alignment settings from its manifest (empty without one)."""
    path = REPO / model / "cxrgen_manifest.json"
    if not path.is_file():
        return {}
    m = json.loads(path.read_text())
    return {"version": m.get("version"), "stage": m.get("stage"), "parent_version": m.get("parent_version"),
            "align": (m.get("config") or {}).get("align"), "align_heldout": (m.get("metrics") or {}).get("heldout")}


def table(results: dict) -> str:
    """The markdown table. The judge's AUROC on real films and on their VAE round trips is given once per group
    of models that were measured on the same films (a generator's evaluation reads the films at its own size),
    named by the models it belongs to when there is more than one group."""
    names = list(results)
    first = results[names[0]]
    findings = [k for k in first["auroc_ratio"]]
    by_films: dict[str, list[str]] = {}  # models sharing the same real-film measurements
    for n in names:
        films = json.dumps([results[n]["judge_auroc_real"], results[n]["judge_auroc_vae"]], sort_keys=True)
        by_films.setdefault(films, []).append(n)
    groups = list(by_films.values())
    tag = (lambda g: "") if len(groups) == 1 else (lambda g: f", films of {', '.join(g)}")
    head = ("| finding | positives | " + " | ".join(f"judge on real / VAE round trips{tag(g)}" for g in groups)
            + " | " + " | ".join(f"{n} (ratio)" for n in names) + " |")
    rows = [head, "|" + "---|" * (2 + len(groups) + len(names))]
    blank = "| " * len(groups)
    for k in findings:
        cells = [f"{results[n]['conditioning_auroc'][k]:.3f} ({results[n]['auroc_ratio'][k]:.2f})" for n in names]
        real = [f"{results[g[0]]['judge_auroc_real'][k]:.3f} / {results[g[0]]['judge_auroc_vae'][k]:.3f}"
                for g in groups]
        rows.append(f"| {k} | {first['positives'][k]} | " + " | ".join(real) + " | " + " | ".join(cells) + " |")
    rows.append(f"| **ratio mean / min** | {blank}| " + " | ".join(
        f"{results[n]['auroc_ratio_mean']:.3f} / {results[n]['auroc_ratio_min']:.2f}" for n in names) + " |")
    for key, label in (("panel_plausible_rate", "panel plausible rate"), ("fid_ratio_to_floor", "FID / floor"),
                       ("ms_ssim_generated", "MS-SSIM"), ("effusion_detection_rate", "effusion detection")):
        rows.append(f"| {label} | {blank}| " + " | ".join(f"{results[n].get(key, float('nan')):.3f}" for n in names)
                    + " |")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="NAME=MODEL:EVAL_FOLDER")
    p.add_argument("--judge", required=True, help="the evaluation judge folder (judge.json)")
    p.add_argument("--data", default="runs/sim256-judge")
    p.add_argument("--n-prompts", type=int, default=600)
    p.add_argument("--out", required=True, help="results JSON")
    p.add_argument("--note", default="", help="a sentence stored with the results")
    p.add_argument("--reuse", action="store_true",
                   help="read EVAL_FOLDER/metrics-<judge>.json where an earlier run left it instead of evaluating")
    a = p.parse_args()
    models = [parse_model(m) for m in a.models]
    meta = json.loads((Path(a.judge) / "judge.json").read_text())
    results = {name: evaluate(model, folder, a) for name, model, folder in models}
    out = {"benchmark": "align-rejudged", "device": machine(), "judge": a.judge, "judge_config": meta["config"],
           "judge_pooling": meta.get("pooling", "avg"), "judge_val_metrics": meta.get("metrics", {}),
           "eval_data": a.data, "n_prompts": a.n_prompts, "heldout_file": HELDOUT,
           "note": a.note, "models": {name: {"model": model, "eval_folder": folder, **lineage(model)}
                                      for name, model, folder in models},
           "results": results}
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
