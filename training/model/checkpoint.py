"""Checkpoints: a diffusers pipeline folder plus ``cxrgen_manifest.json``.

The folder is the one hand-off between training, export and service (DESIGN.md). It is
exactly what ``StableDiffusionPipeline.save_pretrained`` writes, so a real Stable
Diffusion 1.x / 2.x or RoentGen folder loads through the same ``load_pipeline``; such a
foreign folder simply has no manifest. Loading validates the layout first and names
what is missing or corrupt instead of failing deep inside diffusers.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
from pathlib import Path

MANIFEST = "cxrgen_manifest.json"
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHTS = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
             "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.fp16.safetensors"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
            "diffusion_pytorch_model.fp16.safetensors"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                     "model.fp16.safetensors"),
}
CONFIGS = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
           "scheduler": "scheduler_config.json"}


class CheckpointError(ValueError):
    """A checkpoint folder that is missing pieces or cannot be read; the message names them."""


@dataclasses.dataclass
class Manifest:
    version: str  # this checkpoint's version, e.g. "tiny-v1"
    stage: str  # "init", "finetune", "reward", "align", ...
    parent_version: str | None = None  # the checkpoint it was trained from
    data_fingerprint: str | None = None  # sha256 of the training data's tables (see data_fingerprint)
    config: dict = dataclasses.field(default_factory=dict)  # every config used to make it
    metrics: dict = dataclasses.field(default_factory=dict)  # evaluation metrics, when known
    created: str = dataclasses.field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat())
    format_version: int = 1
    # The ancestors, nearest first, back to the first model on record: [{version, stage, created}, ...]
    # (a child's is its parent's ``ancestry()``; manifests written before it existed have none).
    lineage: list = dataclasses.field(default_factory=list)

    def ancestry(self) -> list[dict]:
        """This checkpoint and its ancestors, nearest first, as far back as recorded: a child's ``lineage``."""
        own = {"version": self.version, "stage": self.stage, "created": self.created}
        older = self.lineage or ([{"version": self.parent_version}] if self.parent_version else [])
        return [own, *older]

    @classmethod
    def read(cls, folder: Path) -> "Manifest | None":
        path = Path(folder) / MANIFEST
        if not path.is_file():
            return None
        try:
            d = json.loads(path.read_text())
            return cls(**d)
        except (json.JSONDecodeError, TypeError) as e:
            raise CheckpointError(f"{path} is corrupt: {e}") from e

    def write(self, folder: Path) -> None:
        path = Path(folder) / MANIFEST
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2, default=str) + "\n")
        os.replace(tmp, path)


def lineage_from(parent: "Manifest | None", folder) -> list[dict]:
    """A child's ``lineage``: its parent's ``ancestry()``, or only the parent folder's name when that has no
    cxrgen manifest (a Stable Diffusion / RoentGen folder)."""
    return parent.ancestry() if parent else [{"version": str(folder)}]


def data_fingerprint(root: str | Path) -> str:
    """sha256 over a MIMIC-layout data set's tables (labels, views, splits): what it was trained on.

    The tables' decompressed content is hashed, not the .gz bytes, whose header holds a
    write time: the same data written twice has the same fingerprint.
    """
    import gzip

    root = Path(root)
    h = hashlib.sha256()
    for name in ("chexpert", "metadata", "split"):
        path = root / f"mimic-cxr-2.0.0-{name}.csv.gz"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: not a MIMIC-CXR-JPG layout data set")
        try:
            h.update(gzip.decompress(path.read_bytes()))
        except (OSError, EOFError) as e:
            raise ValueError(f"{path} is not a readable gzip file: {e}") from e
    return h.hexdigest()


def validate_folder(folder: str | Path) -> list[str]:
    """Problems with a pipeline folder's layout (empty list = loadable)."""
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder} is not a folder"]
    problems = []
    if not (folder / "model_index.json").is_file():
        problems.append(f"{folder / 'model_index.json'} is missing (not a diffusers pipeline folder)")
    for comp in COMPONENTS:
        sub = folder / comp
        if not sub.is_dir():
            problems.append(f"{sub}/ is missing")
            continue
        if comp in CONFIGS and not (sub / CONFIGS[comp]).is_file():
            problems.append(f"{sub / CONFIGS[comp]} is missing")
        if comp in WEIGHTS and not any((sub / w).is_file() for w in WEIGHTS[comp]):
            problems.append(f"{sub}/ has no weights (looked for {', '.join(WEIGHTS[comp][:2])})")
        elif comp in WEIGHTS:
            first = next(sub / w for w in WEIGHTS[comp] if (sub / w).is_file())  # the file loaders pick
            if first.suffix == ".safetensors" and (damage := safetensors_damage(first)):
                problems.append(damage)
        if comp == "tokenizer" and not ((sub / "tokenizer.json").is_file()
                                        or ((sub / "vocab.json").is_file() and (sub / "merges.txt").is_file())):
            problems.append(f"{sub}/ has neither tokenizer.json nor vocab.json + merges.txt")
    return problems


def safetensors_damage(path: Path) -> str | None:
    """Why a .safetensors file cannot be whole (empty, truncated by an interrupted copy, not safetensors), or
    None. Reads the header only: 8 bytes of length, then JSON whose tensors' data offsets must cover the rest
    of the file exactly (the format's own rule), so a cut-off file is named before a loader fails on it with
    a message that may not say which file (transformers' text encoder does not)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= size - 8:
                return f"{path} is damaged: {size} bytes, no safetensors header (an interrupted copy?)"
            meta = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        return f"{path} is damaged: unreadable safetensors header ({type(e).__name__})"
    if 8 + n + end != size:
        return (f"{path} is damaged: {size} bytes where its header describes {8 + n + end} (truncated by an "
                f"interrupted copy?)")
    return None


def load_pipeline(folder: str | Path, device: str = "cpu", dtype=None):
    """Load a checkpoint (cxrgen's or a real SD / RoentGen folder) -> (pipeline, manifest or None)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: local folders only
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    problems = validate_folder(folder)
    if problems:
        raise CheckpointError(f"cannot load {folder}: " + "; ".join(problems))
    manifest = Manifest.read(folder)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            local_files_only=True, torch_dtype=dtype)
    except Exception as e:  # diffusers raises many types; name the folder and the cause
        raise CheckpointError(f"cannot load {folder}: {type(e).__name__}: {e}") from e
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    from ..align.ace import attach_if_present

    attach_if_present(pipe, folder)  # an aligned checkpoint's condition tokens (issue 8), used by every consumer
    return pipe, manifest


def save_checkpoint(pipe, folder: str | Path, manifest: Manifest) -> Path:
    """``save_pretrained`` plus the manifest; the tokenizer also as CLIP's vocab.json + merges.txt."""
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    backend = getattr(pipe.tokenizer, "backend_tokenizer", None)
    if backend is not None and not (folder / "tokenizer" / "vocab.json").exists():
        backend.model.save(str(folder / "tokenizer"))  # older transformers / other tools read these
    manifest.write(folder)
    return folder
