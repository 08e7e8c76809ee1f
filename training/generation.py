"""``cxrgen generate``: prompts or structured findings -> synthetic CXRs with provenance.

Every image i of a run gets its own generator seeded ``seed + i``, so an image is
reproducible on its own whatever the batch size, and the same seed and settings give
the same image. Each file carries its provenance (PNG text chunks / DICOM attributes,
``training.provenance``); ``OUT/generation.jsonl`` lists them all. Images are written batch by batch,
and the same command run again on the same OUT resumes after the last image written.

Backends (issue 10): ``torch`` runs the checkpoint's diffusers pipeline here; the others
(``onnxruntime``, ``tensorrt``) run an export folder (``cxrgen export onnx``), ``triton`` a Triton
server serving a repository (``cxrgen export triton``); they are looked up by name in the
``cxrgen.backends`` entry-point group, so this module never imports ``export``. Every backend
writes the same files, log and scores.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "default"
BACKENDS_GROUP = "cxrgen.backends"  # entry points: name -> load(model_folder, device=...) -> backend
EXPORT_MANIFEST = "export.json"  # marks an export folder (written by `cxrgen export onnx`)
TRITON_MANIFEST = "cxrgen_triton.json"  # marks a Triton model repository (written by `cxrgen export triton`)

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "ddpm": "DDPMScheduler",
}
# Options each sampler is built with on top of the model's noise schedule. PNDM: the pseudo-linear multistep
# steps only, as in Stable Diffusion's own scheduler config; its Runge-Kutta warm-up needs >= 4 steps and
# fails below that (a 1-3 step request raised ValueError from diffusers' set_timesteps).
SCHEDULER_OPTIONS = {"pndm": {"skip_prk_steps": True}}


def make_scheduler(name: str, config):
    """A fresh sampler ``name`` (a ``SCHEDULERS`` key) on the noise schedule in ``config``."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; known: {sorted(SCHEDULERS)}")
    import diffusers

    return getattr(diffusers, SCHEDULERS[name]).from_config(config, **SCHEDULER_OPTIONS.get(name, {}))


def set_scheduler(pipe, name: str) -> None:
    """Swap the sampler, keeping the model's noise schedule."""
    pipe.scheduler = make_scheduler(name, pipe.scheduler.config)


def parse_finding(text: str):
    """'pleural_effusion:left:moderate' or 'nodule:RUL' -> Finding (order of attributes is free)."""
    from .findings import LOBES, Finding, Laterality, Severity

    kind, *attrs = [t.strip() for t in text.split(":")]
    kw = {}
    for a in attrs:
        if a in {s.value for s in Laterality}:
            kw["side"] = a
        elif a in {s.value for s in Severity}:
            kw["severity"] = a
        elif a.upper() in LOBES:
            kw["lobe"] = a.upper()
        else:
            raise ValueError(f"--finding {text!r}: unknown attribute {a!r} (sides, severities or lobes)")
    return Finding(kind, **kw)


def findings_prompt(findings, seed: int) -> str:
    """The impression a radiologist would write for these findings (the model was trained on such text)."""
    from .data.reports import compose_report

    findings_text, impression = compose_report(findings, random.Random(seed))
    return " ".join((impression + " " + findings_text).split())


def denoise(pipe, prompts: list[str], negatives: list[str], seeds: list[int], steps: int, guidance: float,
            size: int):
    """One denoising run: images (N, H, W) in [0, 1] as numpy, image i from a CPU generator seeded ``seeds[i]``;
    latents decoded in the VAE's own dtype (fp32 also when the U-Net runs fp16)."""
    import torch

    from .model.components import to_grey

    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    with torch.inference_mode():
        latents = pipe(list(prompts), negative_prompt=list(negatives) if any(negatives) else None,
                       num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                       generator=gens, output_type="latent").images
        vae = pipe.vae
        x = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        x = (x / 2 + 0.5).clamp(0, 1)
    return to_grey(x)[:, 0].clamp(0, 1).float().cpu().numpy()


def generate(pipe, prompts: list[str], seed: int, steps: int, guidance: float, negative: str,
             batch_size: int, size: int):
    """Images (N, H, W) in [0, 1] as numpy, one per prompt, image i from seed + i."""
    import numpy as np

    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        out.append(denoise(pipe, chunk, [negative or ""] * len(chunk), [seed + start + i for i in range(len(chunk))],
                           steps, guidance, size))
    return np.concatenate(out)


