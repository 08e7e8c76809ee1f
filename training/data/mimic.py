"""MIMIC-CXR-JPG as a torch ``Dataset``: images, CheXpert labels, report prompts.

Reads real MIMIC-CXR-JPG (v2.0.0 / v2.1.0) and what cxrgen's simulator writes,
which uses the same layout::

    ROOT/
      files/p10/p10000032/s50414267/<dicom_id>.jpg
      files/p10/p10000032/s50414267.txt      # the study's report (simulator)
      mimic-cxr-2.0.0-chexpert.csv.gz        # per study: subject_id, study_id, 14 labels
      mimic-cxr-2.0.0-metadata.csv.gz        # per image: dicom_id, ..., ViewPosition
      mimic-cxr-2.0.0-split.csv.gz           # per image: dicom_id, ..., split
      ground_truth.jsonl                     # simulator only: one object per dicom_id

Real reports ship in the separate MIMIC-CXR release; they are looked up under
``report_root`` (default: ROOT, then ROOT.parent / "mimic-cxr-reports").

Label policy (torchxrayvision's, ``CheX_Dataset``), applied in this order:

1. CheXpert values are 1 (positive), 0 (negative), -1 (uncertain), blank (not
   mentioned). A study with no row in the CheXpert file is all blank.
2. Where "No Finding" is 1, every *blank* pathology becomes 0: the labeler only
   says "No Finding" when no pathology was found. Stated values are kept (an
   explicit 1 or -1 is not overwritten), and "Support Devices" is not cleared,
   because No Finding excludes pathologies, not devices (as in
   ``training.findings.labels`` and torchxrayvision's CheXpert loader; its MIMIC
   loader also zeroes devices and stated values, which we consider a bug).
3. -1 becomes NaN (``uncertain="nan"``, U-Ignore, torchxrayvision's default),
   0 (``"zero"``, U-Zeros) or 1 (``"one"``, U-Ones).
4. Remaining blanks become NaN (``blank="nan"``) or 0 (``blank="zero"``).

Labels come back as a float32 tensor of shape (14,) in ``findings.OBSERVATIONS``
order with a bool ``label_mask`` that is True where the label is known (not NaN);
losses should be taken only where the mask is True.

Images: decoded with PIL as grayscale in [0, 1], letterboxed (centred and padded
with black, 0, to a square) so anatomy keeps its aspect ratio, then resized with
an antialiased bilinear filter to ``size`` x ``size``, then scaled per
``normalize``: "unit" [-1, 1] (diffusion), "xrv" [-1024, 1024]
(torchxrayvision's convention), "none" [0, 1]. JPEGs are first decoded at a
reduced DCT scale (PIL ``draft``) no smaller than ``size``: full-resolution
MIMIC images are ~3000 px and decoding dominates the cost of a sample.

Prompt: the report's sections named in ``prompt_sections`` (default impression,
then findings), whitespace collapsed, joined by a space; "" when the report has
none of them. ``prompt_sections=()`` skips reports altogether.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from training.findings import OBSERVATIONS

# ViewPosition values that occur in MIMIC-CXR-JPG's metadata; "" is a missing value.
VIEWS: tuple[str, ...] = (
    "PA", "AP", "LATERAL", "LL", "AP AXIAL", "PA LL", "AP LLD", "AP RLD", "PA RLD",
    "LAO", "RAO", "XTABLE LATERAL", "SWIMMERS", "",
)
SPLITS: tuple[str, ...] = ("train", "validate", "test")
NORMALIZE: dict[str, tuple[float, float]] = {"unit": (-1.0, 1.0), "xrv": (-1024.0, 1024.0), "none": (0.0, 1.0)}
UNCERTAIN: dict[str, float] = {"nan": np.nan, "zero": 0.0, "one": 1.0}
BLANK: dict[str, float] = {"nan": np.nan, "zero": 0.0}

CHEXPERT_CSV = "mimic-cxr-2.0.0-chexpert.csv.gz"
METADATA_CSV = "mimic-cxr-2.0.0-metadata.csv.gz"
SPLIT_CSV = "mimic-cxr-2.0.0-split.csv.gz"
GROUND_TRUTH = "ground_truth.jsonl"

# Only the columns the loader uses are required; the others are kept in ``frame``.
_REQUIRED = {
    CHEXPERT_CSV: ("subject_id", "study_id", *OBSERVATIONS),
    METADATA_CSV: ("dicom_id", "subject_id", "study_id", "ViewPosition"),
    SPLIT_CSV: ("dicom_id", "split"),
}
# No Finding clears blanks of these (pathologies: not itself, not devices).
_CLEARED_BY_NO_FINDING = tuple(o for o in OBSERVATIONS if o not in ("No Finding", "Support Devices"))

# A section header: upper-case words and a colon at the start of a line (MIMIC-CXR's
# reports indent them by one space). Lower-case text never matches, so wrapped
# sentences are not mistaken for headers.
_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z ()/,&-]*[A-Z)])[ \t]*:", re.MULTILINE)
# Header spellings seen in MIMIC-CXR reports that mean one of the prompt sections
# (combined and misspelt headers; cf. MIT-LCP/mimic-cxr's section_parser).
_SECTION_ALIASES = {
    "impressions": "impression", "conclusion": "impression", "findings and impression": "impression",
    "findings/impression": "impression", "impression and recommendations": "impression",
    "impresson": "impression", "impession": "impression", "finding": "findings",
}


@dataclasses.dataclass
class LoaderConfig:
    """What to load from a MIMIC-CXR-JPG root and how to present it."""

    root: str | Path  # folder holding files/ and the mimic-cxr-2.0.0-*.csv.gz files
    # folder holding files/pXX/pN/sM.txt; None: root, then root/../mimic-cxr-reports
    report_root: str | Path | None = None
    views: tuple[str, ...] | None = ("PA", "AP")  # ViewPosition values to keep (see VIEWS); None keeps all
    split: str | None = None  # "train", "validate" or "test"; None keeps every image
    size: int = 256  # output side in pixels (square, after letterboxing)
    normalize: str = "unit"  # "unit" [-1,1] for diffusion, "xrv" [-1024,1024], "none" [0,1]
    uncertain: str = "nan"  # -1 labels: "nan" (U-Ignore), "zero" (U-Zeros), "one" (U-Ones)
    blank: str = "nan"  # unmentioned labels: "nan" (unknown) or "zero" (assumed negative)
    # report sections, in prompt order; () reads no reports and gives "" prompts
    prompt_sections: tuple[str, ...] = ("impression", "findings")
    max_prompt_chars: int | None = None  # cut prompts at a word boundary to at most this many chars; None: no cut
    return_ground_truth: bool = False  # add ground_truth.jsonl's object for the image (simulator data)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.report_root = None if self.report_root is None else Path(self.report_root)
        if isinstance(self.views, str):  # views="PA" means ("PA",), not ("P", "A")
            self.views = (self.views,)
        if self.views is not None:
            self.views = tuple(self.views)
            unknown = [v for v in self.views if v not in VIEWS]
            if unknown:
                raise ValueError(f"unknown view(s) {unknown}; known ViewPosition values: {list(VIEWS)}")
        _check_choice("split", self.split, (None, *SPLITS))
        _check_choice("normalize", self.normalize, tuple(NORMALIZE))
        _check_choice("uncertain", self.uncertain, tuple(UNCERTAIN))
        _check_choice("blank", self.blank, tuple(BLANK))
        self.prompt_sections = tuple(s.lower() for s in self.prompt_sections)
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"size must be a positive int, got {self.size!r}")
        if self.max_prompt_chars is not None and self.max_prompt_chars < 1:
            raise ValueError(f"max_prompt_chars must be positive or None, got {self.max_prompt_chars!r}")


def _check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


# --------------------------------------------------------------------------- CSVs


def read_csv(root: Path, name: str) -> tuple[pd.DataFrame, Path]:
    """Read one of the MIMIC CSVs as strings, checking the required columns.

    Everything is read as text (blanks as "") so that each value can be checked
    and reported with its row, rather than silently coerced by pandas.
    """
    path = Path(root) / name
    if not path.is_file():
        raise FileNotFoundError(f"MIMIC-CXR-JPG file not found: {path}")
    try:
        # Short rows still come back as NaN; make them blanks like empty fields.
        df = pd.read_csv(path, dtype=str, keep_default_na=False).fillna("")
    except (OSError, EOFError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as e:
        raise ValueError(f"{path}: cannot read CSV: {e}") from e
    df.columns = [c.strip() for c in df.columns]
    for col in _REQUIRED[name]:
        if col not in df.columns:
            raise ValueError(f"{path}: missing required column {col!r} (has {list(df.columns)})")
    return df, path


def _bad_row(path: Path, col: str, bad: pd.Series, values: pd.Series, what: str) -> ValueError:
    """A ValueError naming the file, column and first offending 1-based data row."""
    i = int(np.flatnonzero(bad.to_numpy())[0])
    return ValueError(f"{path}: column {col!r}, row {i + 1}: {what}, got {values.iloc[i]!r}")


def parse_ids(df: pd.DataFrame, path: Path, cols: tuple[str, ...]) -> None:
    """Convert id columns to int64 in place; non-integers raise with their row."""
    for col in cols:
        s = df[col].str.strip()
        bad = ~s.str.fullmatch(r"\d+")
        if bad.any():
            raise _bad_row(path, col, bad, df[col], "expected a non-negative integer id")
        df[col] = s.astype("int64")


def parse_labels(df: pd.DataFrame, path: Path) -> None:
    """Convert the 14 observation columns to float (NaN = blank) in place.

    Only 1, 0, -1 (in any float spelling, e.g. "1.0") and blank are accepted.
    """
    for col in OBSERVATIONS:
        s = df[col].str.strip()
        blank = s.eq("") | s.str.lower().eq("nan")
        num = pd.to_numeric(s.where(~blank, None), errors="coerce")
        bad = ~blank & ~num.isin([1.0, 0.0, -1.0])
        if bad.any():
            raise _bad_row(path, col, bad, df[col], "expected 1, 0, -1 or blank")
        df[col] = num.astype("float32")


def _check_unique(df: pd.DataFrame, path: Path, keys: list[str]) -> None:
    """Duplicate keys would duplicate images in a join, so refuse them."""
    dup = df.duplicated(keys)
    if dup.any():
        raise _bad_row(path, keys[-1], dup, df[keys[-1]], f"duplicate {'/'.join(keys)}")


def load_tables(root: Path) -> pd.DataFrame:
    """Join metadata + split (per image) + CheXpert (per study) into one frame.

    One row per metadata row; ``meta_row`` keeps its 1-based position for error
    messages, ``view`` the ViewPosition ("" where missing), ``split`` "" where the
    image is not in the split file, labels NaN where the study has no CheXpert row.
    """
    meta, meta_path = read_csv(root, METADATA_CSV)
    split, split_path = read_csv(root, SPLIT_CSV)
    chex, chex_path = read_csv(root, CHEXPERT_CSV)
    parse_ids(meta, meta_path, ("subject_id", "study_id"))
    parse_ids(chex, chex_path, ("subject_id", "study_id"))
    parse_labels(chex, chex_path)
    for df, path in ((meta, meta_path), (split, split_path)):
        df["dicom_id"] = df["dicom_id"].str.strip()
        empty = df["dicom_id"].eq("")
        if empty.any():
            raise _bad_row(path, "dicom_id", empty, df["dicom_id"], "empty dicom_id")
        _check_unique(df, path, ["dicom_id"])
    _check_unique(chex, chex_path, ["subject_id", "study_id"])
    meta["meta_row"] = np.arange(1, len(meta) + 1)
    meta["view"] = meta["ViewPosition"].str.strip()
    split = split[["dicom_id", "split"]].assign(split=lambda d: d["split"].str.strip())
    df = meta.merge(split, on="dicom_id", how="left")
    df["split"] = df["split"].fillna("")
    chex = chex[["subject_id", "study_id", *OBSERVATIONS]]
    return df.merge(chex, on=["subject_id", "study_id"], how="left")


def select(df: pd.DataFrame, views: tuple[str, ...] | None, split: str | None, root: Path) -> pd.DataFrame:
    """Keep the requested views and split, sorted by subject, study, dicom_id.

    An empty result raises a ValueError naming the filter that removed everything.
    """
    if df.empty:
        raise ValueError(f"{root / METADATA_CSV} has no rows: no images to load")
    if views is not None:
        kept = df[df["view"].isin(views)]
        if kept.empty:
            found = df["view"].value_counts().to_dict()
            raise ValueError(f"view filter {list(views)} removed all {len(df)} images; ViewPosition counts: {found}")
        df = kept
    if split is not None:
        kept = df[df["split"] == split]
        if kept.empty:
            found = df["split"].value_counts().to_dict()
            raise ValueError(f"split filter {split!r} removed all {len(df)} images left after the view filter; "
                             f"split counts: {found}")
        df = kept
    # Sorting makes the order independent of CSV row order (and of the join).
    return df.sort_values(["subject_id", "study_id", "dicom_id"], kind="stable").reset_index(drop=True)


def apply_label_policy(raw: np.ndarray, uncertain: str = "nan", blank: str = "nan") -> np.ndarray:
    """CheXpert values (N, 14; NaN = blank) -> training labels per the module's policy."""
    out = np.array(raw, dtype=np.float32, copy=True)
    # Masks come from the raw values: U-Ignore's NaN must not be re-read as blank.
    unsure, unknown = out == -1, np.isnan(out)
    healthy = out[:, OBSERVATIONS.index("No Finding")] == 1
    for name in _CLEARED_BY_NO_FINDING:
        j = OBSERVATIONS.index(name)
        out[healthy & unknown[:, j], j] = 0.0
        unknown[healthy, j] = False
    out[unsure] = UNCERTAIN[uncertain]
    out[unknown] = BLANK[blank]
    return out


