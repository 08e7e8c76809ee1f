"""Judge models (issue 3, section 5): training artifacts, round trip, overfitting, metrics, errors."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from training.data.mimic import MimicCXRDataset
from training.evaluate.judge import (ARCHS, POSE_KEYS, CXRJudge, JudgeConfig, auroc_per_finding, binary_auroc,
                                     collate, judge_loss, load_judge, make_optimizer, mean_auroc, posture_error,
                                     pose_stats, predict, train_judge, train_step)
from training.findings import OBSERVATIONS
from training.simulator.dataset import SimulateConfig, simulate

SIZE = 64  # judge input side for tests: small enough for 2 CPU cores


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    root = tmp_path_factory.mktemp("judge_sim")
    simulate(SimulateConfig(out=str(root), n=24, size=128, seed=1, workers=1), progress=False)
    return root


def dataset(root, split):
    return MimicCXRDataset(root=root, split=split, size=SIZE, return_ground_truth=True, prompt_sections=())


@pytest.fixture(scope="module")
def trained(sim, tmp_path_factory):
    out = tmp_path_factory.mktemp("judge")
    cfg = JudgeConfig(arch="resnet18", image_size=SIZE, epochs=2, batch_size=8, device="cpu", seed=0)
    judge = train_judge(dataset(sim, "train"), dataset(sim, None), cfg, out)
    return judge, out, cfg


def test_collate_batches_ground_truth_poses(sim):
    ds = dataset(sim, "train")
    batch = collate([ds[0], ds[1], ds[2]])
    assert batch["image"].shape == (3, 1, SIZE, SIZE) and batch["labels"].shape == (3, 14)
    assert batch["pose"].shape == (3, len(POSE_KEYS)) and len(batch["ground_truth"]) == 3
    assert batch["pose"][1, 0].item() == pytest.approx(ds[1]["ground_truth"]["pose"]["roll_deg"])


def test_training_writes_artifacts_and_round_trips(trained, sim):
    judge, out, cfg = trained
    assert (out / "judge.safetensors").is_file() and (out / "judge.json").is_file()
    epochs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert all(math.isfinite(e["train_loss"]) and "val_mean_auroc" in e for e in epochs)
    assert 0 < epochs[0]["lr"] < cfg.lr and epochs[1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine to 0
    meta = json.loads((out / "judge.json").read_text())
    assert meta["config"]["arch"] == "resnet18" and len(meta["pose_std"]) == 7 and meta["metrics"]["epoch"] == 2
    assert meta["pose_std"][POSE_KEYS.index("yaw_deg")] != 1.0  # standardisation fitted on the training poses

    loaded = load_judge(out)
    x = torch.rand(3, 1, SIZE, SIZE) * 2 - 1
    with torch.no_grad():
        a, b = judge.eval()(x), loaded(x)
        assert torch.equal(judge.features(x), loaded.features(x))
    assert torch.equal(a["logits"], b["logits"]) and torch.equal(a["posture"], b["posture"])
    assert torch.equal(loaded.pose_mean, judge.pose_mean)

    probs, labels, mask, pose_pred, pose_true = predict(loaded, dataset(sim, None), batch_size=16)
    assert probs.shape == (24, 14) and labels.shape == (24, 14) and mask.dtype == torch.bool
    assert pose_pred.shape == pose_true.shape == (24, 7) and torch.isfinite(pose_true).all()
    assert ((probs >= 0) & (probs <= 1)).all()
    assert loaded.features(x[:1]).shape == (1, 512)
    # other input sizes are resized to the judge's image_size, so generated 128-px images can be scored
    assert loaded(torch.zeros(2, 1, 128, 128))["logits"].shape == (2, 14)


def one_batch(sim, **config):
    """A fresh resnet18 judge, its optimiser and one fixed batch of 8 training films, to overfit."""
    torch.manual_seed(0)
    cfg = JudgeConfig(arch="resnet18", image_size=SIZE, lr=1e-3, jitter=0.0, device="cpu", **config)
    ds = dataset(sim, "train")
    judge = CXRJudge("resnet18", SIZE)
    judge.set_pose_stats(*pose_stats(ds))
    return cfg, collate([ds[i] for i in range(8)]), judge, make_optimizer(judge, cfg), torch.Generator().manual_seed(0)


def test_loss_falls_when_overfitting_one_batch(sim):
    cfg, batch, judge, opt, gen = one_batch(sim)
    losses = [train_step(judge, batch, opt, cfg, gen)["loss"] for _ in range(20)]
    judge.eval()
    with torch.no_grad():
        final = judge_loss(judge, batch, posture=True)[1]["loss"]
    assert losses[-1] < 0.25 * losses[0], losses
    assert final < losses[0], (final, losses[0])  # eval mode (BN running statistics) improves too


def test_auroc_on_hand_made_examples():
    assert binary_auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert binary_auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert math.isnan(binary_auroc([0.1, 0.5], [1, 1]))
    assert binary_auroc([0.5, 0.5, 0.5], [0, 1, 1]) == 0.5  # ties count one half
    assert binary_auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75  # sklearn's documented example

    probs = torch.tensor([[0.1, 0.9], [0.2, 0.8], [0.8, 0.2], [0.9, 0.1]]).repeat(1, 7)
    labels = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]).repeat(1, 7)
    labels[:, 2] = 1.0  # one class only
    labels[0, 4] = math.nan  # unknown: left out, still both classes
    mask = ~torch.isnan(labels)
    mask[0, 6], mask[2, 6], mask[3, 6] = False, False, False  # only one known label left: NaN
    auc = auroc_per_finding(probs, labels, mask)
    assert list(auc) == list(OBSERVATIONS)
    assert auc[OBSERVATIONS[0]] == 1.0 and auc[OBSERVATIONS[1]] == 0.0 and auc[OBSERVATIONS[4]] == 1.0
    assert math.isnan(auc[OBSERVATIONS[2]]) and math.isnan(auc[OBSERVATIONS[6]])
    defined = [v for v in auc.values() if not math.isnan(v)]
    assert mean_auroc(auc) == pytest.approx(np.mean(defined))


def test_auroc_agrees_with_torchmetrics():
    from torchmetrics.functional.classification import binary_auroc as tm_auroc

    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 10, (200,), generator=g).float() / 10  # many ties
    targets = (torch.rand(200, generator=g) < 0.3).long()
    assert binary_auroc(scores, targets) == pytest.approx(tm_auroc(scores, targets).item(), abs=1e-6)


def test_posture_error_math():
    true = torch.zeros(2, 7)
    pred = torch.tensor([[1.0, -2.0, 3.0, 4.0, 0.0, 0.1, 0.0],
                         [3.0, 2.0, -1.0, -2.0, 1.0, 0.0, math.nan]])
    err = posture_error(pred, true)
    assert err["roll_deg"] == 2.0 and err["yaw_deg"] == 2.0 and err["pitch_deg"] == 2.0
    assert err["shift_x_mm"] == 3.0 and err["shift_z_mm"] == 0.5 and err["inspiration"] == pytest.approx(0.05)
    assert err["width_scale"] == 0.0  # the NaN row is skipped
    assert err["rotation_deg"] == 2.0
    assert math.isnan(posture_error(pred, torch.full((2, 7), math.nan))["roll_deg"])


def test_unknown_arch_lists_known_ones():
    with pytest.raises(ValueError, match="densenet121.*resnet18"):
        JudgeConfig(arch="vgg16")
    with pytest.raises(ValueError, match="vgg16"):
        CXRJudge("vgg16")
    with pytest.raises(ValueError, match="lr_schedule"):
        JudgeConfig(lr_schedule="step")
    assert ARCHS == ("densenet121", "resnet18")


def test_load_judge_errors_name_the_file(tmp_path, trained):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_judge(missing)
    _, out, _ = trained
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "judge.json").write_text((out / "judge.json").read_text())
    (broken / "judge.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="judge.safetensors"):
        load_judge(broken)
    (broken / "judge.json").write_text("{ truncated")
    with pytest.raises(ValueError, match="judge.json"):
        load_judge(broken)


@pytest.mark.parametrize("arch", ARCHS)
def test_avgmax_pooling_feeds_the_max_to_the_findings_head_only(arch, tmp_path):
    """pooling="avgmax": the findings head reads [average, max] of the last feature maps (and learns from both
    halves); the FID features and the posture head keep the plain average; judge.json carries the pooling."""
    from training.evaluate.judge import _feature_map, save_judge

    torch.manual_seed(0)
    judge = CXRJudge(arch, SIZE, "avgmax")
    f = judge.n_features
    assert judge.findings.in_features == 2 * f and judge.posture.in_features == f
    x = torch.rand(2, 1, SIZE, SIZE) * 2 - 1
    judge.eval()
    with torch.no_grad():
        fmap = _feature_map(judge.trunk, arch, judge.prepare(x))
        out = judge(x)
        assert torch.allclose(judge.features(x), fmap.mean((2, 3)), atol=1e-6)  # the FID space is unchanged
        expected = judge.findings(torch.cat([fmap.mean((2, 3)), fmap.amax((2, 3))], 1))
        assert torch.allclose(out["logits"], expected, atol=1e-5)
        assert torch.allclose(out["posture_z"], judge.posture(fmap.mean((2, 3))), atol=1e-5)
    judge.train()
    judge(x)["logits"].sum().backward()
    assert judge.findings.weight.grad[:, f:].abs().sum() > 0  # the max half is trained, not a dead input

    save_judge(judge.eval(), JudgeConfig(arch=arch, image_size=SIZE, pooling="avgmax"), tmp_path)
    loaded = load_judge(tmp_path)
    assert loaded.pooling == "avgmax"
    with torch.no_grad():
        assert torch.allclose(loaded(x)["logits"], judge(x)["logits"], atol=1e-6)


def test_judges_saved_before_pooling_load_as_average_and_bad_poolings_are_named(trained, tmp_path):
    _, out, _ = trained
    meta = json.loads((out / "judge.json").read_text())
    assert meta["pooling"] == "avg"
    old = tmp_path / "old"
    old.mkdir()
    (old / "judge.safetensors").write_bytes((out / "judge.safetensors").read_bytes())
    del meta["pooling"]
    (old / "judge.json").write_text(json.dumps(meta))
    assert load_judge(old).pooling == "avg"
    meta["pooling"] = "lse"
    (old / "judge.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="judge.json.*'lse'"):
        load_judge(old)
    with pytest.raises(ValueError, match="pooling 'lse'.*avgmax"):
        JudgeConfig(pooling="lse")
    with pytest.raises(ValueError, match="pooling 'lse'"):
        CXRJudge("resnet18", SIZE, "lse")


def test_densenet_features_shape():
    judge = CXRJudge("densenet121", 64).eval()
    with torch.no_grad():
        out = judge(torch.zeros(1, 1, 64, 64))
        assert judge.features(torch.zeros(1, 1, 64, 64)).shape == (1, 1024)
    assert out["logits"].shape == (1, 14) and out["posture"].shape == (1, 7)


def test_an_interrupted_judge_training_resumes_to_the_same_weights(sim, trained, tmp_path, monkeypatch):
    """Killed after epoch 1, the same call resumes at epoch 2 and ends with the uninterrupted run's weights."""
    import training.evaluate.judge as J

    straight, _, cfg = trained
    save = J._save_epoch

    def save_then_die(out, cfg_, epoch, *a):
        save(out, cfg_, epoch, *a)
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(J, "_save_epoch", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_judge(dataset(sim, "train"), dataset(sim, None), cfg, tmp_path)
    assert (tmp_path / J.STATE_FILE).is_file() and not (tmp_path / "judge.json").is_file()
    with (tmp_path / "log.jsonl").open("a") as f:  # killed after logging epoch 2, before saving it
        f.write(json.dumps({"epoch": 2, "train_loss": 9.0}) + '\n{"epoch": 3, "tr')
    monkeypatch.setattr(J, "_save_epoch", save)
    resumed = train_judge(dataset(sim, "train"), dataset(sim, None), cfg, tmp_path)
    for (n, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n
    assert [json.loads(x)["epoch"] for x in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2]
    assert not (tmp_path / J.STATE_FILE).exists()
    other = JudgeConfig(**{**dataclasses.asdict(cfg), "epochs": 3})
    monkeypatch.setattr(J, "_save_epoch", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_judge(dataset(sim, "train"), dataset(sim, None), other, tmp_path / "o")
    with pytest.raises(ValueError, match="another config"):
        train_judge(dataset(sim, "train"), dataset(sim, None), cfg, tmp_path / "o")


def test_oversampling_repeats_the_films_of_a_kind_not_of_its_label(sim):
    """{"nodule": 3}: films with a nodule appear 3 times; films positive for Lung Lesion by another kind once."""
    from training.findings import oversample_indices

    ds = dataset(sim, "train")
    rows = [ds.ground_truth[d] for d in ds.frame["dicom_id"]]
    kinds = [{f["kind"] for f in r["findings"]} for r in rows]
    target = next(k for k in ("calcified_granuloma", "nodule", "mass", "cardiomegaly", "central_line")
                  if any(k in ks for ks in kinds))
    idx = oversample_indices(ds, {target: 3})
    for i, ks in enumerate(kinds):
        assert idx.count(i) == (3 if target in ks else 1), (i, ks)
    opacity = OBSERVATIONS.index("Lung Opacity")
    by_label = oversample_indices(ds, {"Lung Opacity": 2})
    assert [by_label.count(i) for i in range(len(ds))] == [2 if ds.labels[i, opacity] == 1 else 1
                                                       for i in range(len(ds))]
    no_gt = MimicCXRDataset(root=sim, split="train", size=SIZE, prompt_sections=())
    with pytest.raises(ValueError, match="return_ground_truth"):
        oversample_indices(no_gt, {target: 3})


def test_judge_config_names_a_bad_oversample_or_precision():
    with pytest.raises(ValueError, match="unknown label or kind 'nodules'"):
        JudgeConfig(oversample={"nodules": 2})
    with pytest.raises(ValueError, match="integer >= 1"):
        JudgeConfig(oversample={"nodule": 0})
    with pytest.raises(ValueError, match="precision"):
        JudgeConfig(precision="fp16")


def test_a_bf16_training_step_learns_and_keeps_fp32_weights(sim):
    """precision="bf16": the forward runs under bfloat16 autocast, the loss is finite and falls, weights stay fp32."""
    cfg, batch, judge, opt, gen = one_batch(sim, precision="bf16")
    seen = []
    hook = judge.trunk.conv1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    losses = [train_step(judge, batch, opt, cfg, gen)["loss"] for _ in range(15)]
    hook.remove()
    assert seen[0] == torch.bfloat16  # the autocast is really on
    assert all(math.isfinite(x) for x in losses) and losses[-1] < 0.5 * losses[0], losses
    assert all(p.dtype == torch.float32 for p in judge.parameters())


def test_cxrgen_judge_train_writes_a_judge_and_names_bad_flags(sim, tmp_path, capsys):
    from training.cli import main

    out = tmp_path / "j"
    assert main(["judge", "train", "--data", str(sim), "--out", str(out), "--read-size", "64", "--arch", "resnet18",
                 "--image-size", "64", "--epochs", "1", "--batch-size", "8", "--device", "cpu",
                 "--oversample", "Lung Opacity=2", "--precision", "bf16", "--pooling", "avgmax"]) == 0
    meta = json.loads((out / "judge.json").read_text())
    assert meta["config"]["oversample"] == {"Lung Opacity": 2} and meta["config"]["precision"] == "bf16"
    assert meta["pooling"] == "avgmax" and load_judge(out).pooling == "avgmax"
    assert load_judge(out).image_size == 64
    assert '"val_mean_auroc"' in capsys.readouterr().out
    assert main(["judge", "train", "--data", str(sim), "--out", str(out), "--oversample", "nodule"]) == 2
    assert "expected NAME=K" in capsys.readouterr().err
    assert main(["judge", "train", "--data", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "no such folder" in capsys.readouterr().err


# ------------------------------------------------------------------ spot head (finding masks)

LESIONS = ("calcified_granuloma", "nodule", "mass")


@pytest.fixture(scope="module")
def masks(sim):
    from training.simulator.masks import finding_masks

    return finding_masks(sim, LESIONS, grid=32, workers=1, progress=False)


def test_finding_masks_mark_where_each_kind_lies_and_only_exams_that_show_one(sim, masks):
    from training.simulator.masks import load_masks

    rows = {json.loads(line)["dicom_id"]: json.loads(line)
            for line in (sim / "ground_truth.jsonl").read_text().splitlines()}
    union, facts = load_masks(sim)  # the folder finds its finding_masks.npz
    assert facts == {"kinds": list(LESIONS), "grid": 32, "rel": 0.3, "size": 128}
    shown = {d for d, r in rows.items() if any(f["kind"] in LESIONS for f in r["findings"])}
    assert set(union) == shown and len(shown) >= 5  # exams without a lesion are not stored: empty by construction
    area = {}
    for kind in LESIONS:
        per_kind, _ = load_masks(masks, (kind,))
        for d, m in per_kind.items():
            has = any(f["kind"] == kind for f in rows[d]["findings"])
            assert m.any() == has, (d, kind)  # a kind's bit is set exactly on the films that show it
            if has:
                area.setdefault(kind, []).append(int(m.sum()))
                assert (m & ~union[d]).sum() == 0  # the union holds every kind's cells
    # a calcified granuloma (3-8 mm) covers a few cells, a mass (> 3 cm) many more
    assert max(area["calcified_granuloma"]) < min(area["mass"]), area
    assert all(a < 0.1 * 32 * 32 for a in area["calcified_granuloma"])


def test_finding_masks_name_bad_input(sim, tmp_path, masks):
    from training.simulator.masks import finding_masks, load_masks

    with pytest.raises(ValueError, match="simulator kinds"):
        finding_masks(sim, ("granuloma",), workers=1, progress=False)
    with pytest.raises(ValueError, match="grid must divide"):
        finding_masks(sim, LESIONS, grid=48, workers=1, progress=False)
    with pytest.raises(FileNotFoundError, match="not a simulated data set"):
        finding_masks(tmp_path, LESIONS, workers=1, progress=False)
    with pytest.raises(FileNotFoundError, match="--finding-masks"):
        load_masks(tmp_path)
    with pytest.raises(ValueError, match=r"not of \['central_line'\]"):
        load_masks(masks, ("central_line",))


def test_spot_head_reads_the_stride_16_map_and_feeds_its_best_cell_to_the_findings(tmp_path):
    from training.evaluate.judge import _feature_maps, save_judge

    for arch in ARCHS:
        torch.manual_seed(0)
        judge = CXRJudge(arch, SIZE, spot=True).eval()
        f = judge.n_features
        assert judge.findings.in_features == f + 1
        x = torch.rand(2, 1, SIZE, SIZE) * 2 - 1
        with torch.no_grad():
            out = judge(x)
            mid, last = _feature_maps(judge.trunk, arch, judge.prepare(x))
            assert out["spot"].shape == (2, 1, SIZE // 16, SIZE // 16) and mid.shape[-1] == SIZE // 16
            assert torch.allclose(judge.features(x), last.mean((2, 3)), atol=1e-6)  # FID space unchanged
            best = out["spot"].amax((2, 3))
            assert torch.allclose(out["logits"], judge.findings(torch.cat([last.mean((2, 3)), best], 1)), atol=1e-5)
    judge.train()
    judge(x)["logits"].sum().backward()  # the findings loss alone reaches the spot head through its best cell
    assert judge.spot_head[-1].weight.grad.abs().sum() > 0
    save_judge(judge.eval(), JudgeConfig(arch=arch, image_size=SIZE, spot_kinds=list(LESIONS)), tmp_path)
    loaded = load_judge(tmp_path)
    assert loaded.spot and loaded.meta["spot_kinds"] == list(LESIONS)
    with torch.no_grad():
        assert torch.allclose(loaded(x)["spot"], judge(x)["spot"], atol=1e-6)
    assert not CXRJudge("resnet18", SIZE).spot and "spot" not in CXRJudge("resnet18", SIZE).eval()(x)


def test_spot_targets_and_loss(sim, masks):
    from training.evaluate.judge import spot_loss, spot_targets
    from training.simulator.masks import load_masks

    ds = dataset(sim, None)
    batch = collate([ds[i] for i in range(len(ds))])
    table, _ = load_masks(masks)
    t = spot_targets(batch, table, LESIONS)
    assert t.shape == (len(ds), 1, 32, 32)
    for i, gt in enumerate(batch["ground_truth"]):
        shows = any(f["kind"] in LESIONS for f in gt["findings"])
        assert bool(t[i].any()) == shows
    # granulomas only: exams with only a nodule or a mass get empty targets
    g = spot_targets(batch, load_masks(masks, ("calcified_granuloma",))[0], ("calcified_granuloma",))
    assert g.sum() < t.sum()
    missing = dict(table)
    missing.pop(next(d for d, gt in zip(batch["dicom_id"], batch["ground_truth"])
                     if any(f["kind"] == "mass" for f in gt["findings"])))
    with pytest.raises(ValueError, match="no entry"):
        spot_targets(batch, missing, LESIONS)
    with pytest.raises(ValueError, match="return_ground_truth"):
        spot_targets({"dicom_id": batch["dicom_id"], "ground_truth": None}, table, LESIONS)
    # the loss: cells max-pooled onto the head's grid; a head that says "here" where the mask is scores lower
    right = torch.where(torch.nn.functional.adaptive_max_pool2d(t, 4) > 0, 5.0, -5.0)
    loss = lambda logits: float(spot_loss(logits, t, 10.0))  # noqa: E731
    assert loss(right) < 0.01
    assert loss(right) < min(loss(-right), loss(torch.full_like(right, 5.0)), loss(torch.full_like(right, -5.0)))
    # positive cells weigh pos_weight times a negative one
    off = torch.full_like(right, -5.0)
    assert loss(off) > 5 * float(spot_loss(off, t, 1.0))


def test_a_spot_judge_learns_where_the_lesions_are(sim, masks):
    from training.evaluate.judge import spot_targets
    from training.simulator.masks import load_masks

    cfg, batch, _, _, gen = one_batch(sim, spot_kinds=list(LESIONS))
    torch.manual_seed(0)
    judge = CXRJudge("resnet18", SIZE, spot=True)
    judge.set_pose_stats(*pose_stats(dataset(sim, "train")))
    opt = make_optimizer(judge, cfg)
    table, _ = load_masks(masks)
    assert spot_targets(batch, table, LESIONS).any()  # the batch holds lesions to find
    parts = [train_step(judge, batch, opt, cfg, gen, table) for _ in range(25)]
    assert parts[-1]["spot_bce"] < 0.5 * parts[0]["spot_bce"], [p["spot_bce"] for p in parts]
    with pytest.raises(ValueError, match="finding masks"):
        train_step(judge, batch, opt, cfg, gen, None)


def test_cxrgen_judge_train_with_a_spot_head(sim, masks, tmp_path, capsys):
    from training.cli import main

    out = tmp_path / "spot"
    assert main(["judge", "train", "--data", str(sim), "--out", str(out), "--read-size", "64", "--arch", "resnet18",
                 "--image-size", "64", "--epochs", "1", "--batch-size", "8", "--device", "cpu",
                 "--spot-kinds", "calcified_granuloma,nodule"]) == 0
    meta = json.loads((out / "judge.json").read_text())
    assert meta["spot_kinds"] == ["calcified_granuloma", "nodule"] and load_judge(out).spot
    assert "train_spot_bce" in json.loads((out / "log.jsonl").read_text().splitlines()[0])
    capsys.readouterr()
    assert main(["judge", "train", "--data", str(sim), "--out", str(tmp_path / "x"), "--spot-kinds", "dot"]) == 2
    assert "spot_kinds: unknown simulator kind" in capsys.readouterr().err
    assert main(["judge", "train", "--data", str(sim), "--out", str(tmp_path / "y"), "--spot-kinds", "nodule",
                 "--spot-masks", str(tmp_path / "none.npz")]) == 2
    assert "no finding masks" in capsys.readouterr().err


def test_cxrgen_simulate_writes_finding_masks_and_names_bad_kinds(tmp_path, capsys):
    from training.cli import main

    out = tmp_path / "sim"
    args = ["simulate", "--out", str(out), "--n", "6", "--size", "128", "--seed", "1", "--workers", "1",
            "--no-progress"]
    assert main(args + ["--finding-masks", "calcified_granuloma", "--mask-grid", "16"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["finding_masks"].endswith("finding_masks.npz")
    z = np.load(out / "finding_masks.npz")
    assert z["masks"].shape[1:] == (16, 16) and list(z["kinds"]) == ["calcified_granuloma"]
    assert main(args + ["--finding-masks", "granuloma"]) == 2
    assert "--finding-masks: unknown simulator kind" in capsys.readouterr().err
    assert main(args + ["--finding-masks", "nodule", "--mask-grid", "48"]) == 2
    assert "--mask-grid must divide" in capsys.readouterr().err
