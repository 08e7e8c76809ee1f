"""The panel's eyes: ``Panel.assess(images, findings) -> list[Assessment]``.

An assessment holds the continuous evidence a radiologist weighs for each criterion of the
feedback store's fixed list, computed once per image; each rater then applies its own thresholds
(``training.expert.raters``). Evidence is a normal score against real simulated films, in two
calibration levels: per kind (``calibrate.Tail``: a presence logit against real films showing the
kind), then per criterion (``calibrate.QuantileMap`` of the per-image worst value on real films).
0 is a typical real film; 2.33 is worse than ~99 % of real films, 3.0 than ~99.9 %.

Per prompted finding (``FindingEvidence``):
  absent   how far the reader's presence logit lies below that of real films showing the kind
  side     how far the left / right logits disagree with the prompted side (None: no side prompted)
  size     how far the expected severity (probability-weighted grade) is from the prompted grade
Per image:
  unprompted  the strongest major kind that was not prompted (nor a look-alike of a prompted one)
  anatomy     the worst anatomy feature's distance outside its real-film band
  posture     predicted rotation sqrt(roll^2 + yaw^2 + pitch^2) against real films (``posture_deg``:
              the angle itself, for comments)
  artefact    the realism critic's logit against real films
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from training.artifacts import jsonable as _jsonable, read_meta, read_safetensors
from training.evaluate.judge import POSE_KEYS, ROTATION_KEYS
from training.findings import KINDS, Finding

from . import anatomy
from .calibrate import QuantileMap, Tail, pick
from .config import (CRITERIA, FORMAT_VERSION, GRADED_KINDS, KIND_NAMES, MAJOR_KINDS, PANEL_FILE, SEVERITIES,
                     SIDED_KINDS, WEIGHTS_FILE, related)
from .nets import Critic, Reader


@dataclasses.dataclass(frozen=True)
class FindingEvidence:
    """Evidence about one prompted finding, in real-film standard deviations."""

    finding: Finding
    absent: float  # presence logit below real positives of the kind
    side: float | None  # side logits against the prompted side; None when no side was prompted
    size: float | None  # grade error against real films; None when no severity was prompted


@dataclasses.dataclass(frozen=True)
class Assessment:
    """What the panel sees in one image, before any rater's threshold."""

    findings: tuple[FindingEvidence, ...]
    unprompted: float  # strongest unprompted major kind (z); -inf when every kind was prompted
    unprompted_kind: str | None
    anatomy: float  # z of the worst feature's excess
    anatomy_feature: str  # that feature's name
    posture: float  # predicted rotation against real films' (z)
    posture_deg: float  # predicted rotation, degrees
    artefact: float  # critic logit z
    presence: dict[str, float]  # reader probability per kind (for reports and comments)
    pose: dict[str, float]  # predicted pose, physical units

    def evidence(self) -> dict[str, float | None]:
        """Criterion -> the image's worst evidence (None where the criterion does not apply)."""
        def worst(name):
            vals = [getattr(f, name) for f in self.findings if getattr(f, name) is not None]
            return max(vals) if vals else None

        return {"finding_absent": worst("absent"), "wrong_side": worst("side"), "wrong_size": worst("size"),
                "unprompted_finding": self.unprompted if math.isfinite(self.unprompted) else None,
                "anatomy": self.anatomy, "posture": self.posture, "artefact": self.artefact}


# Calibration entries (panel.json "calibration"): per-kind tails, and single tails. "criteria" (optional)
# holds the second level: the tail of each criterion's per-image worst evidence on real films.
TAIL_GROUPS = ("presence_pos", "presence_neg", "side_on", "side_off", "size")
TAILS = ("anatomy", "artefact")