# ------------------------------------------------------------------------ reports


def parse_report(text: str) -> dict[str, str]:
    """Split a MIMIC-CXR free-text report into {section name: text}.

    Names are lower-case headers ("impression", "findings", "indication", ...),
    with common variants mapped (see ``_SECTION_ALIASES``); text before the first
    header is "preamble". Wrapped lines are joined and whitespace collapsed; a
    section that appears twice is concatenated.
    """
    sections: dict[str, str] = {}
    matches = list(_HEADER.finditer(text))
    starts = [(m.start(), m.end(), m.group(1)) for m in matches]
    pieces = [("preamble", text[: starts[0][0]] if starts else text)]
    for k, (_, end, header) in enumerate(starts):
        stop = starts[k + 1][0] if k + 1 < len(starts) else len(text)
        name = " ".join(header.lower().split())
        pieces.append((_SECTION_ALIASES.get(name, name), text[end:stop]))
    for name, body in pieces:
        body = " ".join(body.split())
        if body:
            sections[name] = f"{sections[name]} {body}" if name in sections else body
    return sections


def report_prompt(sections: dict[str, str], order: tuple[str, ...], max_chars: int | None = None) -> str:
    """The prompt: the named sections in order, joined by a space, optionally cut.

    A cut falls on the last space before ``max_chars`` when there is one, so words
    are not split.
    """
    prompt = " ".join(sections[s] for s in order if sections.get(s))
    if max_chars is not None and len(prompt) > max_chars:
        cut = prompt[: max_chars + 1].rfind(" ")
        prompt = prompt[: cut if cut > 0 else max_chars].rstrip()
    return prompt