class TorchBackend:
    """The checkpoint's diffusers pipeline behind the interface every backend offers ``run`` and the service:
    ``version``, ``native_size``, ``manifest``, ``set_scheduler(name)``, ``generate(...)`` (image i from
    seed + i), ``run_batch(...)`` (explicit per-image seeds and negative prompts), ``scorer()``."""

    name = "torch"

    def __init__(self, model: Path, device: str, half: bool = False, compile: bool = False) -> None:
        """``half``: fp16 U-Net and text encoder (CUDA), the VAE kept fp32 (fp16 decoding overflows).
        ``compile``: the U-Net through ``torch.compile`` (inductor). The first run of each batch shape pays the
        compilation (tens of seconds on a CPU); benchmarks/backends.py measures what it buys afterwards."""
        import torch

        from .model.checkpoint import load_pipeline

        self.pipe, manifest = load_pipeline(model, device=device, dtype=torch.float16 if half else None)
        if half:
            self.pipe.vae.to(torch.float32)
        if compile:
            self.pipe.unet = torch.compile(self.pipe.unet)
        self.compiled = compile
        self.manifest = manifest
        self.version = manifest.version if manifest else model.name
        self.native_size = int(self.pipe.vae.config.sample_size)
        self.schedulers: dict = {}

    def set_scheduler(self, name: str) -> None:
        set_scheduler(self.pipe, name)

    def generate(self, prompts, seed, steps, guidance, negative, batch_size, size):
        return generate(self.pipe, prompts, seed, steps, guidance, negative, batch_size, size)

    def run_batch(self, prompts, negatives, seeds, steps, guidance, scheduler, size):
        """One denoising run, image i from a CPU generator seeded ``seeds[i]`` (the same image as ``generate``
        for that seed), with the named scheduler (kept per name)."""
        if scheduler not in self.schedulers:
            self.schedulers[scheduler] = make_scheduler(scheduler, self.pipe.scheduler.config)
        self.pipe.scheduler = self.schedulers[scheduler]
        return denoise(self.pipe, prompts, negatives, seeds, steps, guidance, size)

    def scorer(self):
        return None  # the torch path scores with the reward folders (generation_scorer)


def backend_names() -> list[str]:
    from importlib.metadata import entry_points

    return ["torch", *sorted(ep.name for ep in entry_points(group=BACKENDS_GROUP))]


def is_export_folder(model: Path) -> bool:
    return (model / EXPORT_MANIFEST).is_file() and not (model / "model_index.json").is_file()


def is_triton_repository(model: Path) -> bool:
    return (model / TRITON_MANIFEST).is_file()


def default_backend(model: Path) -> str:
    """torch for a checkpoint, onnxruntime for an export folder, triton for a Triton repository."""
    return "triton" if is_triton_repository(model) else "onnxruntime" if is_export_folder(model) else "torch"


