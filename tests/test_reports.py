"""training.data.reports on the real IU reports that torchxrayvision ships, plus synthetic ones."""

from __future__ import annotations

import io
import itertools
import random
import tarfile
from pathlib import Path

import pytest

from training.data import reports
from training.data.reports import (
    Report, ReportIndex, compose_report, load_reports, make_report, mentioned_kinds, parse_mesh,
    reports_archive, side_from_text, signature,
)
from training.findings import KINDS, LOBE_NAMES, LOBES, Finding, Laterality, Severity

PIP_HINT = "pip install --no-deps torchxrayvision==1.5.7"

# Words that state each side / severity in a composed report (radiologists grade the
# heart and edema as mild/moderate/severe, effusions as small/moderate/large).
SIDE_WORDS = {"left": ("left",), "right": ("right",), "bilateral": ("bilateral", "bibasilar", "both")}
SEVERITY_WORDS = {
    "small": ("small", "mild", "minimal"),
    "moderate": ("moderate",),
    "large": ("large", "severe", "marked", "extensive"),
}


@pytest.fixture(scope="module")
def all_reports() -> tuple[Report, ...]:
    try:
        return load_reports()
    except FileNotFoundError as e:  # make setup installs it; say so rather than fail obscurely
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def by_uid(all_reports) -> dict[str, Report]:
    return {r.uid: r for r in all_reports}


@pytest.fixture(scope="module")
def index(all_reports) -> ReportIndex:
    return ReportIndex(all_reports)


def F(kind, side=None, severity=None, lobe=None) -> Finding:
    return Finding(kind, side, severity, lobe)


# --------------------------------------------------------------------------- loading


def test_all_reports_load(all_reports):
    assert len(all_reports) == 3955
    uids = [r.uid for r in all_reports]
    assert len(set(uids)) == 3955 and uids[:3] == ["CXR1", "CXR2", "CXR3"]
    assert sum(r.usable for r in all_reports) > 1000
    assert load_reports() is all_reports  # cached


def test_known_report_sections(by_uid):
    r = by_uid["CXR1"]
    assert r.indication == "Positive TB test" and r.comparison == "None."
    assert r.impression == "Normal chest x-XXXX."  # de-identification kept verbatim
    assert r.findings.startswith("The cardiac silhouette and mediastinum size are within normal limits.")
    assert r.mesh == ("normal",) and r.findings_list == () and r.usable
    assert r.prompt.startswith("Normal chest x-XXXX. The cardiac silhouette")


@pytest.mark.parametrize(
    "uid, expected, usable",
    [
        ("CXR546", [F("pleural_effusion", "bilateral", "small")], True),  # Pleural Effusion/bilateral/small
        ("CXR1772", [F("cardiomegaly", severity="small")], True),  # Cardiomegaly/mild
        # Airspace Disease + Pneumonia at the RLL are one pneumonia.
        ("CXR3108", [F("pneumonia", lobe="RLL")], True),
        # Nodule + Granuloma in the RUL are one calcified granuloma.
        ("CXR3281", [F("calcified_granuloma", lobe="RUL")], True),
        # "Catheters, Indwelling" with "XXXX-A-XXXX ... caval atrial junction" (a port) in the text.
        ("CXR1670", [F("central_line")], True),
        # Lingula -> LUL; a middle-lobe atelectasis is right-sided; Infiltrate is unsupported.
        ("CXR334", [F("calcified_granuloma", lobe="LUL"), F("atelectasis", "right")], False),
        # No side in MeSH: "left subclavian central venous catheter" in the text.
        ("CXR105", [F("central_line", "left"), F("pleural_effusion", "bilateral")], False),
        # "Tube, Inserted/thorax/left" is a chest tube (unsupported); "/trachea, carina" + "Endotracheal tube".
        (
            "CXR509",
            [F("pleural_effusion", "left"), F("endotracheal_tube"), F("central_line", "left"),
             F("consolidation", "left")],
            False,
        ),
        (
            "CXR1819",
            [F("cardiomegaly"), F("edema"), F("atelectasis", "left"), F("consolidation", lobe="LLL")],
            True,
        ),
    ],
)
def test_known_reports_parse(by_uid, uid, expected, usable):
    r = by_uid[uid]
    assert list(r.findings_list) == expected
    assert r.usable is usable


