"""Token grounding (training/train/ground.py, `cxrgen train --ground`): word positions, the attention maps the
processors read, TokenCompose's loss, and that training on it moves a word's attention onto its finding."""

from pathlib import Path

import pytest
import torch

from training.train.ground import Grounding, grounding_loss, install, uninstall, word_positions

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(REPO / "models" / "default" / "tokenizer")


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    from micro_model import micro_checkpoint

    from training.model.checkpoint import load_pipeline

    pipe, _ = load_pipeline(micro_checkpoint(tmp_path_factory.mktemp("micro") / "m"))
    return pipe


def test_word_positions_mark_each_kinds_words_after_the_start_token(tokenizer):
    prompts = ["Large lung mass in the right lower lobe.", "Pulmonary nodules. No masses.",
               "Calcified granuloma in the left upper lobe.", "", "No acute cardiopulmonary abnormality."]
    pos = word_positions(tokenizer, prompts, ("mass", "nodule", "calcified_granuloma"))
    assert pos.shape == (5, 3, tokenizer.model_max_length)
    ids = tokenizer(prompts[0]).input_ids  # start token, the words, end token
    at = [i for i, t in enumerate(ids) if tokenizer.convert_ids_to_tokens(t) == "mass</w>"]
    assert pos[0, 0].nonzero().flatten().tolist() == at and pos[0, 1:].sum() == 0
    assert pos[1, 1].sum() >= 1 and pos[1, 0].sum() >= 1  # "masses" is a word naming a mass, even negated
    assert pos[2, 2].sum() >= 1 and pos[2, :2].sum() == 0
    assert pos[3].sum() == 0 and pos[4].sum() == 0  # a dropped prompt, a normal report
    pieces = tokenizer.tokenize("granulomatosis")  # a word of several pieces marks every piece
    many = word_positions(tokenizer, ["granulomatosis"], ("calcified_granuloma",))
    assert many[0, 0].sum() == len(pieces) and many[0, 0, 1: 1 + len(pieces)].sum() == len(pieces)


def unet_inputs(pipe, prompts, tokenizer_of_pipe=True):
    torch.manual_seed(0)
    tok = pipe.tokenizer
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    ehs = pipe.text_encoder(ids)[0]
    size = pipe.unet.config.sample_size
    return torch.randn(len(prompts), 4, size, size), torch.tensor([500] * len(prompts)), ehs


def test_the_processors_keep_the_output_and_report_softmax_maps(micro):
    pipe = micro
    noisy, t, ehs = unet_inputs(pipe, ["Lung mass.", "Nodule."])
    with torch.no_grad():
        plain = pipe.unet(noisy, t, ehs).sample
    g = Grounding()
    before = install(pipe.unet, g)
    try:
        L = ehs.shape[1]
        g.start(torch.ones(2, 1, L))  # every token: each query's probabilities sum to 1
        with torch.no_grad():
            out = pipe.unet(noisy, t, ehs).sample
        maps = g.stop()
        torch.testing.assert_close(out, plain, rtol=0, atol=1e-5)
        assert maps and all(m.shape[:2] == (2, 1) for m in maps)
        for m in maps:
            torch.testing.assert_close(m, torch.ones_like(m), rtol=0, atol=1e-4)
        with torch.no_grad():  # no positions: nothing recorded, same output
            torch.testing.assert_close(pipe.unet(noisy, t, ehs).sample, plain, rtol=0, atol=1e-5)
        assert g.maps == []
    finally:
        uninstall(pipe.unet, before)
    assert not any(type(p).__name__ == "GroundingProcessor" for p in pipe.unet.attn_processors.values())


def test_grounding_loss_token_and_pixel_terms():
    masks = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    masks[:, 0, :2, :2] = True
    pos = torch.zeros(2, 1, 8)
    pos[:, 0, 3] = 1
    inside = torch.zeros(2, 1, 16)
    inside[:, 0, [0, 1, 4, 5]] = 0.25  # all of the word's attention on the finding's four cells
    outside = torch.zeros(2, 1, 16)
    outside[:, 0, [10, 11, 14, 15]] = 0.25
    w = torch.tensor([1.0])
    good, share_good = grounding_loss([inside], masks, w, pos)
    bad, share_bad = grounding_loss([outside], masks, w, pos)
    assert share_good == pytest.approx(1.0) and share_bad == pytest.approx(0.0)
    assert bad.item() > 1.0 > good.item()  # token term 1 against 0, plus the pixel terms
    twice, _ = grounding_loss([outside], masks, torch.tensor([2.0]), pos)
    assert twice.item() == pytest.approx(2 * bad.item())
    # a film without the finding, or a prompt without its words, is not supervised
    assert grounding_loss([outside], torch.zeros_like(masks), w, pos) == (None, None)
    assert grounding_loss([outside], masks, w, torch.zeros_like(pos)) == (None, None)
    half = pos.clone()
    half[1] = 0
    one, _ = grounding_loss([outside], masks, w, half)
    assert one.item() == pytest.approx(bad.item())  # the mean over the one grounded pair
    coarse, _ = grounding_loss([outside[..., :4]], masks, w, pos)  # a 2 x 2 layer: the mask max-pooled to it
    assert coarse is not None


