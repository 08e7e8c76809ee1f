"""The committed default rewards (models/rewards) and panel (models/panel): they load, they score real
simulated films well and the reward hacks (noise, blank, inverted, saturated) low (issue 7, section 3)."""

import pytest
import torch

from training.findings import Finding
from training.reward import base as rb
from training.reward.corrupt import GUARDED, corrupt


@pytest.fixture(scope="module")
def films(anat):
    """Six simulated films at the generator's 128 px, with their prompts and true findings (seed 11: no
    eye trained on it)."""
    from training.simulator.render import render_case
    from training.simulator.sampler import sample_case

    cases = [sample_case(11, i) for i in range(6)]
    imgs = torch.stack([render_case(anat, c.case, 128)[0].float() for c in cases])[:, None] * 2 - 1
    prompts = [" ".join((c.impression_text + " " + c.findings_text).split()) for c in cases]
    findings = [[Finding(f.kind, f.side, f.severity, f.lobe) for f in c.case.findings] for c in cases]
    return imgs, prompts, findings


def test_every_default_reward_is_committed_and_loads():
    assert rb.available() == list(rb.REWARD_NAMES)
    for name in rb.REWARD_NAMES:
        reward = rb.load_reward(name)
        assert reward.manifest["kind"] == name and reward.manifest["metrics"]


@pytest.mark.parametrize("name", rb.REWARD_NAMES)
def test_default_rewards_score_hacks_low(films, name):
    imgs, prompts, findings = films
    reward = rb.load_reward(name)
    with torch.no_grad():
        real = reward.score(imgs, prompts, findings)
        for kind in GUARDED:
            hacked = reward.score(corrupt(imgs, kind, torch.Generator().manual_seed(0)), prompts, findings)
            assert float(hacked.max()) < 0.2, f"{name} scores {kind} images up to {float(hacked.max()):.3f}"
            assert float(hacked.mean()) < 0.5 * float(real.mean()), (name, kind, hacked.mean(), real.mean())


def test_default_panel_passes_real_films_and_fails_hacks(films):
    from training.expert.command import DEFAULT_PANEL
    from training.expert.panel import Panel
    from training.expert.raters import DEFAULT_RATERS, rate

    imgs, _, findings = films
    panel = Panel.load(DEFAULT_PANEL)

    def plausible(images) -> int:
        return sum(rate(r, a, seed=0, key=str(i)).plausible
                   for r in DEFAULT_RATERS for i, a in enumerate(panel.assess(images, findings)))

    total = len(DEFAULT_RATERS) * len(imgs)
    assert plausible(imgs) >= 0.6 * total
    assert plausible(corrupt(imgs, "noise", torch.Generator().manual_seed(0))) <= 0.2 * total