def test_custom_archive_path(tmp_path):
    xml = (
        b'<?xml version="1.0" encoding="utf-8"?><eCitation><uId id="CXR9"/><MedlineCitation><Article>'
        b'<Abstract><AbstractText Label="FINDINGS">Small  right\npleural effusion.</AbstractText>'
        b'<AbstractText Label="IMPRESSION">Effusion.</AbstractText></Abstract></Article></MedlineCitation>'
        b"<MeSH><major>Pleural Effusion/right/small</major><automatic>x</automatic></MeSH></eCitation>"
    )
    path = tmp_path / "mini.tgz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("ecgen-radiology/9.xml")
        info.size = len(xml)
        tar.addfile(info, io.BytesIO(xml))
    (r,) = load_reports(path)
    assert r.uid == "CXR9" and r.indication == "" and r.comparison == ""
    assert r.findings_list == (F("pleural_effusion", "right", "small"),) and r.usable
    assert r.prompt == "Effusion. Small right pleural effusion."


def test_missing_archive_says_how_to_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(reports, "_package_dir", lambda: None)  # not installed
    with pytest.raises(FileNotFoundError, match="not installed.*" + PIP_HINT.replace(".", r"\.")):
        reports_archive()
    with pytest.raises(FileNotFoundError, match=PIP_HINT.replace(".", r"\.")):
        load_reports()
    monkeypatch.setattr(reports, "_package_dir", lambda: tmp_path)  # installed, file gone
    with pytest.raises(FileNotFoundError, match="NLMCXR_reports.tgz is missing.*torchxrayvision==1.5.7"):
        reports_archive()
    with pytest.raises(FileNotFoundError, match="torchxrayvision==1.5.7"):
        load_reports(tmp_path / "nope.tgz")


# --------------------------------------------------------------------------- MeSH


@pytest.mark.parametrize(
    "term, expected",
    [
        ("Cardiomegaly/borderline", F("cardiomegaly", severity="small")),
        ("Cardiomegaly/severe", F("cardiomegaly", severity="large")),
        ("Cardiomegaly", F("cardiomegaly")),
        ("Pleural Effusion/left/moderate", F("pleural_effusion", "left", "moderate")),
        ("Pneumothorax/apex/right/small", F("pneumothorax", "right", "small")),
        ("Nodule/lung/upper lobe/right", F("nodule", lobe="RUL")),
        ("Mass/lung/middle lobe/right/round", F("mass", lobe="RML")),
        ("Calcified Granuloma/lung/upper lobe/right", F("calcified_granuloma", lobe="RUL")),
        ("Calcified Granuloma/lung/bilateral/multiple", F("calcified_granuloma", "bilateral")),
        ("Granulomatous Disease", F("calcified_granuloma")),
        ("Opacity/lung/lingula", None),
        ("Airspace Disease/lung/base/left", F("consolidation", lobe="LLL")),
        ("Consolidation/lung/lower lobe/bilateral", F("consolidation", "bilateral")),
        ("Pneumonia/upper lobe/left", F("pneumonia", lobe="LUL")),
        ("Pulmonary Atelectasis/base/left/mild", F("atelectasis", "left", "small")),
        ("Pulmonary Atelectasis/lingula", F("atelectasis", "left")),  # not lobar: side only
        ("Pulmonary Edema/interstitial/mild", F("edema", severity="small")),
        ("Pulmonary Congestion/bilateral", F("edema")),  # edema takes no side
        ("Mass/breast/large", None),  # not a lung lesion
        ("Spine/degenerative", None),
    ],
)
def test_parse_mesh_terms(term, expected):
    found, unsupported = parse_mesh([term])
    assert found == ([expected] if expected else [])
    assert unsupported == ([] if expected else [term])


def test_parse_mesh_devices_read_the_text():
    ett = "Endotracheal tube terminates 4 cm above the carina."
    assert parse_mesh(["Tube, Inserted/trachea"], ett) == ([F("endotracheal_tube")], [])
    trach = "Tracheostomy tube in place."
    assert parse_mesh(["Tube, Inserted/trachea"], trach) == ([], ["Tube, Inserted/trachea"])
    picc = "Right upper extremity PICC with tip in the right atrium."
    assert parse_mesh(["Catheters, Indwelling"], picc) == ([F("central_line", "right")], [])
    drain = "Drainage catheter overlies the right upper quadrant."
    assert parse_mesh(["Catheters, Indwelling"], drain)[0] == []