def load_backend(name: str | None, model: Path, device: str, **options):
    """``--backend`` on ``--model``: torch on a checkpoint (or on the checkpoint an export folder names),
    a registered backend on an export folder (triton: on a Triton repository too); None picks
    ``default_backend``. ``options`` go to the backend's loader (torch: ``half``, ``compile``; triton: ``url``)."""
    from importlib.metadata import entry_points

    model = Path(model)
    name = name or default_backend(model)
    if name == "torch":
        if is_triton_repository(model):  # the repository names the export it was written from
            model = Path(json.loads((model / TRITON_MANIFEST).read_text())["export"])
        if is_export_folder(model):  # the export names its source checkpoint (export/folder.py)
            source = Path(json.loads((model / EXPORT_MANIFEST).read_text())["source"]["checkpoint"])
            if not source.is_dir():
                raise FileNotFoundError(f"--backend torch: {model} was exported from {source}, which is not here; "
                                        f"pass the checkpoint folder as --model or choose another --backend")
            model = source
        return TorchBackend(model, device, **options)
    found = {ep.name: ep for ep in entry_points(group=BACKENDS_GROUP)}
    if name not in found:
        raise ValueError(f"unknown --backend {name!r}; known: {backend_names()}")
    try:
        loader = found[name].load()
    except ImportError as e:
        raise ValueError(f"--backend {name} is not installed ({e}); pip install -e . (or '.[gpu]' for GPU "
                         f"backends)") from None
    return loader(model, device=device, **options)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate synthetic CXRs from report text or structured findings",
        description=(
            "Generate N images per prompt with the model at --model (default: models/default). Writes "
            "OUT/<index>_seed<seed>.png (8-bit grey, PNG text chunks: synthetic=true, model version, seed, "
            "prompt hash, full provenance JSON), the same as DICOM Secondary Capture with --dicom "
            "(ImageType DERIVED\\SECONDARY, series description SYNTHETIC), OUT/generation.jsonl, and with "
            "--grid OUT/grid.png (one row per finding)."
        ),
    )
    p.add_argument("--prompt", action="append", default=[], help="report text (repeatable)")
    p.add_argument("--finding", action="append", default=[],
                   help="structured finding kind[:side][:severity][:lobe], e.g. pleural_effusion:left:moderate "
                        "(repeatable; all findings make one prompt)")
    p.add_argument("--prompts-file", default=None,
                   help="a .jsonl file, one {\"prompt\": ..., \"findings\": [finding dicts]} per line, or a .txt "
                        "file, one prompt per line (findings then read from the text)")
    p.add_argument("--prompts-from", default=None, metavar="DATA",
                   help="a simulated data set (cxrgen simulate --out DATA): the prompts and true findings of its "
                        "--split, the first --limit of them")
    p.add_argument("--split", default="test", help="split of --prompts-from (train, validate, test)")
    p.add_argument("--limit", type=int, default=100, help="number of --prompts-from prompts")
    p.add_argument("--n", type=int, default=1, help="images per prompt")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--steps", type=int, default=25, help="sampling steps")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale")
    p.add_argument("--negative-prompt", default="", help="text to steer away from")
    p.add_argument("--scheduler", default="ddim", help=f"one of {sorted(SCHEDULERS)}")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--size", type=int, default=None, help="image side (default: the model's)")
    p.add_argument("--model", default=None,
                   help="checkpoint folder, an export folder from `cxrgen export onnx`, or a Triton repository from "
                        "`cxrgen export triton` (default: models/default)")
    p.add_argument("--backend", default=None,
                   help="torch | onnxruntime | tensorrt | triton (registered backends); default: torch for a "
                        "checkpoint, onnxruntime for an export folder, triton for a Triton repository (server at "
                        "$CXRGEN_TRITON_URL, default http://127.0.0.1:8000; grpc://HOST:PORT for gRPC). Same "
                        "images, log and scores from every backend")
    p.add_argument("--compile", action="store_true",
                   help="torch backend: run the U-Net through torch.compile (compiles on the first batch; faster "
                        "after, see the backends benchmark)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dicom", action="store_true", help="also write DICOM files")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--grid", action="store_true",
                   help="instead of --prompt/--finding: one row per finding (and a normal row), --n columns; "
                        "writes OUT/grid.png as well as the images")
    p.add_argument("--score", action="store_true",
                   help="score every image with the default reward models (every one trained under --reward-dir) "
                        "and add the scores (and their weighted 'combined') to generation.jsonl and to each "
                        "image's provenance")
    p.add_argument("--reward-dir", default=None, help="folder of reward folders for --score (default: models/rewards)")
    p.set_defaults(func=run)


def grid_prompts(seed: int) -> list[tuple[str, str, list]]:
    """(row label, prompt, findings): a normal study and one typical variant of every finding kind."""
    from .findings import KINDS
    from .simulator.sheet import variant

    rows = [("no finding", findings_prompt([], seed), [])]
    for kind in KINDS:
        f = variant(kind, 0)
        rows.append((f[0].describe(), findings_prompt(list(f), seed), list(f)))
    return rows


def read_data_prompts(root: str, split: str, limit: int) -> list[tuple[str, list]]:
    """(prompt, true findings) of the first ``limit`` studies of ``split`` in a simulated data set."""
    from .findings import Finding

    path = Path(root) / "ground_truth.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"--prompts-from {root}: no ground_truth.jsonl (not a cxrgen simulate folder); "
                                f"use --prompts-file for other data")
    out = []
    with path.open() as f:
        for line in f:
            row = json.loads(line)
            if row.get("split") == split:
                found = [Finding.from_record(d) for d in row["findings"]]
                out.append((row["prompt"], found))
                if len(out) == limit:
                    break
    if not out:
        raise ValueError(f"--prompts-from {root}: no studies in split {split!r}")
    return out


