"""Reward models: one plug-in signature, a registry by name, checkpoint folders (issue 7, section 3).

Every reward answers ``score(images, prompts, findings) -> tensor[N]`` in [0, 1]:

* ``images``: float (N, 1, H, W) in [-1, 1] (the generator's range; other sizes are resized);
* ``prompts``: N report texts;
* ``findings``: N lists of ``training.findings.Finding`` (what the prompt declares).

(kvablack/ddpo-pytorch's ``reward_fn(images, prompts, metadata)``, with the metadata
made explicit.) The kinds, each in its own module with its own small network:
``plausibility`` (Sun et al. 2023), ``comparative`` (Bradley-Terry on expert A/B
comparisons), and CXRL's (Han et al. 2024) ``posture``, ``diagnosis`` and
``consistency``. Every network also has a validity head trained against
``training.reward.corrupt``'s images, and a reward is ``sigmoid(validity) x base``:
the reward-hacking guard.

A trained reward is a folder: ``reward_manifest.json`` (kind, version, the store
cursor and URL it trained on, the training config, held-out metrics, created) and
``reward.safetensors``. ``load_reward("plausibility")`` reads
``models/rewards/plausibility/``; ``load_reward(path)`` any folder.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import importlib
import json
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch import nn

from training.artifacts import jsonable as _jsonable, read_meta, read_safetensors
from training.findings import Finding

from .config import DEFAULT_MODEL_DIR, REWARD_NAMES  # noqa: F401  (re-exported: rb.REWARD_NAMES)
from .nets import Trunk, prepare

MANIFEST = "reward_manifest.json"
WEIGHTS = "reward.safetensors"
WEIGHTS_CONFIG = "rewards.json"  # optional, in the model dir: {"combined": {name: weight}}
FORMAT_VERSION = 1
# Weights of the ``combined`` score when the model dir has no rewards.json: the expert-trained
# plausibility reward counts most (it is what the service returns as "plausibility").
DEFAULT_WEIGHTS: dict[str, float] = {"plausibility": 0.4, "comparative": 0.15, "posture": 0.15,
                                     "diagnosis": 0.15, "consistency": 0.15}


# ---------------------------------------------------------------------- the plug-in


class RewardNet(nn.Module):
    """A trunk and a validity head; each kind adds its own heads (and buffers it needs at scoring time)."""

    def __init__(self, image_size: int = 128, channels: Sequence[int] = (16, 32, 64, 128), features: int = 256):
        super().__init__()
        self.image_size = int(image_size)
        self.trunk = Trunk(tuple(channels), features)
        self.validity = nn.Linear(features, 1)
        self.config = {"image_size": int(image_size), "channels": list(channels), "features": int(features)}

    def validity_logit(self, h: torch.Tensor) -> torch.Tensor:
        return self.validity(h).squeeze(1)


class Reward:
    """A reward model: a network plus how to turn its outputs into a score in [0, 1].

    Subclasses set ``name`` and ``Net`` and implement ``base(net, h, prompts, findings)``
    (the score before the validity gate, in [0, 1]); ``forward`` keeps gradients
    (for methods that back-propagate through a reward), ``score`` does not.
    """

    name: ClassVar[str] = ""
    Net: ClassVar[type[RewardNet]] = RewardNet

    def __init__(self, net: RewardNet, manifest: dict | None = None, folder: Path | None = None) -> None:
        self.net, self.manifest, self.folder = net, manifest or {}, folder

    def base(self, h: torch.Tensor, prompts: Sequence[str], findings: Sequence[Sequence[Finding]]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor, prompts: Sequence[str] | None = None,
                findings: Sequence[Sequence[Finding]] | None = None) -> dict[str, torch.Tensor]:
        """{"score", "base", "validity"} (each (N,)); ``score = validity x base``."""
        prompts, findings = check_inputs(images, prompts, findings)
        device = next(self.net.parameters()).device
        h = self.net.trunk(prepare(images, self.net.image_size).to(device))
        validity = torch.sigmoid(self.net.validity_logit(h))
        base = self.base(h, prompts, findings)
        return {"score": validity * base, "base": base, "validity": validity}

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str] | None = None,
              findings: Sequence[Sequence[Finding]] | None = None) -> torch.Tensor:
        """Scores (N,) in [0, 1] on the CPU, in eval mode."""
        was = self.net.training
        self.net.eval()
        try:
            return self.forward(images, prompts, findings)["score"].float().cpu()
        finally:
            self.net.train(was)

    @property
    def version(self) -> str:
        return str(self.manifest.get("version", "untrained"))


def check_inputs(images, prompts, findings) -> tuple[list[str], list[list[Finding]]]:
    """Lengths agree with the batch; None means "" / no findings for every image."""
    n = images.shape[0] if isinstance(images, torch.Tensor) else None
    if n is None:
        raise ValueError(f"expected images as a tensor (N, 1, H, W), got {type(images).__name__}")
    prompts = [""] * n if prompts is None else [str(p) for p in prompts]
    findings = [[] for _ in range(n)] if findings is None else [list(f) for f in findings]
    if len(prompts) != n or len(findings) != n:
        raise ValueError(f"{n} images but {len(prompts)} prompts and {len(findings)} findings lists")
    return prompts, findings


# ------------------------------------------------------------------------ registry


def _module(name: str):
    if name not in REWARD_NAMES:
        raise ValueError(f"unknown reward {name!r}; known: {list(REWARD_NAMES)}")
    return importlib.import_module(f"training.reward.{name}")


def reward_class(name: str) -> type[Reward]:
    """The ``Reward`` subclass registered as ``name`` (modules import lazily: --help stays fast)."""
    return _module(name).REWARD


def trainer(name: str):
    """``train(cfg) -> Path`` of kind ``name``."""
    return _module(name).train


def parse_names(text: str | Sequence[str] | None) -> list[str]:
    """"a,b" or a list -> checked reward names (None: all); an unknown one is a ValueError listing the known."""
    if text is None:
        return list(REWARD_NAMES)
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    unknown = [n for n in names if n not in REWARD_NAMES]
    if unknown or not names:
        raise ValueError(f"unknown reward(s) {unknown or [text]}; known: {list(REWARD_NAMES)}")
    return names


# ----------------------------------------------------------------------- artifacts


def redact_url(url: str | None) -> str | None:
    """A database URL without its password (manifests are committed and shared)."""
    if not url:
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a SQLAlchemy URL: strip anything between ':' and '@' after the scheme
        return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def save_reward(reward: Reward, out: str | Path, *, config: Any, metrics: Mapping, data: Mapping) -> Path:
    """Write ``reward.safetensors`` and ``reward_manifest.json`` (atomically, manifest last); returns the folder."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in reward.net.state_dict().items()}
    tmp = out / (WEIGHTS + ".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, out / WEIGHTS)
    digest = hashlib.sha256((out / WEIGHTS).read_bytes()).hexdigest()
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    manifest = {
        "format": FORMAT_VERSION, "kind": reward.name, "version": f"{reward.name}-{digest[:12]}",
        "created": created, "weights": WEIGHTS, "weights_sha256": digest, "net": reward.net.config,
        "data": dict(data), "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config,
        "metrics": dict(metrics),
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(_jsonable(manifest), indent=2) + "\n")
    os.replace(tmp, out / MANIFEST)
    reward.manifest, reward.folder = _jsonable(manifest), out
    return out


def resolve(name_or_path: str | Path, model_dir: str | Path | None = None) -> Path:
    """A reward folder: an existing path, or a registered name under ``model_dir`` (models/rewards)."""
    p = Path(name_or_path)
    if p.exists():
        return p.parent if p.is_file() else p
    if str(name_or_path) in REWARD_NAMES:
        folder = Path(model_dir or DEFAULT_MODEL_DIR) / str(name_or_path)
        if not (folder / MANIFEST).is_file():
            raise FileNotFoundError(f"no trained {name_or_path} reward: {folder / MANIFEST} is missing; "
                                    f"train it with `cxrgen reward train --kind {name_or_path} --out {folder}`")
        return folder
    if os.sep in str(name_or_path) or str(name_or_path).startswith("."):
        raise FileNotFoundError(f"reward folder not found: {p}")
    raise ValueError(f"unknown reward {str(name_or_path)!r}; known: {list(REWARD_NAMES)} (or a reward folder path)")


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    manifest = read_meta(path, "reward manifest", ("kind", "net", "weights"), FORMAT_VERSION)
    if manifest["kind"] not in REWARD_NAMES:
        raise ValueError(f"{path}: unknown reward kind {manifest['kind']!r}; known: {list(REWARD_NAMES)}")
    return manifest


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(path, "reward")


def load_reward(name_or_path: str | Path, device: str | torch.device = "cpu",
                model_dir: str | Path | None = None) -> Reward:
    """Load a trained reward (eval mode) by name (``models/rewards/<name>/``) or folder path.

    Missing files are a FileNotFoundError naming them; a corrupt or incompatible
    manifest or weights file a ValueError naming it; an unknown name a ValueError
    listing the known ones.
    """
    folder = resolve(name_or_path, model_dir)
    manifest = read_manifest(folder)
    cls = reward_class(manifest["kind"])
    weights = folder / str(manifest["weights"])
    state = _read_weights(weights)
    try:
        net = cls.Net(**manifest["net"])
        net.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{weights}: weights do not fit the {manifest['kind']} network of {folder / MANIFEST}: "
                         f"{e}") from e
    return cls(net.to(device).eval(), manifest, folder)