def test_parse_mesh_nothing_dedupe_and_text_side():
    assert parse_mesh(["normal"]) == ([], [])
    assert parse_mesh(["No Indexing"]) == ([], [])
    terms = ["Pleural Effusion/bilateral/small", "Pleural Effusion/bilateral/small", "Granulomatous Disease",
             "Calcified Granuloma/lung/base/right"]  # fmt: skip
    expected = [F("pleural_effusion", "bilateral", "small"), F("calcified_granuloma", lobe="RLL")]
    assert parse_mesh(terms)[0] == expected
    assert parse_mesh(["Pleural Effusion"], "Small left pleural effusion.")[0] == [F("pleural_effusion", "left")]
    assert parse_mesh(["Pleural Effusion"], "Effusions bilaterally.")[0] == [F("pleural_effusion", "bilateral")]
    # Ambiguous: sides disagree -> no side.
    ambiguous = "Left pleural effusion. Right pleural effusion has resolved somewhat."
    assert parse_mesh(["Pleural Effusion"], ambiguous)[0] == [F("pleural_effusion")]
    assert side_from_text("Bibasilar atelectasis.", "atelectasis") is Laterality.BILATERAL
    assert side_from_text("No left effusion. Pneumothorax.", "pneumothorax") is None


# --------------------------------------------------------------------------- usable


def test_unsupported_terms_make_a_report_unusable(by_uid):
    text = "Small left pleural effusion. Degenerative changes of the spine."
    ok = make_report("X1", ["Pleural Effusion/left/small"], findings=text)
    bad = make_report("X2", ["Pleural Effusion/left/small", "Spine/degenerative"], findings=text)
    assert ok.usable and not bad.usable and bad.unsupported == ("Spine/degenerative",)
    assert bad.findings_list == ok.findings_list  # still parsed
    assert all(not r.usable for r in by_uid.values() if r.unsupported)


def test_no_indexing_and_empty_text_are_unusable(all_reports):
    assert not make_report("X", ["No Indexing"], findings="The lungs are clear.").usable
    assert not make_report("X", ["normal"]).usable
    assert make_report("X", ["normal"], impression="No acute disease.").usable
    assert not any(r.usable for r in all_reports if r.mesh == ("No Indexing",))


@pytest.mark.parametrize(
    "text, kinds",
    [
        ("Small left pleural effusion.", {"pleural_effusion"}),
        ("No pleural effusion or pneumothorax.", set()),
        ("There is no pneumothorax. Small left pleural effusion.", {"pleural_effusion"}),
        ("Lungs are clear without focal consolidation, effusion, or pneumothorax.", set()),
        ("Negative for pneumonia. Free of edema.", set()),
        ("The lungs are clear of focal airspace disease, pneumothorax, or pleural effusion.", set()),
        ("No pneumothorax, but there is a small right effusion.", {"pleural_effusion"}),
        ("No change in moderate left pneumothorax.", {"pneumothorax"}),
        ("Mild cardiomegaly. Heart size is enlarged.", {"cardiomegaly"}),
        ("Heart size is normal. Small pericardial effusion.", set()),
        ("Calcified nodule in the left upper lobe, likely a granuloma.", {"calcified_granuloma"}),
        ("Left PICC with tip in the SVC. Bibasilar atelectasis.", {"central_line", "atelectasis"}),
    ],
)
def test_negation(text, kinds):
    assert mentioned_kinds(text) == kinds


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Moderate left pleural effusion.", [{"kind": "pleural_effusion", "side": "left", "severity": "moderate"}]),
        ("The right effusion is small. No pneumothorax.",
         [{"kind": "pleural_effusion", "side": "right", "severity": "small"}]),
        ("Large bilateral pleural effusions and mild pulmonary edema.",
         [{"kind": "edema", "severity": "small"},
          {"kind": "pleural_effusion", "side": "bilateral", "severity": "large"}]),
        ("Right lower lobe consolidation consistent with pneumonia.",
         [{"kind": "pneumonia", "side": "right", "lobe": "RLL"}]),
        ("Calcified nodule in the left upper lobe, likely a granuloma.",
         [{"kind": "calcified_granuloma", "side": "left", "lobe": "LUL"}]),
        ("No acute cardiopulmonary abnormality. No effusion or pneumothorax.", []),
    ],
)
def test_findings_from_text(text, expected):
    from training.data.reports import findings_from_text

    assert [f.to_dict() for f in findings_from_text(text)] == expected


def test_text_finding_missing_from_mesh_makes_report_unusable():
    assert not make_report("X", ["normal"], findings="Small left pleural effusion.").usable
    assert make_report("X", ["normal"], findings="No pleural effusion. Heart size normal.").usable
    # Pneumonia accounts for its consolidation.
    text = "Right lower lobe consolidation consistent with pneumonia."
    assert make_report("X", ["Pneumonia/lower lobe/right"], findings=text).usable


# --------------------------------------------------------------------------- composing


