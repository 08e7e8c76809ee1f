"""The prompt contrast of cxrgen train (train/contrast.py): report surgery, pair choice, the margin and its loss."""

import json
import math
import random

import pytest
import torch

from training.data.reports import mention_sentences, strip_mentions
from training.findings import OBSERVATIONS
from training.train.contrast import (ContrastLabel, check_contrast, contrast_labels, contrast_loss, contrast_pairs,
                                     film_kinds, film_pairs, label_kinds)

DEVICES = ("endotracheal_tube", "central_line")
SD = OBSERVATIONS.index("Support Devices")
TUBE = "Endotracheal tube tip 4 cm above the carina."
LINE = "Right IJ central venous catheter tip in the SVC."


def test_strip_mentions_removes_the_asserting_sentences_and_keeps_denials():
    report = f"{TUBE} {LINE} Small left effusion. No pneumothorax."
    assert mention_sentences(report, DEVICES) == [TUBE, LINE]
    assert strip_mentions(report, DEVICES) == "Small left effusion. No pneumothorax."
    removed = "Interval removal of the endotracheal tube. Heart size normal."  # a denial asserts nothing
    assert mention_sentences(removed, DEVICES) == [] and strip_mentions(removed, DEVICES) == removed
    assert strip_mentions("ET tube in place; lungs clear.", DEVICES) == "lungs clear."
    assert strip_mentions(report, ("pleural_effusion",)) == f"{TUBE} {LINE} No pneumothorax."


def test_labels_map_to_the_kinds_whose_phrases_assert_them():
    assert label_kinds("Support Devices") == DEVICES
    assert set(label_kinds("Lung Lesion")) == {"nodule", "mass", "calcified_granuloma"}
    assert label_kinds("Fracture") == ()
    check_contrast({"Support Devices": 1.0, "Pneumothorax": 0.5}, 1000.0)
    for weights, beta, message in [({"Devices": 1.0}, 1.0, "unknown label 'Devices'"),
                                   ({"Fracture": 1.0}, 1.0, "cannot find this label's sentences"),
                                   ({"Support Devices": 0.0}, 1.0, "must be a number > 0"),
                                   ({"Support Devices": True}, 1.0, "must be a number > 0"),
                                   ({"Support Devices": float("nan")}, 1.0, "must be a number > 0"),
                                   ({"Support Devices": 1.0}, -2.0, "--contrast-beta must be > 0")]:
        with pytest.raises(ValueError, match=message):
            check_contrast(weights, beta)


def labels_of(*values):
    rows = torch.zeros(len(values), len(OBSERVATIONS))
    rows[:, SD] = torch.tensor(values, dtype=torch.float)
    return rows


def spec(weight=1.0, sentences=(TUBE, LINE)):
    return ContrastLabel("Support Devices", SD, DEVICES, weight, tuple(sentences))


def test_contrast_labels_read_the_positives_sentences():
    prompts = [f"{TUBE} Lungs clear.", f"{LINE} Small effusion.", "Lungs clear.", "Chest tube removed. Clear."]
    (s,) = contrast_labels({"Support Devices": 2.0}, prompts, labels_of(1, 1, 0, float("nan")).numpy())
    assert s.sentences == tuple(sorted([TUBE, LINE])) and s.weight == 2.0 and s.column == SD
    with pytest.raises(ValueError, match="no training report positive for it asserts it"):
        contrast_labels({"Support Devices": 1.0}, ["Lungs clear."] * 2, labels_of(1, 0).numpy())


def test_pairs_strip_positives_and_give_as_many_negatives_a_sentence():
    prompts = [f"{TUBE} Lungs clear.",  # positive: its report without the tube sentence
               "Lungs clear. Heart normal.",  # positive whose report never says so: nothing to strip
               "No effusion.", "Mild cardiomegaly.", "Clear lungs.",  # negatives: one is chosen
               f"{LINE} Clear.",  # negative by label but its report asserts a line: never a negative
               "Small effusion.",  # uncertain (-1): neither
               f"{TUBE} Clear."]  # positive, dropped to "" this step: no pair
    read = list(prompts)
    read[-1] = ""
    labels = labels_of(1, 1, 0, 0, 0, 0, -1, 1)
    pairs = contrast_pairs(prompts, read, labels, [spec(weight=0.5)])
    assert pairs[0] == (0, "Lungs clear.", 0.5)
    assert len(pairs) == 2  # one positive, so one negative
    i, other, w = pairs[1]
    assert i in (2, 3, 4) and w == 0.5
    assert other in (f"{TUBE} {prompts[i]}", f"{LINE} {prompts[i]}")
    # the same batch gets the same pairs (resume), without touching the run's shared generator
    state = random.getstate()
    assert contrast_pairs(prompts, read, labels, [spec(weight=0.5)]) == pairs
    assert random.getstate() == state