def study_dir(subject_id: int, study_id: int) -> Path:
    """files/p{first two digits}/p{subject_id}/s{study_id}, relative to a root."""
    s = str(subject_id)
    return Path("files") / f"p{s[:2]}" / f"p{s}" / f"s{study_id}"


def image_path(root: Path, subject_id: int, study_id: int, dicom_id: str) -> Path:
    """Where MIMIC-CXR-JPG keeps one image."""
    return Path(root) / study_dir(subject_id, study_id) / f"{dicom_id}.jpg"


# ------------------------------------------------------------------------- images


def load_grayscale(path: Path, draft_size: int | None = None) -> torch.Tensor:
    """Decode an image file to a float32 (1, H, W) tensor in [0, 1].

    ``draft_size`` lets the JPEG decoder downscale by 1/2, 1/4 or 1/8 while both
    sides stay >= draft_size. A missing file is FileNotFoundError; anything PIL
    cannot decode is a ValueError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            if draft_size is not None and im.format == "JPEG":
                im.draft("L", (draft_size, draft_size))
            im.load()
            if im.mode in ("I;16", "I;16L", "I;16B", "I"):
                arr = np.asarray(im, dtype=np.float32) / 65535.0  # 16-bit: scale by its own range
            else:
                arr = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"corrupt or unreadable image {path}: {e}") from e
    return torch.from_numpy(np.clip(arr, 0.0, 1.0))[None]


def letterbox_resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """Pad (1, H, W) to a centred square with 0 (black), then resize to size x size.

    Padding first keeps the aspect ratio, so hearts and lungs are not stretched;
    the antialiased filter avoids aliasing when shrinking ~3000 px images.
    """
    _, h, w = image.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    image = F.pad(image, (left, side - w - left, top, side - h - top), value=0.0)
    if side != size:
        image = F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return image.clamp_(0.0, 1.0)


def normalize_image(image: torch.Tensor, mode: str) -> torch.Tensor:
    """Map [0, 1] to the range named by ``mode`` (see NORMALIZE)."""
    lo, hi = NORMALIZE[mode]
    return image * (hi - lo) + lo


# ------------------------------------------------------------------- ground truth


def load_ground_truth(path: Path, wanted: set[str]) -> dict[str, dict]:
    """{dicom_id: object} from ground_truth.jsonl, for the ``wanted`` dicom_ids.

    Every wanted id must be present: a silently missing ground truth would look
    like an image without findings.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ground truth requested but not found: {path}")
    out: dict[str, dict] = {}
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n}: invalid JSON: {e}") from e
            if not isinstance(obj, dict) or "dicom_id" not in obj:
                raise ValueError(f"{path}: line {n}: expected an object with a 'dicom_id' key")
            if str(obj["dicom_id"]) in wanted:
                out[str(obj["dicom_id"])] = obj
    missing = sorted(wanted - set(out))
    if missing:
        raise ValueError(f"{path}: no ground truth for {len(missing)} selected image(s), e.g. dicom_id {missing[0]!r}")
    return out