def _variants(kind: str) -> list[Finding]:
    """Every Finding of ``kind`` that its Kind allows."""
    spec = KINDS[kind]
    sides = [None, *Laterality] if spec.sided or spec.lobar else [None]
    severities = [None, *Severity] if spec.graded else [None]
    lobes = [None, *LOBES] if spec.lobar else [None]
    out = []
    for side, sev, lobe in itertools.product(sides, severities, lobes):
        if lobe is not None and side is not None and LOBES[lobe] is not side:
            continue
        out.append(Finding(kind, side, sev, lobe))
    return out


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_composes_with_its_side_severity_and_lobe(kind):
    for i, finding in enumerate(_variants(kind)):
        for seed in range(4):
            text, impression = compose_report([finding], random.Random(seed * 100 + i))
            both = f"{text} {impression}".lower()
            assert text and impression
            if finding.lobe:
                assert LOBE_NAMES[finding.lobe] in both
            elif finding.side:
                assert any(w in both for w in SIDE_WORDS[finding.side.value]), both
            if finding.severity:
                assert any(w in both for w in SEVERITY_WORDS[finding.severity.value]), both
            # The text asserts this kind and nothing else (no contradicting negatives).
            implied = {"consolidation"} if kind == "pneumonia" else set()
            assert mentioned_kinds(text) - implied == {kind}, text
            assert mentioned_kinds(impression) <= {kind} | implied, impression


def test_compose_is_deterministic_and_varied():
    findings = [F("pleural_effusion", "left", "moderate"), F("cardiomegaly"), F("endotracheal_tube")]
    a = compose_report(findings, random.Random(7))
    assert a == compose_report(findings, random.Random(7))
    assert a == compose_report(list(reversed(findings)), random.Random(7))  # order-free
    assert len({compose_report(findings, random.Random(s)) for s in range(20)}) > 10
    text, _ = a
    assert "moderate" in text.lower() and "left" in text.lower() and "carina" in text


def test_normal_report_and_pertinent_negatives():
    for seed in range(20):
        text, impression = compose_report([], random.Random(seed))
        assert "pleural effusion" in text.lower() and "pneumothorax" in text.lower()
        assert "clear" in text.lower() and mentioned_kinds(f"{text} {impression}") == set()
        assert any(w in impression.lower() for w in ("acute", "normal", "active disease")), impression
    for seed in range(20):
        text, _ = compose_report([F("pneumothorax", "right", "small")], random.Random(seed))
        assert "no pneumothorax" not in text.lower() and "no pleural effusion" in text.lower()
        assert mentioned_kinds(text) == {"pneumothorax"}


def test_composed_multi_finding_reports_assert_exactly_their_kinds():
    rng = random.Random(0)
    kinds = sorted(KINDS)
    for _ in range(200):
        chosen = rng.sample(kinds, rng.randint(1, 4))
        findings = [rng.choice(_variants(k)) for k in chosen]
        text, impression = compose_report(findings, rng)
        implied = {"consolidation"} if "pneumonia" in chosen else set()
        said = mentioned_kinds(f"{text} {impression}")
        assert said - implied == set(chosen) - implied, (findings, text, impression)


# --------------------------------------------------------------------------- index


def test_index_match_returns_reports_with_exactly_those_findings(index, all_reports):
    rng = random.Random(0)
    assert len(index) == sum(r.usable for r in all_reports)
    assert index.normal == index.signatures()[()] > 1000
    for sig, n in index.signatures().items():
        findings = [Finding.from_dict(dict(items)) for items in sig]
        for _ in range(2):
            r = index.match(list(reversed(findings)), rng)
            assert r is not None and r.usable and signature(r.findings_list) == sig
    normal = index.match([], rng)
    assert normal is not None and normal.findings_list == ()
    unseen = [F("endotracheal_tube"), F("pneumothorax", "left", "large"), F("mass", lobe="RML")]
    assert index.match(unseen, rng) is None


def test_index_match_is_seeded(index):
    request = [F("calcified_granuloma")]
    picks = [index.match(request, random.Random(s)).uid for s in range(10)]
    assert picks == [index.match(request, random.Random(s)).uid for s in range(10)]
    assert len(set(picks)) > 1


def test_index_by_kind_counts(index, all_reports):
    assert set(index.by_kind) == set(KINDS)
    usable = [r for r in all_reports if r.usable]
    for kind, n in index.by_kind.items():
        assert n == sum(any(f.kind == kind for f in r.findings_list) for r in usable)
    assert index.by_kind["cardiomegaly"] > 20 and index.by_kind["calcified_granuloma"] > 50
    assert len(ReportIndex([])) == 0 and ReportIndex([]).match([], random.Random(0)) is None
