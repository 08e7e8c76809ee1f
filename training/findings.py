"""One vocabulary of findings for all of cxrgen (issue 2, section 2).

Labels are CheXpert's 14 observations, spelled exactly as MIMIC-CXR-JPG's
``mimic-cxr-2.0.0-chexpert.csv`` and torchxrayvision spell them. A ``Finding`` is
one concrete abnormality with laterality / severity / location where it applies;
data, rewards, evaluation, API and UI all speak in these two terms.

CheXpert label values (Irvin et al. 2019): 1 positive, 0 negative, -1 uncertain,
blank = not mentioned.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Iterable, Mapping

OBSERVATIONS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

# CheXpert's label hierarchy (Irvin et al. 2019, fig. 2): a child implies its parent.
PARENT: dict[str, str] = {
    "Cardiomegaly": "Enlarged Cardiomediastinum",
    "Edema": "Lung Opacity",
    "Consolidation": "Lung Opacity",
    "Pneumonia": "Lung Opacity",
    "Lung Lesion": "Lung Opacity",
    "Atelectasis": "Lung Opacity",
}


class Laterality(str, enum.Enum):
    LEFT = "left"
    RIGHT = "right"
    BILATERAL = "bilateral"


class Severity(str, enum.Enum):
    SMALL = "small"
    MODERATE = "moderate"
    LARGE = "large"


# Lung lobes as the CT label map names them (left has no middle lobe; the lingula
# is part of the left upper lobe).
LOBES: dict[str, Laterality] = {
    "RUL": Laterality.RIGHT,
    "RML": Laterality.RIGHT,
    "RLL": Laterality.RIGHT,
    "LUL": Laterality.LEFT,
    "LLL": Laterality.LEFT,
}


@dataclasses.dataclass(frozen=True)
class Kind:
    """A concrete finding the simulator can render, and what it means in CheXpert terms."""

    name: str
    observations: tuple[str, ...]  # CheXpert observations it makes positive (parents added)
    sided: bool  # takes a laterality
    graded: bool  # takes a severity
    lobar: bool  # takes a lobe
    phrase: str  # how a radiologist names it in a report


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("cardiomegaly", ("Cardiomegaly",), False, True, False, "cardiomegaly"),
        Kind("pleural_effusion", ("Pleural Effusion",), True, True, False, "pleural effusion"),
        Kind("pneumothorax", ("Pneumothorax",), True, True, False, "pneumothorax"),
        Kind("nodule", ("Lung Lesion",), False, False, True, "pulmonary nodule"),
        Kind("mass", ("Lung Lesion",), False, False, True, "lung mass"),
        Kind("calcified_granuloma", ("Lung Lesion",), False, False, True, "calcified granuloma"),
        Kind("consolidation", ("Consolidation",), False, False, True, "consolidation"),
        Kind("pneumonia", ("Pneumonia", "Consolidation"), False, False, True, "pneumonia"),
        Kind("atelectasis", ("Atelectasis",), True, True, False, "atelectasis"),
        Kind("edema", ("Edema",), False, True, False, "pulmonary edema"),
        Kind("endotracheal_tube", ("Support Devices",), False, False, False, "endotracheal tube"),
        Kind("central_line", ("Support Devices",), True, False, False, "central venous catheter"),
    )
}


@dataclasses.dataclass(frozen=True)
class Finding:
    """One abnormality: a simulator kind plus where and how much."""

    kind: str
    side: Laterality | None = None
    severity: Severity | None = None
    lobe: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown finding kind {self.kind!r}; known: {sorted(KINDS)}")
        spec = KINDS[self.kind]
        # Coerce strings so JSON round-trips and callers can pass "left".
        if self.side is not None:
            object.__setattr__(self, "side", Laterality(self.side))
        if self.severity is not None:
            object.__setattr__(self, "severity", Severity(self.severity))
        if self.lobe is not None and self.lobe not in LOBES:
            raise ValueError(f"unknown lobe {self.lobe!r}; known: {sorted(LOBES)}")
        if self.side is not None and not spec.sided and not spec.lobar:
            raise ValueError(f"{self.kind} takes no laterality")
        if self.severity is not None and not spec.graded:
            raise ValueError(f"{self.kind} takes no severity")
        if self.lobe is not None and not spec.lobar:
            raise ValueError(f"{self.kind} takes no lobe")
        if spec.lobar and self.lobe is not None:
            object.__setattr__(self, "side", LOBES[self.lobe])

    def to_dict(self) -> dict:
        d = {"kind": self.kind}
        for f in ("side", "severity", "lobe"):
            v = getattr(self, f)
            if v is not None:
                d[f] = v.value if isinstance(v, enum.Enum) else v
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "Finding":
        unknown = set(d) - {"kind", "side", "severity", "lobe"}
        if unknown:
            raise ValueError(f"unknown finding field(s) {sorted(unknown)}")
        return cls(d["kind"], d.get("side"), d.get("severity"), d.get("lobe"))

    @classmethod
    def from_record(cls, d: "Mapping | Finding") -> "Finding":
        """A Finding from any record that carries one: a Finding, or a dict whose other keys are ignored
        (the simulator's ground truth adds rendering ``params``; ``from_dict`` stays strict for the wire)."""
        if isinstance(d, Finding):
            return d
        return cls.from_dict({k: d[k] for k in ("kind", "side", "severity", "lobe") if d.get(k) is not None})

    def describe(self) -> str:
        """Short human text, e.g. 'moderate left pleural effusion'."""
        words = [self.severity.value if self.severity else None]
        if self.lobe:
            words.append(LOBE_NAMES[self.lobe])
        elif self.side:
            words.append(self.side.value)
        words.append(KINDS[self.kind].phrase)
        return " ".join(w for w in words if w)


LOBE_NAMES = {
    "RUL": "right upper lobe",
    "RML": "right middle lobe",
    "RLL": "right lower lobe",
    "LUL": "left upper lobe",
    "LLL": "left lower lobe",
}


def labels(findings: Iterable[Finding]) -> dict[str, float]:
    """CheXpert labels (1.0 / 0.0) for a set of findings, parents included.

    The simulator knows the truth, so there are no uncertain (-1) or blank labels:
    every observation is 1 or 0, and No Finding is 1 exactly when nothing else is.
    Support devices do not cancel No Finding in CheXpert's labeler (No Finding
    excludes pathologies only), so the same holds here.
    """
    out = {o: 0.0 for o in OBSERVATIONS}
    for f in findings:
        for o in KINDS[f.kind].observations:
            out[o] = 1.0
            if o in PARENT:
                out[PARENT[o]] = 1.0
    pathological = [o for o in OBSERVATIONS if o not in ("No Finding", "Support Devices") and out[o]]
    out["No Finding"] = 0.0 if pathological else 1.0
    return out


def check_oversample(factors: Mapping[str, int], flag: str = "--oversample", kinds: bool = False) -> None:
    """``{name: K}`` of ``oversampled``: each name a CheXpert label (or, with ``kinds``, a simulator kind), each K
    an integer >= 1; a ValueError naming the flag and the entry otherwise."""
    for name, factor in factors.items():
        if name not in OBSERVATIONS and not (kinds and name in KINDS):
            known = list(OBSERVATIONS) + (sorted(KINDS) if kinds else [])
            raise ValueError(f"{flag}: unknown {'label or kind' if kinds else 'label'} {name!r}; known: {known}")
        if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
            raise ValueError(f"{flag} {name}: the factor must be an integer >= 1, got {factor!r}")


def oversampled(labels, factors: Mapping[str, int], kinds: list[Iterable[str]] | None = None) -> list[int]:
    """Data set indices, each image repeated by the largest factor among what it shows (1 if none).

    ``labels`` (N, 14) in OBSERVATIONS order: an image shows a label where it is 1 (not uncertain / NaN).
    ``kinds`` (one iterable of simulator kind names per image, from the simulator's ground truth) lets a factor
    name a kind instead: ``{"nodule": 4}`` repeats nodules without repeating the granulomas that make Lung
    Lesion positive too.
    """
    import numpy as np

    labels = np.asarray(labels)
    reps = np.ones(len(labels), dtype=np.int64)
    for name, k in factors.items():
        if name in OBSERVATIONS:
            hit = labels[:, OBSERVATIONS.index(name)] == 1.0
        elif kinds is not None:
            hit = np.array([name in set(ks) for ks in kinds], dtype=bool)
        else:
            raise ValueError(f"oversampling by the kind {name!r} needs the simulator's ground truth")
        reps = np.where(hit, np.maximum(reps, k), reps)
    return np.repeat(np.arange(len(labels)), reps).tolist()


def oversample_indices(ds, factors: dict[str, int]) -> list[int]:
    """``ds``'s indices, each repeated by the largest factor among the labels and simulator kinds it shows.

    Reads ``ds.labels`` and the ground truth ``MimicCXRDataset`` keeps (``return_ground_truth=True``) without
    decoding images; other data sets are asked sample by sample.
    """
    import torch

    table, gt = getattr(ds, "labels", None), getattr(ds, "ground_truth", None)
    if table is not None and (gt is not None or not any(k in KINDS for k in factors)):
        rows = [gt[d] for d in ds.frame["dicom_id"]] if gt is not None else None
    else:
        samples = [ds[i] for i in range(len(ds))]
        table = torch.stack([s["labels"] for s in samples]).numpy()
        rows = [s.get("ground_truth") for s in samples]
    kinds = None
    if any(k in KINDS for k in factors):
        if rows is None or any(r is None for r in rows):
            raise ValueError("oversampling by a simulator kind needs simulator data loaded with "
                             "return_ground_truth=True")
        kinds = [[f["kind"] for f in r.get("findings", [])] for r in rows]
    return oversampled(table, factors, kinds)