class Panel:
    """Reader + critic + anatomy bands + calibration, loaded from one folder (models/panel)."""

    def __init__(self, reader: Reader, critic: Critic, mean_film: torch.Tensor, meta: dict) -> None:
        self.reader, self.critic = reader.eval(), critic.eval()
        self.mean_film = mean_film
        self.meta = meta
        self.tails: dict = {}
        self.bands: dict = {}
        if "calibration" in meta:  # absent only while ``train`` is calibrating a new panel
            self.set_calibration(meta["calibration"])

    def set_calibration(self, cal: dict) -> None:
        """Install real-film tails and anatomy bands (the "calibration" entry of panel.json)."""
        try:
            tails = {k: {n: Tail.from_dict(t) for n, t in cal[k].items()} for k in TAIL_GROUPS}
            tails.update({k: Tail.from_dict(cal[k]) for k in TAILS})
            tails["criteria"] = {c: QuantileMap.from_dict(t) for c, t in cal.get("criteria", {}).items()}
            bands = {k: [float(v[0]), float(v[1])] for k, v in cal["anatomy_bands"].items()}
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"panel calibration is incomplete or malformed: {e!r}") from None
        missing = [k for k in anatomy.FEATURE_NAMES if k not in bands]
        if missing:
            raise ValueError(f"panel calibration has no anatomy band for {missing}")
        self.tails, self.bands = tails, bands
        self.meta["calibration"] = cal

    @property
    def version(self) -> str:
        return str(self.meta.get("version", "unknown"))

    # ------------------------------------------------------------------------------ raw read

    @torch.no_grad()
    def read(self, images: torch.Tensor, batch_size: int = 64) -> dict[str, np.ndarray]:
        """Raw outputs for (N, 1, H, W) images in [-1, 1]: presence / side logits, severity
        probabilities, pose, critic logit and anatomy features (numpy, CPU)."""
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"expected (N, 1, H, W) images in [-1, 1], got shape {tuple(images.shape)}")
        dev = self.reader.pose_mean.device
        parts: dict[str, list] = {k: [] for k in ("presence", "side", "severity", "pose", "critic", "anatomy")}
        for i in range(0, images.shape[0], batch_size):
            x = images[i:i + batch_size].float().to(dev)
            out = self.reader(x)
            parts["presence"].append(out["presence"].cpu())
            parts["side"].append(out["side"].cpu())
            parts["severity"].append(torch.softmax(out["severity"], -1).cpu())
            parts["pose"].append(out["pose"].cpu())
            parts["critic"].append(self.critic(x).cpu())
            parts["anatomy"].append(anatomy.features(x.cpu(), self.mean_film))
        empty = {"presence": (0, len(KIND_NAMES)), "side": (0, len(SIDED_KINDS), 2),
                 "severity": (0, len(GRADED_KINDS), 3), "pose": (0, len(POSE_KEYS)), "critic": (0,),
                 "anatomy": (0, len(anatomy.FEATURE_NAMES))}
        return {k: (torch.cat(v).double().numpy() if v else np.zeros(empty[k])) for k, v in parts.items()}

    # ------------------------------------------------------------------------------ evidence

    def assess(self, images: torch.Tensor, findings: Sequence[Sequence[Finding | Mapping]],
               batch_size: int = 64) -> list[Assessment]:
        """One ``Assessment`` per image, against that image's prompted findings."""
        if not self.tails:
            raise ValueError("the panel is not calibrated (panel.json has no calibration)")
        if len(findings) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(findings)} finding lists")
        raw = self.read(images, batch_size)
        excess = anatomy.excess(raw["anatomy"], self.bands)
        return [self._assess_one(raw, excess, i, [Finding.from_record(f) for f in fs])
                for i, fs in enumerate(findings)]

    def _z2(self, criterion: str, z: float) -> float:
        """Second calibration level: a per-item value against the real-film quantiles of the criterion's
        per-image worst value (``calibrate.QuantileMap``). An image is checked against several kinds
        (unprompted: ten; side: two channels), and the worst of ten z-scores exceeds 2.3 far more
        often than one does; this monotone map keeps a threshold's meaning per criterion: 2.33 fails
        ~1 % of real films, 3.0 ~0.1 %."""
        t = self.tails.get("criteria", {}).get(criterion)
        return float(t.z(z)) if t is not None else float(z)

    def _assess_one(self, raw: dict, excess: np.ndarray, i: int, prompted: list[Finding]) -> Assessment:
        t = self.tails
        presence = {k: float(raw["presence"][i, j]) for j, k in enumerate(KIND_NAMES)}
        evid = tuple(self._finding_evidence(raw, i, f) for f in prompted)
        excluded = set().union(*(related(f.kind) for f in prompted)) if prompted else set()
        unprompted = [(float(pick(t["presence_neg"], k).z(presence[k])), k) for k in MAJOR_KINDS if k not in excluded]
        worst_u = max(unprompted) if unprompted else (-math.inf, None)
        j = int(np.argmax(excess[i]))
        pose = {k: float(raw["pose"][i, n]) for n, k in enumerate(POSE_KEYS)}
        rotation = math.sqrt(sum(pose[k] ** 2 for k in ROTATION_KEYS))
        return Assessment(
            findings=evid, unprompted_kind=worst_u[1],
            unprompted=self._z2("unprompted_finding", worst_u[0]) if worst_u[1] else -math.inf,
            anatomy=self._z2("anatomy", t["anatomy"].z(excess[i, j])), anatomy_feature=anatomy.FEATURE_NAMES[j],
            posture=self._z2("posture", rotation), posture_deg=rotation,
            artefact=self._z2("artefact", t["artefact"].z(raw["critic"][i])),
            presence={k: 1 / (1 + math.exp(-v)) for k, v in presence.items()}, pose=pose,
        )

    def _finding_evidence(self, raw: dict, i: int, f: Finding) -> FindingEvidence:
        t = self.tails
        absent = float(pick(t["presence_pos"], f.kind).z(raw["presence"][i, KIND_NAMES.index(f.kind)]))
        side = size = None
        if f.kind in SIDED_KINDS and f.side is not None:
            logits = raw["side"][i, SIDED_KINDS.index(f.kind)]
            expected = (f.side.value in ("left", "bilateral"), f.side.value in ("right", "bilateral"))
            side = max(float(pick(t["side_on" if e else "side_off"], f.kind).z(v)) for e, v in zip(expected, logits))
            side = self._z2("wrong_side", side)
        if f.kind in GRADED_KINDS and f.severity is not None:
            probs = raw["severity"][i, GRADED_KINDS.index(f.kind)]
            error = abs(float(np.dot(probs, np.arange(len(SEVERITIES)))) - SEVERITIES.index(f.severity.value))
            size = self._z2("wrong_size", pick(t["size"], f.kind).z(error))
        return FindingEvidence(f, self._z2("finding_absent", absent), side, size)

    # ------------------------------------------------------------------------------ files

    def save(self, folder: str | Path) -> Path:
        """Write panel.safetensors and panel.json (version = hash of the weights) into ``folder``."""
        from safetensors.torch import save_file

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        state = {f"reader.{k}": v for k, v in self.reader.state_dict().items()}
        state.update({f"critic.{k}": v for k, v in self.critic.state_dict().items()})
        state["mean_film"] = self.mean_film
        state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        save_file(state, str(out / WEIGHTS_FILE))
        os.chmod(out / WEIGHTS_FILE, 0o644)  # safetensors writes 0600; the folder is shared / committed
        self.meta["weights"] = WEIGHTS_FILE
        self.meta["reader"] = {"size": self.reader.size, "width": self.reader.width,
                               "parameters": sum(p.numel() for p in self.reader.parameters())}
        self.meta["critic"] = {"size": self.critic.size, "sigma": self.critic.sigma,
                               "parameters": sum(p.numel() for p in self.critic.parameters())}
        # The version names what decides a rating: the weights and the calibration.
        digest = hashlib.sha256((out / WEIGHTS_FILE).read_bytes())
        digest.update(json.dumps(_jsonable(self.meta.get("calibration", {})), sort_keys=True).encode())
        self.meta["version"] = "panel-" + digest.hexdigest()[:12]
        path = out / PANEL_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_jsonable(self.meta), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu") -> "Panel":
        """Load a panel folder; missing is FileNotFoundError, corrupt or incompatible ValueError."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"panel folder not found: {folder} (train one: cxrgen expert train)")
        meta = _read_meta(folder / PANEL_FILE)
        state = _read_weights(folder / meta["weights"])
        try:
            reader = Reader(int(meta["reader"]["size"]), int(meta["reader"]["width"]))
            critic = Critic(int(meta["critic"]["size"]), float(meta["critic"]["sigma"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{folder / PANEL_FILE}: bad reader / critic entry: {e!r}") from None
        try:
            reader.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("reader.")})
            critic.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("critic.")})
            mean = state["mean_film"]
        except (RuntimeError, KeyError) as e:
            raise ValueError(f"{folder / meta['weights']}: weights do not fit panel.json: {e}") from None
        return cls(reader.to(device), critic.to(device), mean, meta)


def _read_meta(path: Path) -> dict:
    meta = read_meta(path, "panel.json", ("weights", "reader", "critic", "calibration", "kinds"), FORMAT_VERSION,
                     " (train a panel: cxrgen expert train)")
    if list(meta["kinds"]) != list(KIND_NAMES) or list(meta.get("criteria", CRITERIA)) != list(CRITERIA):
        raise ValueError(f"{path}: the panel's kinds / criteria differ from training.findings.KINDS / CRITERIA")
    return meta


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(path, "panel")


KIND_PHRASES = {k: s.phrase for k, s in KINDS.items()}
