"""The expert rating page /ui (issue 9, section 5) in headless Chromium, against the running service.

Drives service/static/ui.html the way a radiologist would (keyboard shortcuts and clicks), then reads
the feedback store behind the server to check that what was clicked is what was stored. Needs Debian's
Chromium (/usr/bin/chromium) and the ``playwright`` Python package (its bundled browsers are not used:
no ``playwright install``); without either the module is skipped with the reason. ``live_service``
(tests/conftest.py) is the real HTTP server with auth enabled and a SQLite store holding at least four
generations, two of them with the same prompt.

``CXRGEN_UI_SCREENSHOT=docs/images/ui.png`` saves a 1280x800 picture of the page in rate mode.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1280, "height": 800}
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")

if not (os.path.exists(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
    pytest.skip(f"{CHROMIUM} not found: install Debian's chromium package (apt-get install chromium) to test /ui",
                allow_module_level=True)
try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:
    pytest.skip("the playwright Python package is not installed (pip install playwright==1.65.2) to test /ui",
                allow_module_level=True)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


SHOWN = """() => {  // the generation id on screen, once its image has loaded
    const id = document.getElementById('rate-item').dataset.generationId, img = document.getElementById('rate-image');
    return id && img.dataset.loaded === '1' && img.dataset.generationId === id ? id : null;
}"""


class Page:
    """A fresh browser profile (empty localStorage) on /ui, plus the page's uncaught JavaScript errors."""

    def __init__(self, browser, svc):
        self.svc = svc
        self.context = browser.new_context(viewport=VIEWPORT)
        self.page = self.context.new_page()
        self.page.set_default_timeout(15_000)
        self.js_errors: list[str] = []
        self.page.on("pageerror", lambda e: self.js_errors.append(str(e)))

    def open(self, rater: str, key: str):
        """Load /ui, type the API key and the rater id (Enter applies them, as a user would)."""
        p = self.page
        p.goto(self.svc.url + "/ui")
        p.fill("#api-key", key)
        p.fill("#rater-id", rater)
        p.press("#rater-id", "Enter")
        return p

    def rate_item(self) -> int:
        """Wait until an image to rate is on screen; its generation id."""
        return int(self.page.wait_for_function(SHOWN).json_value())


@pytest.fixture
def ui(browser, live_service):
    page = Page(browser, live_service)
    yield page
    page.context.close()


def _store(svc):
    from training.feedback.store import open_store

    return open_store(svc.store_url, blobs=svc.blobs)


def _rater() -> str:
    return f"dr-ui-{uuid.uuid4().hex[:10]}"  # a new rater sees the whole queue


def _screenshot(page) -> None:
    target = os.environ.get("CXRGEN_UI_SCREENSHOT")
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=target)


def test_rate_and_compare_reach_the_store(ui, live_service):
    rater = _rater()
    p = ui.open(rater, live_service.keys["rater"])
    expect(p.locator("#shortcuts")).to_contain_text("implausible")  # the shortcuts are on the page

    # 1. keyboard only: i (implausible), 2 (second criterion: wrong side), Enter (submit)
    first = ui.rate_item()
    assert p.locator("#rate-image").get_attribute("src").startswith("blob:")  # fetched with the auth header
    expect(p.locator("#rate-prompt")).not_to_be_empty()
    expect(p.locator("#crit-wrong_side")).to_be_disabled()  # criteria only once Implausible is chosen
    p.keyboard.press("i")
    expect(p.locator("#btn-implausible")).to_have_attribute("aria-pressed", "true")
    expect(p.locator("#crit-wrong_side")).to_be_enabled()
    p.keyboard.press("2")
    expect(p.locator("input[name=criterion][value=wrong_side]")).to_be_checked()
    expect(p.locator("#crit-finding_absent")).not_to_be_checked()
    _screenshot(p)
    p.keyboard.press("Enter")
    expect(p.locator("#status")).to_contain_text(f"Saved: #{first}")

    # 2. clicks: the next generation, plausible, with a comment
    second = ui.rate_item()
    assert second != first
    p.click("#btn-plausible")
    p.fill("#comment", "looks like a real film")
    p.click("#btn-submit")
    expect(p.locator("#status")).to_contain_text(f"Saved: #{second}")

    # 3. keys typed into a text field are text, not shortcuts (p, i, s, m, Enter would all act otherwise)
    third = ui.rate_item()
    p.locator("#comment").press_sequentially("spim 12")
    p.locator("#comment").press("Enter")
    expect(p.locator("#comment")).to_have_value("spim 12\n")
    expect(p.locator("#btn-plausible")).to_have_attribute("aria-pressed", "false")
    expect(p.locator("#btn-implausible")).to_have_attribute("aria-pressed", "false")
    expect(p.locator("#mode-rate")).to_have_attribute("aria-pressed", "true")
    assert int(p.locator("#rate-item").get_attribute("data-generation-id")) == third

    # 4. compare mode (m), "A is better" by click
    p.locator("#comment").press("Escape")  # leave the text field: shortcuts work again
    p.keyboard.press("m")
    expect(p.locator("#mode-compare")).to_have_attribute("aria-pressed", "true")
    expect(p.locator("#image-a")).to_have_attribute("data-loaded", "1")
    expect(p.locator("#image-b")).to_have_attribute("data-loaded", "1")
    a = int(p.locator("#compare-item").get_attribute("data-a"))
    b = int(p.locator("#compare-item").get_attribute("data-b"))
    p.click("#btn-a")
    expect(p.locator("#status")).to_contain_text(f"Saved: #{a} vs #{b}")
    expect(p.locator("#error")).to_be_hidden()

    with _store(live_service) as store:
        ratings = {r.generation_id: r for r in store.ratings() if r.rater_id == rater}
        comparisons = [c for c in store.comparisons() if c.rater_id == rater]
        generations = {g.id: g for g in store.generations([a, b])}
        raters = {r.id for r in store.raters()}
    assert set(ratings) == {first, second}  # the third was not submitted
    r1, r2 = ratings[first], ratings[second]
    assert (r1.plausible, r1.failed, r1.score, r1.comment) == (False, ["wrong_side"], None, "")
    assert (r2.plausible, r2.failed, r2.comment) == (True, [], "looks like a real film")
    assert UUID.match(r1.key) and UUID.match(r2.key) and r1.key != r2.key  # the page's idempotency keys
    assert len(comparisons) == 1
    c = comparisons[0]
    assert (c.generation_a, c.generation_b, c.preferred) == (a, b, "a")
    assert UUID.match(c.key)
    assert generations[a].prompt == generations[b].prompt
    assert rater in raters  # registered by the server on first use
    assert ui.js_errors == []

    # rater id, key and mode are remembered
    p.reload()
    expect(p.locator("#rater-id")).to_have_value(rater)
    expect(p.locator("#api-key")).to_have_value(live_service.keys["rater"])
    expect(p.locator("#mode-compare")).to_have_attribute("aria-pressed", "true")