def test_more_positives_than_negatives_uses_every_negative_once():
    prompts = [f"{TUBE} A.", f"{TUBE} B.", f"{LINE} C.", "D."]
    pairs = contrast_pairs(prompts, prompts, labels_of(1, 1, 1, 0), [spec()])
    assert [i for i, _, _ in pairs] == [0, 1, 2, 3]
    assert pairs[1][1] == "B." and pairs[2][1] == "C."


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    from micro_model import micro_checkpoint

    from training.model.checkpoint import load_pipeline

    pipe, _ = load_pipeline(micro_checkpoint(tmp_path_factory.mktemp("micro")))
    return pipe


def denoised_batch(pipe, prompts, labels, **modules):
    from diffusers import DDPMScheduler

    from training.train.config import FinetuneConfig
    from training.train.loop import Parts, diffusion_loss

    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    cfg = FinetuneConfig(data="d", out="o", model="m", text_dropout=0.0)
    latent_dist = torch.zeros(len(prompts), 8, 4, 4)  # mean 0, log-variance 0: a unit-Gaussian latent
    keep = []
    torch.manual_seed(0)
    diffusion_loss(Parts(pipe, modules), sched, None, prompts, cfg, latent_dist=latent_dist, keep=keep)
    return Parts(pipe, modules), sched, keep[0], {"prompt": prompts, "labels": labels}


class Blind(torch.nn.Module):
    """A text encoder that reads no words: every prompt is the same hidden state."""

    def forward(self, ids):
        return (torch.zeros(ids.shape[0], ids.shape[1], 16),)


def test_the_margin_is_what_the_sentences_buy(micro):
    prompts = [f"{TUBE} Lungs clear.", f"{LINE} Small effusion.", "No effusion.", "Mild cardiomegaly."]
    labels = labels_of(1, 1, 0, 0)
    parts, sched, den, batch = denoised_batch(micro, prompts, labels)
    loss, logs = contrast_loss(parts, sched, den, batch, [spec()], beta=1000.0, snr_gamma=5.0)
    assert logs["contrast_pairs"] == 4 and 0.0 <= logs["contrast_acc"] <= 1.0
    # W / beta times the mean of softplus(-beta * margin) over pairs: at least that of the mean margin (convexity)
    assert loss.item() >= float(torch.nn.functional.softplus(torch.tensor(-1000.0 * logs["contrast_margin"]))) / 1000 - 1e-8
    # a text encoder blind to the words: both readings are the same prediction, margin 0, the loss W log 2 / beta
    blind_parts, _, den0, batch0 = denoised_batch(micro, prompts, labels, text_encoder=Blind())
    loss0, logs0 = contrast_loss(blind_parts, sched, den0, batch0, [spec(weight=3.0)], beta=1000.0, snr_gamma=5.0)
    assert logs0["contrast_margin"] == 0.0 and loss0.item() == pytest.approx(3.0 * math.log(2) / 1000)
    assert contrast_loss(parts, sched, den, {"prompt": ["A."] * 4, "labels": labels_of(0, 0, 0, 0)},
                         [spec()], 1000.0, 5.0) == (None, {"contrast_pairs": 0})


def test_descending_the_contrast_widens_the_margin_through_unet_and_text_encoder(micro):
    import copy

    pipe = copy.deepcopy(micro)
    prompts = [f"{TUBE} Lungs clear.", f"{LINE} Small effusion.", "No effusion.", "Mild cardiomegaly."]
    labels = labels_of(1, 1, 0, 0)
    params = list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    margins = []
    for _ in range(15):
        parts, sched, den, batch = denoised_batch(pipe, prompts, labels)  # same noise and timesteps each time
        loss, logs = contrast_loss(parts, sched, den, batch, [spec()], beta=1000.0, snr_gamma=5.0)
        opt.zero_grad(), loss.backward()
        if not margins:
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pipe.text_encoder.parameters())
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pipe.unet.parameters())
        opt.step()
        margins.append(logs["contrast_margin"])
    assert margins[-1] > margins[0] and margins[-1] > 0