# ------------------------------------------------------------------------ dataset


class MimicCXRDataset(Dataset):
    """MIMIC-CXR-JPG images with CheXpert labels and report prompts.

    ``MimicCXRDataset(LoaderConfig(root=...))`` or ``MimicCXRDataset(root=...,
    views=..., ...)``; keywords given with a config override its fields.
    ``transform`` is applied to the normalized (1, size, size) image tensor.

    ``frame`` holds the selected rows in dataset order: metadata columns (as text),
    int ids, ``meta_row``, ``view``, ``split`` and the raw CheXpert values (NaN =
    blank); ``labels`` the (N, 14) policy-applied float32 labels. A sample's
    ``ground_truth`` is the raw JSON object, so batching it needs a custom collate.
    """

    def __init__(self, config: LoaderConfig | None = None, *,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None, **kwargs) -> None:
        if config is None:
            config = LoaderConfig(**kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        self.config = config
        self.transform = transform
        self.frame = select(load_tables(config.root), config.views, config.split, config.root)
        self.labels = apply_label_policy(self.frame[list(OBSERVATIONS)].to_numpy(np.float32),
                                         config.uncertain, config.blank)
        # Plain lists: indexing a DataFrame per sample is slow in DataLoader workers.
        self._dicom = self.frame["dicom_id"].tolist()
        self._subject = self.frame["subject_id"].tolist()
        self._study = self.frame["study_id"].tolist()
        self._view = self.frame["view"].tolist()
        self._meta_row = self.frame["meta_row"].tolist()
        self._prompts: dict[tuple[int, int], str] = {}  # per study: parsed once
        self.ground_truth = (load_ground_truth(config.root / GROUND_TRUTH, set(self._dicom))
                             if config.return_ground_truth else None)

    def __len__(self) -> int:
        return len(self._dicom)

    def __getitem__(self, i: int) -> dict:
        """One sample: image, labels, label_mask, prompt, ids, view, path[, ground_truth]."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        i = i % len(self)
        dicom, subject, study = self._dicom[i], self._subject[i], self._study[i]
        path = image_path(self.config.root, subject, study, dicom)
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path} (metadata row {self._meta_row[i]} of "
                                    f"{self.config.root / METADATA_CSV}: dicom_id {dicom}, "
                                    f"subject_id {subject}, study_id {study})")
        image = load_grayscale(path, draft_size=self.config.size)
        image = normalize_image(letterbox_resize(image, self.config.size), self.config.normalize)
        if self.transform is not None:
            image = self.transform(image)
        labels = torch.from_numpy(self.labels[i].copy())
        sample = {
            "image": image, "labels": labels, "label_mask": ~torch.isnan(labels),
            "prompt": self.prompt(subject, study), "dicom_id": dicom, "subject_id": subject,
            "study_id": study, "view": self._view[i], "path": str(path),
        }
        if self.ground_truth is not None:
            sample["ground_truth"] = self.ground_truth[dicom]
        return sample

    def report_file(self, subject_id: int, study_id: int) -> Path:
        """The study's report .txt: the first of the report roots that has it."""
        rel = study_dir(subject_id, study_id).with_suffix(".txt")
        roots = ([self.config.report_root] if self.config.report_root is not None
                 else [self.config.root, self.config.root.parent / "mimic-cxr-reports"])
        for r in roots:
            if (r / rel).is_file():
                return r / rel
        tried = ", ".join(str(r / rel) for r in roots)
        raise FileNotFoundError(f"report for subject_id {subject_id}, study_id {study_id} not found; tried {tried}")

    def prompt(self, subject_id: int, study_id: int) -> str:
        """The study's prompt (see the module docstring), cached per study."""
        if not self.config.prompt_sections:
            return ""
        key = (subject_id, study_id)
        if key not in self._prompts:
            text = self.report_file(subject_id, study_id).read_text(encoding="utf-8", errors="replace")
            self._prompts[key] = report_prompt(parse_report(text), self.config.prompt_sections,
                                               self.config.max_prompt_chars)
        return self._prompts[key]

    def labels_frame(self) -> pd.DataFrame:
        """Ids, view, split and the policy-applied labels, one row per sample."""
        ids = self.frame[["dicom_id", "subject_id", "study_id", "view", "split"]].reset_index(drop=True)
        return pd.concat([ids, pd.DataFrame(self.labels, columns=list(OBSERVATIONS))], axis=1)

    def class_counts(self) -> dict[str, int]:
        """Positives (label == 1 after the policy) per observation, in OBSERVATIONS order."""
        return {o: int(n) for o, n in zip(OBSERVATIONS, (self.labels == 1).sum(axis=0))}