@pytest.mark.parametrize("role, status", [(None, 401), ("client", 403)])
def test_a_key_without_the_rater_role_is_reported(ui, live_service, role, status):
    key = "not-a-key-" + uuid.uuid4().hex if role is None else live_service.keys[role]
    p = ui.open(_rater(), key)
    error = p.locator("#error")
    expect(error).to_be_visible()
    expect(error).to_contain_text(str(status))
    expect(error).to_contain_text("Check the API key")
    expect(p.locator("#rate-item")).to_be_hidden()
    assert ui.js_errors == []


def test_a_lost_response_is_retried_with_the_same_key(ui, live_service):
    """The first POST reaches the server but its answer is lost; the page retries with the same key,
    so the store holds one rating, not two."""
    rater = _rater()
    sent: list[dict] = []

    def lose_first_answer(route):
        sent.append(route.request.post_data_json)
        response = route.fetch()  # the server stores the rating ...
        if len(sent) == 1:
            route.abort("connectionreset")  # ... and the page never hears back
        else:
            route.fulfill(response=response)

    p = ui.open(rater, live_service.keys["rater"])
    p.route("**/feedback/rating", lose_first_answer)
    gid = ui.rate_item()
    p.keyboard.press("p")
    p.keyboard.press("Enter")
    expect(p.locator("#status")).to_contain_text(f"Saved: #{gid}")
    assert len(sent) == 2 and sent[0] == sent[1] and UUID.match(sent[0]["key"])
    with _store(live_service) as store:
        mine = [r for r in store.ratings() if r.rater_id == rater]
    assert [(r.generation_id, r.plausible, r.key) for r in mine] == [(gid, True, sent[0]["key"])]


NEXT_OR_END = """gid => {
    const item = document.getElementById('rate-item').dataset.generationId;
    const end = document.getElementById('rate-empty');
    const over = !end.classList.contains('hidden') && end.textContent.includes('Nothing left');
    return (item && item !== String(gid)) || over;
}"""


def test_skipping_everything_says_nothing_left(ui, live_service):
    with _store(live_service) as store:
        n = len(store.generations())
    if n > 60:
        pytest.skip(f"the live store holds {n} generations; skipping through them all would be slow")
    rater = _rater()
    p = ui.open(rater, live_service.keys["rater"])
    item, empty = p.locator("#rate-item"), p.locator("#rate-empty")
    seen = []
    for _ in range(n + 1):
        gid = ui.rate_item()
        seen.append(gid)
        p.keyboard.press("s")
        p.wait_for_function(NEXT_OR_END, arg=gid)
        if empty.is_visible():
            break
    expect(empty).to_contain_text("Nothing left to rate")
    expect(item).to_be_hidden()
    assert len(seen) == len(set(seen)) == n
    p.click("#btn-unskip-rate")  # the skipped ones come back
    assert ui.rate_item() == seen[0]
    with _store(live_service) as store:
        assert [r for r in store.ratings() if r.rater_id == rater] == []
    assert ui.js_errors == []