# ------------------------------------------------------------------------ combining


_CACHE: dict[tuple, Reward] = {}


def cached_reward(name: str, model_dir: str | Path | None = None, device: str = "cpu") -> Reward:
    """``load_reward`` once per (folder, manifest mtime, device): scoring every image must not reload weights."""
    folder = resolve(name, model_dir)
    key = (str(folder.resolve()), (folder / MANIFEST).stat().st_mtime_ns, str(device))
    if key not in _CACHE:
        _CACHE[key] = load_reward(folder, device)
    return _CACHE[key]


def available(model_dir: str | Path | None = None) -> list[str]:
    """The registered rewards that have a trained folder under ``model_dir`` (the defaults)."""
    root = Path(model_dir or DEFAULT_MODEL_DIR)
    return [n for n in REWARD_NAMES if (root / n / MANIFEST).is_file()]


def combined_weights(model_dir: str | Path | None = None) -> dict[str, float]:
    """The ``combined`` entry of ``<model_dir>/rewards.json``, else DEFAULT_WEIGHTS."""
    path = Path(model_dir or DEFAULT_MODEL_DIR) / WEIGHTS_CONFIG
    if not path.is_file():
        return dict(DEFAULT_WEIGHTS)
    try:
        weights = json.loads(path.read_text(encoding="utf-8"))["combined"]
        parse_names(list(weights))
        return {str(k): float(v) for k, v in weights.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: expected {{\"combined\": {{reward name: weight}}}}: {e}") from e


def combine(scores: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor | None:
    """Weighted mean of the scores that have a positive weight (None when none has)."""
    used = {k: float(weights.get(k, 0.0)) for k in scores if float(weights.get(k, 0.0)) > 0}
    if not used:
        return None
    total = sum(used.values())
    return sum(scores[k] * (w / total) for k, w in used.items())


def score_all(images: torch.Tensor, prompts: Sequence[str] | None = None,
              findings: Sequence[Sequence[Finding]] | None = None, names: Sequence[str] | str | None = None,
              weights: Mapping[str, float] | None = None, model_dir: str | Path | None = None,
              device: str = "cpu", batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Every named reward's scores (N,) plus ``combined``, their weighted mean.

    ``names`` None: the rewards trained under ``model_dir`` (FileNotFoundError when
    there are none); ``weights`` None: the model dir's rewards.json ``combined``
    entry, else DEFAULT_WEIGHTS.
    """
    names = parse_names(names) if names is not None else available(model_dir)
    if not names:
        raise FileNotFoundError(f"no trained rewards under {Path(model_dir or DEFAULT_MODEL_DIR)}; "
                                f"train them with `cxrgen reward train --kind K`")
    prompts, findings = check_inputs(images, prompts, findings)
    out: dict[str, torch.Tensor] = {}
    for name in names:
        reward = cached_reward(name, model_dir, device)
        parts = [reward.score(images[i:i + batch_size], prompts[i:i + batch_size], findings[i:i + batch_size])
                 for i in range(0, images.shape[0], batch_size)]
        out[name] = torch.cat(parts) if parts else torch.zeros(0)
    both = combine(out, combined_weights(model_dir) if weights is None else weights)
    if both is not None:
        out["combined"] = both
    return out


def generation_scorer(model_dir: str | Path | None = None, device: str = "cpu"):
    """For ``cxrgen generate --score``: loads every default reward now (so a missing one fails before
    generating) and returns ``score(images, prompts, findings) -> list[dict name -> float]``.

    ``images``: (N, H, W) floats in [0, 1] as the generator returns them; ``findings``: finding dicts
    or ``Finding`` objects per image. Each dict holds every reward plus ``combined``.
    """
    from .data import parse_findings

    names = available(model_dir)
    if not names:
        raise FileNotFoundError(f"--score: no trained rewards under {Path(model_dir or DEFAULT_MODEL_DIR)}; "
                                f"train them with `cxrgen reward train --kind K` or pass --reward-dir")
    for n in names:
        cached_reward(n, model_dir, device)

    def score(images, prompts, findings) -> list[dict[str, float]]:
        x = torch.as_tensor(images, dtype=torch.float32)[:, None] * 2 - 1
        scores = score_all(x, list(prompts), [parse_findings(f) for f in findings], names, None, model_dir, device)
        return [{k: round(float(v[i]), 6) for k, v in scores.items()} for i in range(x.shape[0])]

    return score