def read_generation_log(folder: str | Path, strict: bool = True) -> dict[str, dict]:
    """``folder/generation.jsonl`` (what ``run`` writes) as {file name: last record}; {} when absent.

    A malformed line is a ValueError naming file and line, or with ``strict=False`` skipped (a torn
    line of an interrupted run, where each image's own provenance still holds).
    """
    path = Path(folder) / "generation.jsonl"
    if not path.is_file():
        return {}
    out = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if not strict:
                continue
            raise ValueError(f"{path}: line {n}: invalid JSON: {e}") from None
        if not isinstance(rec, dict) or "file" not in rec:
            if not strict:
                continue
            raise ValueError(f"{path}: line {n}: expected an object with a 'file' key")
        out[str(rec["file"])] = rec
    return out


def read_prompts_file(path: str) -> list[tuple[str, list]]:
    """(prompt, findings) pairs from a .jsonl ({"prompt", "findings"} per line) or .txt (a prompt per line)."""
    from .data.reports import findings_from_text
    from .findings import Finding

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--prompts-file {p} does not exist")
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if p.suffix != ".jsonl":
            out.append((line.strip(), findings_from_text(line)))
            continue
        try:
            row = json.loads(line)
            prompt = row["prompt"]
            findings = [Finding.from_dict(f) for f in row["findings"]] if "findings" in row \
                else findings_from_text(prompt)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"--prompts-file {p} line {n}: expected {{\"prompt\": str, \"findings\": [...]}}: "
                             f"{type(e).__name__}: {e}") from None
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"--prompts-file {p} line {n}: empty prompt")
        out.append((prompt, findings))
    if not out:
        raise ValueError(f"--prompts-file {p} has no prompts")
    return out