def test_train_with_the_contrast_logs_its_pairs(tmp_path):
    from micro_model import micro_checkpoint

    from training.simulator.dataset import SimulateConfig, simulate
    from training.train.config import FinetuneConfig
    from training.train.loop import train

    data = tmp_path / "sim"
    simulate(SimulateConfig(out=str(data), n=24, size=128, seed=3, workers=1, real_fraction=0.0), progress=False)
    rows = [json.loads(x) for x in (data / "ground_truth.jsonl").read_text().splitlines()]
    assert any(r["labels"]["Support Devices"] == 1.0 and r["split"] == "train" for r in rows)
    cfg = FinetuneConfig(data=str(data), out=str(tmp_path / "run"), model=str(micro_checkpoint(tmp_path / "m")),
                         steps=3, batch_size=8, num_workers=0, sample_every=0, checkpoint_every=0, warmup_steps=1,
                         cache_latents=True, oversample={"Support Devices": 4}, contrast={"Support Devices": 20.0})
    train(cfg, progress=False)
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and sum(r["contrast_pairs"] for r in log) > 0
    assert all(("loss_contrast" in r) == (r["contrast_pairs"] > 0) for r in log)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["contrast"] == {"Support Devices": 20.0}


# --------------------------------------------------------------------------- --contrast-films


def test_film_pairs_take_the_positives_that_have_a_counterfactual():
    prompts = [f"{TUBE} {LINE} Lungs clear.", f"{LINE} Small effusion.", "No effusion.", f"{TUBE} Clear."]
    pairs = film_pairs(prompts, torch.tensor([True, True, False, False]), labels_of(1, 1, 0, 1), [spec(weight=2.0)])
    # both device sentences go from the first; a positive without a rendered counterfactual (the last) is not used
    assert pairs == [(0, "Lungs clear.", 2.0), (1, "Small effusion.", 2.0)]
    truth = {"findings": [{"kind": "central_line"}, {"kind": "pleural_effusion"}]}
    assert film_kinds(truth, labels_of(1)[0], [spec()]) == frozenset({"central_line"})
    assert film_kinds(truth, labels_of(0)[0], [spec()]) == frozenset()


def film_batch(prompts, labels, with_, without):
    """A batch whose films' posteriors are point masses at ``with_`` / ``without`` (log-variance -30)."""
    point = lambda z: torch.cat([z, torch.full_like(z, -30.0)], 1)  # noqa: E731
    return {"prompt": prompts, "labels": labels, "film_dist": torch.stack([point(with_), point(without)], 1),
            "has_film": torch.ones(len(prompts), dtype=torch.bool)}


def test_the_film_margin_is_zero_when_the_films_agree_whatever_the_words_buy(micro):
    """The difference in differences: a text tell (words that help on every film) earns nothing; only a model whose
    words help more on the film with the device than on the one without wins it."""
    prompts = [f"{TUBE} Lungs clear.", f"{LINE} Small effusion."]
    labels = labels_of(1, 1)
    parts, sched, den, _ = denoised_batch(micro, prompts, labels)
    plain, plain_logs = contrast_loss(parts, sched, den, {"prompt": prompts, "labels": labels}, [spec()], 1000.0, 5.0)
    assert plain_logs["contrast_margin"] != 0.0  # these words do buy something on a film
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    loss, logs = contrast_loss(parts, sched, den, film_batch(prompts, labels, z, z.clone()), [spec(weight=3.0)],
                               1000.0, 5.0)
    assert logs["contrast_pairs"] == 2 and logs["contrast_margin"] == 0.0
    assert loss.item() == pytest.approx(3.0 * math.log(2) / 1000)
    other = z + torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    batch = film_batch(prompts, labels, z, other)
    _, logs = contrast_loss(parts, sched, den, batch, [spec()], 1000.0, 5.0)
    assert logs["contrast_margin"] != 0.0
    _, again = contrast_loss(parts, sched, den, batch, [spec()], 1000.0, 5.0)
    assert again == logs  # its draws come from the batch's reports: the same batch, the same margin
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    contrast_loss(parts, sched, den, batch, [spec()], 1000.0, 5.0)
    assert torch.rand(1) == before  # and the run's generator is untouched