def test_training_on_the_loss_moves_the_words_attention_onto_the_finding(micro):
    """Only the grounding loss, 15 Adam steps on one batch: the share of "mass"'s attention on the mask rises."""
    from training.train.loop import GroundTerm

    import copy

    pipe = copy.copy(micro)
    pipe.unet = copy.deepcopy(micro.unet).requires_grad_(True)  # the module's micro model stays as loaded
    prompts = ["Large lung mass in the right lower lobe.", "Lung mass in the left upper lobe."]
    size = pipe.unet.config.sample_size
    masks = torch.zeros(2, 1, size, size, dtype=torch.bool)
    masks[0, 0, -2:, :2] = True
    masks[1, 0, :2, -2:] = True
    g = Grounding()
    before = install(pipe.unet, g)
    params = [p for n, p in pipe.unet.named_parameters() if "attn" in n]
    opt = torch.optim.Adam(params, lr=1e-2)
    shares = []
    try:
        for _ in range(15):
            noisy, t, ehs = unet_inputs(pipe, prompts)
            term = GroundTerm(g, ("mass",), torch.tensor([1.0]), masks)
            term.before(pipe.tokenizer, prompts)
            pipe.unet(noisy, t, ehs.detach())
            term.after()
            shares.append(term.share)
            opt.zero_grad(), term.loss.backward(), opt.step()
    finally:
        uninstall(pipe.unet, before)
    assert shares[-1] > 2 * shares[0] and shares[-1] > 0.3, shares


def test_grounding_share_benchmark_reads_films_that_name_their_lesion(tmp_path):
    """benchmarks/grounding_share.py on a micro model: the test films holding a granuloma whose report names it,
    a share of the words' attention on the lesion and the even share beside it; clear CLI errors."""
    import subprocess
    import sys

    from micro_model import MICRO, micro_checkpoint

    sys.path.insert(0, str(REPO / "benchmarks"))
    import grounding_share

    from training.simulator.dataset import SimulateConfig, simulate
    from training.simulator.masks import finding_masks

    data = tmp_path / "sim"
    simulate(SimulateConfig(out=str(data), n=40, size=128, seed=5, workers=1, real_fraction=0.5), progress=False)
    finding_masks(data, ("calcified_granuloma",), grid=16, workers=1, progress=False)
    import dataclasses

    model = micro_checkpoint(tmp_path / "m", config=dataclasses.replace(MICRO, max_length=64))
    r = grounding_share.measure(str(model), str(data), ("calcified_granuloma",), 8, [500])
    row = r["kinds"]["calcified_granuloma"]
    assert row["films"] >= 1, "the fixture's test split should hold a named granuloma"
    assert 0.0 <= row["share"]["500"] <= 1.0 and 0.0 < row["even"]["500"] <= 1.0
    proc = subprocess.run([sys.executable, "benchmarks/grounding_share.py", "--model", str(model), "--data",
                           str(data), "--kinds", "edema"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "--kinds: no report words are known for ['edema']" in proc.stderr


def test_look_figure_puts_each_real_film_above_the_evaluations_images(tmp_path):
    import sys

    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(REPO / "benchmarks"))
    import grounding_share

    from training.simulator.dataset import SimulateConfig, simulate

    data = tmp_path / "sim"
    simulate(SimulateConfig(out=str(data), n=40, size=128, seed=5, workers=1, real_fraction=0.5), progress=False)
    evals = []
    for j, v in enumerate((-1.0, 1.0)):  # two "evaluations": all black, all white
        (tmp_path / f"e{j}" / "generated").mkdir(parents=True)
        torch.save({"value": torch.full((8, 1, 32, 32), v)}, tmp_path / f"e{j}" / "generated" / "heldout.pt")
        evals.append(str(tmp_path / f"e{j}"))
    cols = grounding_share.look_figure(str(data), evals, ("calcified_granuloma", "nodule", "mass"), tmp_path / "f.png")
    assert cols >= 1
    img = np.asarray(Image.open(tmp_path / "f.png"))
    assert img.shape == (3 * 32, cols * 32)
    assert img[32:64].max() == 0 and img[64:].min() == 255  # the rows under the real films are the evaluations'
