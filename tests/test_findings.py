import pytest

from training.findings import OBSERVATIONS, Finding, labels


def test_labels_add_chexpert_parents_and_clear_no_finding():
    out = labels([Finding("cardiomegaly", severity="large"), Finding("pneumonia", lobe="RLL")])
    assert out["Cardiomegaly"] == out["Enlarged Cardiomediastinum"] == 1.0
    assert out["Pneumonia"] == out["Consolidation"] == out["Lung Opacity"] == 1.0
    assert out["No Finding"] == 0.0 and out["Pleural Effusion"] == 0.0
    assert list(out) == list(OBSERVATIONS)


def test_devices_alone_keep_no_finding():
    out = labels([Finding("endotracheal_tube")])
    assert out["Support Devices"] == 1.0 and out["No Finding"] == 1.0


def test_finding_round_trip_and_lobe_implies_side():
    f = Finding("nodule", lobe="LLL")
    assert f.side.value == "left"
    assert Finding.from_dict(f.to_dict()) == f
    assert f.describe() == "left lower lobe pulmonary nodule"


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="tumour"), "unknown finding kind"),
    (dict(kind="nodule", severity="large"), "takes no severity"),
    (dict(kind="cardiomegaly", side="left"), "takes no laterality"),
    (dict(kind="nodule", lobe="RXL"), "unknown lobe"),
])
def test_bad_findings_name_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Finding(**kwargs)