def save_grid(images, labels: list[str], n: int, path: Path) -> None:
    from PIL import Image, ImageDraw, ImageFont

    h, w = images.shape[1:]
    head = 150
    sheet = Image.new("L", (head + n * w, len(labels) * h), color=255)
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default(size=11)
    for r, label in enumerate(labels):
        draw.text((4, r * h + h // 2 - 6), label[:26], fill=0, font=font)
        for c in range(n):
            tile = (images[r * n + c] * 255).round().astype("uint8")
            sheet.paste(Image.fromarray(tile, mode="L"), (head + c * w, r * h))
    sheet.save(path)


# Provenance fields an image already in OUT must share with this run's image of the same name to be kept.
RESUME_FIELDS = ("prompt", "seed", "model_version", "negative_prompt", "steps", "guidance_scale", "scheduler",
                 "height", "width", "findings")


def finished_images(out: Path, names: list[str], expected, scored: bool) -> set[int]:
    """Indices of NAMES that an earlier run of the same command already wrote to OUT (logged in
    generation.jsonl and on disk), so a resumed run skips them. ``expected(i)`` is this run's record of
    image i. An image of another generation under the same name is a ValueError: nothing is overwritten."""
    logged = read_generation_log(out, strict=False)
    done = set()
    for i, name in enumerate(names):
        rec = logged.get(name)
        if rec is None or not (out / name).is_file():
            continue
        want = expected(i)
        differ = [k for k in RESUME_FIELDS if rec.get(k) != want[k]]
        if scored and not rec.get("scores"):
            differ.append("scores")
        if differ:
            raise ValueError(f"--out {out} already holds {name} from another generation ({', '.join(differ)} "
                             f"differ); give a new --out, or the same arguments to resume that run")
        done.add(i)
    return done


def drop_torn_line(path: Path) -> None:
    """Cut a generation log back to its last whole line. ``run`` writes whole lines only, so an interruption can
    tear only the last one; its image is then not counted as made, and is made again by the resumed run."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def contiguous_batches(indices: list[int], size: int) -> list[list[int]]:
    """INDICES (ascending) in runs of consecutive numbers, each cut into pieces of at most SIZE."""
    out: list[list[int]] = []
    for i in indices:
        if out and out[-1][-1] == i - 1 and len(out[-1]) < size:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def check_args(args: argparse.Namespace) -> None:
    if args.grid and (args.prompt or args.finding):
        raise ValueError("--grid makes its own prompts: drop --prompt / --finding")
    if args.grid and (args.prompts_file or args.prompts_from):
        raise ValueError("--grid makes its own prompts: drop --prompts-file / --prompts-from")
    if not (args.prompt or args.finding or args.grid or args.prompts_file or args.prompts_from):
        raise ValueError("give at least one --prompt, --finding, --prompts-file or --prompts-from")
    for name, lo, hi in (("n", 1, 10_000), ("steps", 1, 1000), ("batch_size", 1, 256), ("limit", 1, 1_000_000)):
        v = getattr(args, name)
        if not lo <= v <= hi:
            raise ValueError(f"--{name.replace('_', '-')} must be in [{lo}, {hi}], got {v}")
    if args.guidance < 0:
        raise ValueError(f"--guidance must be >= 0, got {args.guidance}")
    if args.scheduler not in SCHEDULERS:
        raise ValueError(f"unknown --scheduler {args.scheduler!r}; known: {sorted(SCHEDULERS)}")
    if args.backend is not None and args.backend not in backend_names():
        raise ValueError(f"unknown --backend {args.backend!r}; known: {backend_names()}")
    model = Path(args.model) if args.model else DEFAULT_MODEL
    if not model.exists():
        raise FileNotFoundError(f"no model at {model}; pass --model PATH (a checkpoint folder from cxrgen train)")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    from .provenance import Provenance, save_dicom, save_png

    from .data.reports import findings_from_text

    # (prompt, findings): structured findings where given, else read from the prompt's text.
    prompts = [(p, findings_from_text(p)) for p in args.prompt]
    if args.finding:
        found = [parse_finding(f) for f in args.finding]
        prompts.append((findings_prompt(found, args.seed), found))
    if args.prompts_file:
        prompts += read_prompts_file(args.prompts_file)
    if args.prompts_from:
        prompts += read_data_prompts(args.prompts_from, args.split, args.limit)
    rows = grid_prompts(args.seed) if args.grid else []
    prompts += [(p, f) for _, p, f in rows]
    model = Path(args.model) if args.model else DEFAULT_MODEL
    exported = is_export_folder(model) or is_triton_repository(model)
    if args.score and (not exported or args.reward_dir):  # load the rewards first: a missing one fails
        from .reward.base import generation_scorer          # before minutes of sampling

        scorer = generation_scorer(args.reward_dir, args.device)
    if args.compile and (args.backend or default_backend(model)) != "torch":
        raise ValueError("--compile applies to the torch backend only")
    backend = load_backend(args.backend, model, args.device, **({"compile": True} if args.compile else {}))
    if args.score and exported and not args.reward_dir:  # the export's own reward graphs
        scorer = backend.scorer()
        if scorer is None:
            raise ValueError(f"--score: {model} has no reward graphs (exported with --no-rewards); "
                             f"pass --reward-dir or re-export with rewards")
    backend.set_scheduler(args.scheduler)
    size = args.size or backend.native_size
    all_prompts = [p for p, _ in prompts for _ in range(args.n)]
    all_findings = [[f.to_dict() for f in found] for _, found in prompts for _ in range(args.n)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    version = backend.version

    def record(i: int, score: dict) -> Provenance:
        return Provenance(model_version=version, model_path=str(model), seed=args.seed + i, prompt=all_prompts[i],
                          negative_prompt=args.negative_prompt, steps=args.steps, guidance_scale=args.guidance,
                          scheduler=args.scheduler, height=size, width=size, findings=all_findings[i], scores=score)

    names = [f"{i:04d}_seed{args.seed + i}.png" for i in range(len(all_prompts))]
    log_path = out / "generation.jsonl"
    drop_torn_line(log_path)
    done = finished_images(out, names, lambda i: record(i, {}).to_dict(), args.score)
    todo = [i for i in range(len(all_prompts)) if i not in done]
    # Written batch by batch: an interrupted run keeps what it made, and the same command resumes after it.
    for chunk in contiguous_batches(todo, args.batch_size):
        start = chunk[0]
        images = backend.generate([all_prompts[i] for i in chunk], args.seed + start, args.steps, args.guidance,
                                  args.negative_prompt, args.batch_size, size)
        scores = (scorer(images, [all_prompts[i] for i in chunk], [all_findings[i] for i in chunk]) if args.score
                  else [{} for _ in chunk])
        with open(log_path, "a") as log:
            for i, img, score in zip(chunk, images, scores):
                prov = record(i, score)
                path = save_png(img, out / names[i], prov)
                if args.dicom:
                    save_dicom(img, path.with_suffix(".dcm"), prov)
                log.write(json.dumps({"file": path.name, **prov.to_dict()}) + "\n")
    if rows:
        import numpy as np
        from PIL import Image

        images = np.stack([np.asarray(Image.open(out / name), dtype=np.float32) / 255.0 for name in names])
        save_grid(images, [label for label, _, _ in rows], args.n, out / "grid.png")
    print(json.dumps({"out": str(out), "images": len(names), "resumed": len(done), "model": version,
                      "backend": backend.name}))
    return 0