def test_descending_the_film_contrast_makes_the_words_read_the_film(micro):
    import copy

    pipe = copy.deepcopy(micro)
    prompts = [f"{TUBE} Lungs clear.", f"{LINE} Small effusion."]
    labels = labels_of(1, 1)
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    device = torch.zeros_like(z)
    device[:, :, 1, 1:3] = 1.5  # what the device adds to the film's latent
    batch = film_batch(prompts, labels, z + device, z)
    opt = torch.optim.Adam(list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters()), lr=1e-3)
    margins = []
    for _ in range(15):
        parts, sched, den, _ = denoised_batch(pipe, prompts, labels)
        loss, logs = contrast_loss(parts, sched, den, batch, [spec()], beta=1000.0, snr_gamma=5.0)
        opt.zero_grad(), loss.backward(), opt.step()
        margins.append(logs["contrast_margin"])
    assert margins[-1] > margins[0] and margins[-1] > 0


def test_render_films_draws_each_device_exam_again_without_its_device(tmp_path):
    from training.data.mimic import MimicCXRDataset
    from training.simulator.dataset import SimulateConfig, simulate
    from training.train.contrast import render_films

    data = tmp_path / "sim"
    simulate(SimulateConfig(out=str(data), n=24, size=128, seed=3, workers=1, real_fraction=0.0), progress=False)
    ds = MimicCXRDataset(root=data, views=("PA", "AP"), split="train", size=32, normalize="unit")
    ids = list(ds.frame["dicom_id"])
    reports = [ds.prompt(r.subject_id, r.study_id) for r in ds.frame.itertuples()]
    (s,) = contrast_labels({"Support Devices": 1.0}, reports, ds.labels)
    rows, plus, minus = render_films(data, ids, ds.labels, [s], 32)
    truth = {r["dicom_id"]: r for r in map(json.loads, (data / "ground_truth.jsonl").read_text().splitlines())}
    have = [i for i, d in enumerate(ids) if {f["kind"] for f in truth[d]["findings"]} & set(DEVICES)]
    assert rows == have and plus.shape == minus.shape == (len(rows), 1, 32, 32)
    assert plus.min() >= -1 and plus.max() <= 1
    # the stored film is the first render (JPEG aside); the second differs, and only a little (a catheter)
    stored = torch.stack([ds[i]["image"] for i in rows])  # "unit": [-1, 1] like the renders
    assert (stored - plus).abs().mean() < 0.02
    diff = (plus - minus).abs().flatten(1)
    assert (diff.max(1).values > 0.02).all() and (diff.mean(1) < 0.02).all()
    with pytest.raises(ValueError, match="has no ground_truth.jsonl"):
        render_films(tmp_path, ids, ds.labels, [s], 32)
    # in worker processes (cxrgen train --num-workers): the same films, in the same order
    rows2, plus2, minus2 = render_films(data, ids, ds.labels, [s], 32, workers=2)
    assert rows2 == rows and torch.equal(plus2, plus) and torch.equal(minus2, minus)


def test_train_with_contrast_films_logs_pairs_and_renders_once(tmp_path):
    from micro_model import micro_checkpoint

    from training.simulator.dataset import SimulateConfig, simulate
    from training.train.config import FinetuneConfig
    from training.train.loop import train

    data = tmp_path / "sim"
    simulate(SimulateConfig(out=str(data), n=24, size=128, seed=3, workers=1, real_fraction=0.0), progress=False)
    kw = dict(data=str(data), out=str(tmp_path / "run"), model=str(micro_checkpoint(tmp_path / "m")), batch_size=8,
              num_workers=0, sample_every=0, checkpoint_every=1, warmup_steps=1, cache_latents=True,
              oversample={"Support Devices": 4}, contrast={"Support Devices": 20.0}, contrast_films=True)
    train(FinetuneConfig(steps=2, **kw), progress=False)
    films, encoded = tmp_path / "run" / "contrast_films.pt", tmp_path / "run" / "contrast_films_latents.pt"
    stamps = films.stat().st_mtime_ns, encoded.stat().st_mtime_ns
    train(FinetuneConfig(steps=3, **kw), progress=False)  # resumed: renders and encodings read back, not made again
    assert (films.stat().st_mtime_ns, encoded.stat().st_mtime_ns) == stamps
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and sum(r["contrast_pairs"] for r in log) > 0
    assert all(("loss_contrast" in r) == (r["contrast_pairs"] > 0) for r in log)
