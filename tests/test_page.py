"""The page at `/`, in a real browser: Debian's headless Chromium driven by Playwright (no browser
download), over the real Serve app on the toy base, with an API key, three live concepts in three
slots, two of them sharing one (a library: they cannot be merged), a collection, and a slot held by
a client job that reported its step.

The tests of this module run in order on one browser tab, as a person would use it: look, find a
concept, generate with a subset, see a clash refused, generate with a collection, compare side by
side, remove a concept, upload one. Markup can only be carried by the fields that are free text
(concept and person names are restricted): a class word is `<img src=x onerror=alert(1)>` and must
show as text, as must a prompt. Screenshots at 1280 and 390 px go to the module's tmp folder (printed).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import ray

from blocklora.config import AdapterConfig
from blocklora.pipeline.base import load_base
from blocklora.toy.base import TOY_BASE_DIR
from core_helpers import enrol, make_artifact
from serve.schemas import GenerateRequest
from serve_helpers import pixels, start_in_process, stop_app, wait_until

pytestmark = pytest.mark.slow

NAMESPACE, NAME = "blocklora-page-test", "coordinator-page-test"
ADAPTER = AdapterConfig(rank=2, num_slots=3)
ADMIN, API_KEY = "page-test-admin-token", "page-test-api-key-of-at-least-32-characters"
MARKUP = "<img src=x onerror=alert(1)>"
OWNER = "Mark O'Neil"  # a display name, shown as written
CHROMIUM = Path("/usr/bin/chromium")
WIDE, NARROW = 1280, 390
STEPS = 3  # denoising steps of the page's requests: enough to see the concepts, cheap on 2 cores


def browser_or_fail():
    """Playwright driving Debian's chromium; a failure that says how to install what is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser test needs Playwright's Python package: pip install -e '.[dev]' (no browser "
                    "download: it drives Debian's chromium)")
    if not CHROMIUM.is_file():
        pytest.fail(f"the browser test needs Debian's chromium at {CHROMIUM}: apt-get install chromium "
                    "(.ci/run installs it)")
    return sync_playwright


@pytest.fixture(scope="module")
def site(ray_head, serve_port, tmp_path_factory):
    """The app with an API key; live: ember (slot 0), mark (slot 1, markup as its class word) and fern,
    reserved 'with' mark, so in slot 0 beside ember (they clash); the collection duo = ember + mark; a
    third person's slot held for lagoon by a client job at step 3 of 10, and the artifact that client
    will upload from the page."""
    root = tmp_path_factory.mktemp("page")
    actor, http = start_in_process(ray_head, root / "state", NAMESPACE, NAME, ADAPTER, ADMIN, serve_port, API_KEY,
                                   base=str(TOY_BASE_DIR))
    base = load_base(str(TOY_BASE_DIR))
    people = {who: enrol(actor, ADMIN, who, remote=True) for who in ("ada", OWNER, "grace")}

    def make_live(name: str, who: str, word: str, seed: int, with_: tuple[str, ...] = ()) -> None:
        slot = ray.get(actor.reserve.remote(people[who], name, word, with_)).slot
        art = make_artifact(base, ADAPTER, name, slot, seed=seed, b_scale=0.6, class_word=word)
        r = http.post("/v1/concepts", content=art.to_bytes(), headers={"Authorization": f"Bearer {people[who]}"})
        assert r.status_code == 201, r.text

    make_live("ember", "ada", "star", 1)  # slot 0
    make_live("mark", OWNER, MARKUP, 2)  # slot 1, the least used
    trainer = people["grace"]
    grant = ray.get(actor.reserve.remote(trainer, "lagoon", "circle"))  # slot 2
    assert ray.get(actor.progress.remote("lagoon", grant.reservation_id, 3, 10, 42.0))
    make_live("fern", OWNER, "leaf", 4, with_=("mark",))  # apart from mark; of the rest, the lowest: ember's
    assert {c["name"]: c["slot"] for c in http.get("/v1/concepts").json()["concepts"]} == {
        "ember": 0, "fern": 0, "mark": 1}
    r = http.put("/v1/collections/duo", json={"members": ["ember", "mark"]},
                 headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200, r.text
    artifact = root / "lagoon.safetensors"
    artifact.write_bytes(make_artifact(base, ADAPTER, "lagoon", grant.slot, seed=3, b_scale=0.6,
                                       class_word="circle").to_bytes())
    yield dataclasses.make_dataclass("Site", ["http", "actor", "trainer", "artifact", "root", "url"])(
        http, actor, trainer, artifact, root, f"http://127.0.0.1:{serve_port}/")
    http.close()
    stop_app(actor)
    ray.shutdown()


@pytest.fixture(scope="module")
def tab(site):
    """One Chromium tab on the page, with the API key typed in; records dialogs and console errors."""
    with browser_or_fail()() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": WIDE, "height": 900})
        page.dialogs, page.errors = [], []
        page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: page.errors.append(str(e)))

        def answer(dialog):
            page.dialogs.append(dialog.message)
            dialog.accept()
        page.on("dialog", answer)
        response = page.goto(site.url)
        page.csp = response.headers["content-security-policy"]
        page.get_by_label("API key").fill(API_KEY)
        page.get_by_label("API key").press("Tab")
        yield page
        browser.close()


def shoot(page, site, name: str) -> None:
    """Full-page screenshots of the tab at both widths, into the module's tmp folder."""
    for width in (WIDE, NARROW):
        page.set_viewport_size({"width": width, "height": 900})
        page.screenshot(path=str(site.root / f"{name}-{width}.png"), full_page=True)
    page.set_viewport_size({"width": WIDE, "height": 900})
    print(f"screenshots: {site.root}/{name}-{{{WIDE},{NARROW}}}.png")


def version(site) -> int:
    return site.http.get("/v1/concepts").json()["version"]


def test_the_federation_at_a_glance(tab, site):
    """Version, base, counts, a card per live concept (thumbnail drawn, markup shown as text), the held
    slot with its owner and reported step; and a policy that allows no inline script and no other origin."""
    assert "script-src 'self'" in tab.csp and "default-src 'none'" in tab.csp and "unsafe-inline" not in tab.csp
    expect = _expect()
    expect(tab.locator("#fact-version")).to_have_text(str(version(site)))
    expect(tab.locator("#fact-slots")).to_have_text("3 live · 1 held · 0 of 3 slots free")
    expect(tab.locator("#fact-collections")).to_have_text("2")  # the default one and duo
    expect(tab.locator("#fact-resolution")).to_have_text("64 px")
    assert tab.locator("#fact-base").text_content().endswith("toy-base")
    cards = tab.locator("#cards > li")
    expect(cards).to_have_count(3)
    expect(tab.locator("#cards-count")).to_have_text("3 of 3 shown, in name order")
    mark = tab.locator('#cards > li[data-concept="mark"]')
    expect(mark.locator(".class-word")).to_have_text(MARKUP)
    expect(mark.locator(".owner")).to_have_text(OWNER)
    expect(tab.locator('#cards > li[data-concept="ember"] .owner')).to_have_text("ada")
    held = tab.locator('#held > li[data-concept="lagoon"]')
    expect(held).to_contain_text("grace")
    expect(held).to_contain_text("step 3/10")
    for name in ("ember", "fern", "mark"):  # drawn once while the replica is idle, then served from the cache
        thumb = tab.locator(f'#cards > li[data-concept="{name}"] img.thumb')
        wait_until(lambda thumb=thumb: thumb.evaluate("img => img.complete && img.naturalWidth") == 64, 120,
                   f"{name}'s thumbnail")
    assert tab.evaluate("document.querySelectorAll('img[src=\"x\"]').length") == 0
    assert tab.dialogs == [] and not [e for e in tab.errors if "Content Security Policy" in e], tab.errors


def test_cards_come_a_page_at_a_time(tab, site):
    """The page never asks for the whole library: its cards route pages in name order through the
    coordinator's cursor, and the filter box asks for the names that start with what is typed."""
    expect = _expect()
    first = site.http.get("/v1/federation/concepts", params={"limit": 2}).json()
    assert [c["name"] for c in first["cards"]] == ["ember", "fern"] and first["total"] == 3
    rest = site.http.get("/v1/federation/concepts", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [c["name"] for c in rest["cards"]] == ["mark"] and rest["next_cursor"] is None
    assert site.http.get("/v1/federation/concepts", params={"limit": 101}).status_code == 422
    assert site.http.get("/v1/federation/concepts", params={"cursor": "nonsense"}).status_code == 400
    find = tab.get_by_label("Find a concept (name starts with)")
    find.fill("FE")  # names match regardless of case
    expect(tab.locator("#cards > li")).to_have_count(1)
    expect(tab.locator("#cards > li")).to_have_attribute("data-concept", "fern")
    expect(tab.locator("#cards-count")).to_have_text("1 of 1 shown, in name order")
    find.fill("")
    expect(tab.locator("#cards > li")).to_have_count(3)
    expect(tab.locator("#cards-more")).to_be_hidden()


def test_a_thumbnail_gives_way_to_a_request(site):
    """A long thumbnail loop on the replica stops for a generate request that arrives meanwhile (or
    never starts): the request is answered, the thumbnail call says "ask again" (None), and the
    replica does not count it as a loop abandoned by its caller."""
    from ray import serve

    def handle_calls() -> tuple:  # in a thread of its own: the tab's Playwright runs an event loop in this one
        generator = serve.get_deployment_handle("Generator", app_name="blocklora")
        before = generator.status.remote().result(timeout_s=60)["cancelled_loops"]  # also readies the handle
        request = GenerateRequest(prompt="a large {ember}", steps=100)
        thumbnail = generator.thumbnail.remote(request, ray.get(site.actor.resolve.remote(request.subset())))
        time.sleep(1)  # most likely mid-loop by now (100 steps take seconds); before it started is fine too
        r = site.http.post("/v1/generate", json={"prompt": "a {ember}", "steps": 1},
                           headers={"Authorization": f"Bearer {API_KEY}"})
        return r, thumbnail.result(timeout_s=300), before, generator.status.remote().result(timeout_s=60)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        r, drawn, before, status = pool.submit(handle_calls).result()
    assert r.status_code == 200, r.text
    assert drawn is None and status["cancelled_loops"] == before


def test_generate_with_a_subset(tab, site):
    """{ completes a concept name from the keyboard; the picture appears with the version and seed
    that made it, and is the very PNG the API gives for the same request (the page's curl line)."""
    expect = _expect()
    prompt = tab.get_by_label("Prompt", exact=True)
    prompt.fill("")
    prompt.press_sequentially("a large {em")
    expect(tab.locator("#suggestions li")).to_have_text(["{ember}"])
    prompt.press("Enter")
    prompt.press_sequentially(" on a purple background")
    assert prompt.input_value() == "a large {ember} on a purple background"
    assert tab.locator('#picker input[type=checkbox][data-name="ember"]').is_checked()
    tab.get_by_label("Steps").fill(str(STEPS))
    tab.get_by_label("Seed").fill("7")
    tab.get_by_role("button", name="Generate", exact=True).click()
    shown = tab.locator("#results figure")
    expect(shown).to_have_count(1, timeout=120_000)
    v = version(site)
    assert (shown.get_attribute("data-version"), shown.get_attribute("data-seed")) == (str(v), "7")
    expect(shown.locator(".result-meta")).to_have_text(f"version {v} · seed 7")
    assert_same_as_the_curl_line(tab, site, shown, v)


def assert_same_as_the_curl_line(tab, site, shown, v: int) -> dict:
    """The picture shown is the very PNG the API gives for the page's curl request: its body."""
    curl = tab.locator("#curl").input_value()
    body = re.search(r"-d '(\{.*\})'", curl).group(1)
    assert "Authorization: Bearer $BLOCKLORA_API_KEY" in curl and API_KEY not in curl
    same = site.http.post("/v1/generate", content=body, headers={"Content-Type": "application/json",
                                                                  "Authorization": f"Bearer {API_KEY}"})
    assert same.status_code == 200 and same.headers["x-blocklora-version"] == str(v), same.text
    rgba = shown.locator("img").evaluate("""img => { const c = document.createElement('canvas');
        c.width = img.naturalWidth; c.height = img.naturalHeight; const g = c.getContext('2d'); g.drawImage(img, 0, 0);
        return Array.from(g.getImageData(0, 0, c.width, c.height).data); }""")
    shown_pixels = np.array(rgba, dtype=np.int16).reshape(64, 64, 4)[..., :3]
    assert np.array_equal(shown_pixels, pixels(same.content))
    return json.loads(body)


def test_errors_read_as_the_api_words_them(tab):
    expect = _expect()
    tab.get_by_label("Steps").fill("101")
    tab.get_by_role("button", name="Generate", exact=True).click()
    expect(tab.locator("#generate-error")).to_have_text("422: steps: Input should be less than or equal to 100")
    tab.get_by_label("Steps").fill(str(STEPS))
    tab.get_by_label("Prompt", exact=True).fill("a {ghost} " + MARKUP)
    tab.get_by_role("button", name="Generate", exact=True).click()
    expect(tab.locator("#generate-error")).to_contain_text("404: concept(s) ['ghost'] are not live")
    assert tab.evaluate("document.querySelectorAll('img[src=\"x\"]').length") == 0 and tab.dialogs == []


def test_a_clash_is_named_before_and_refused_as_the_api_words_it(tab):
    """ember and fern share slot 0: ticked together, the picker says so (GET /v1/mergeable), and
    Generate shows the API's 409."""
    expect = _expect()
    tab.get_by_label("Prompt", exact=True).fill("a large {ember} on a purple background")
    fern = tab.locator('#picker input[type=checkbox][data-name="fern"]')
    fern.check()
    expect(tab.locator("#picker-clash")).to_have_text("One picture cannot merge these: ember and fern are both in "
                                                      "slot 0. Untick one of each pair (or choose another collection).")
    tab.get_by_role("button", name="Generate", exact=True).click()
    expect(tab.locator("#generate-error")).to_have_text(
        "409: 'ember' and 'fern' are both in slot 0, so one picture cannot hold both: concepts merge exactly only "
        "in pairwise different slots. Drop one (GET /v1/mergeable?concepts=... names every clash)")
    fern.uncheck()
    expect(tab.locator("#picker-clash")).to_have_text("")


def test_generate_with_a_collection(tab, site):
    """Picking the collection duo lists its members with their slots; the request names it, and the
    picture is the API's answer to that request. duo and fern clash in slot 0, which the picker says."""
    expect = _expect()
    tab.get_by_label("Collection", exact=True).select_option("duo")
    expect(tab.locator("#collection-members")).to_have_text(f"Members: ember star (slot 0), mark {MARKUP} (slot 1)")
    tab.locator('#picker input[type=checkbox][data-name="fern"]').check()
    expect(tab.locator("#picker-clash")).to_contain_text("ember and fern are both in slot 0")
    tab.locator('#picker input[type=checkbox][data-name="fern"]').uncheck()
    tab.get_by_role("button", name="Generate", exact=True).click()
    shown = tab.locator("#results figure")
    expect(shown.locator(".result-title")).to_have_text("collection duo + ember ×1", timeout=120_000)
    body = assert_same_as_the_curl_line(tab, site, shown, version(site))
    assert body["collection"] == "duo" and body["concepts"] == [{"name": "ember", "weight": 1}]
    tab.get_by_label("Collection", exact=True).select_option("")
    expect(tab.locator("#collection-members")).to_have_text("")


def test_side_by_side(tab, site):
    """No concept, each alone, all merged: same prompt and seed, one batch; concepts left out of a
    picture are named by their class word. Screenshots of this state at both widths."""
    expect = _expect()
    tab.get_by_label("Prompt", exact=True).fill("a large {ember} on a purple background")
    tab.locator('#picker input[type=checkbox][data-name="mark"]').check()
    tab.get_by_role("button", name="Side by side").click()
    figures = tab.locator("#results figure")
    expect(figures).to_have_count(4, timeout=180_000)
    expect(figures.locator(".result-title")).to_have_text(["no concept", "ember alone", "mark alone", "all merged"])
    assert {figures.nth(i).get_attribute("data-seed") for i in range(4)} == {"7"}
    assert {figures.nth(i).get_attribute("data-version") for i in range(4)} == {str(version(site))}
    expect(tab.locator("#generate-error")).to_have_text("")
    figures.nth(0).get_by_role("button").click()  # its own curl line: the class word, no concept
    assert '"prompt":"a large star on a purple background","concepts":[]' in tab.locator("#curl").input_value()
    shoot(tab, site, "side-by-side")


def test_remove_a_concept(tab, site):
    """The admin token removes a card; the concept is then refused by /v1/generate, and has left duo."""
    expect = _expect()
    tab.get_by_label("Token").fill(ADMIN)
    tab.get_by_role("button", name="Remove mark").click()
    expect(tab.locator('#cards > li[data-concept="mark"]')).to_have_count(0)
    expect(tab.locator("#manage-status")).to_contain_text("mark removed")
    assert tab.dialogs == ["Remove mark from the federation? Requests naming it will be refused."]
    r = site.http.post("/v1/generate", json={"prompt": "a {mark}", "steps": 1},
                       headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 404 and "mark" in r.json()["detail"]
    assert site.http.get("/v1/collections/duo").json()["members"] == {"ember": 0}


def test_upload_an_artifact(tab, site):
    """A wrong token is refused as the API says; the reserving client's token makes it live, its
    held slot becomes a card. Screenshots of the final state at both widths."""
    expect = _expect()
    tab.get_by_label("Token").fill("not-a-token")
    tab.get_by_label("Artifact file").set_input_files(str(site.artifact))
    tab.get_by_role("button", name="Upload").click()
    expect(tab.locator("#manage-error")).to_contain_text("403: token not recognised")
    tab.get_by_label("Token").fill(site.trainer)
    tab.get_by_label("Artifact file").set_input_files(str(site.artifact))
    tab.get_by_role("button", name="Upload").click()
    expect(tab.locator("#manage-status")).to_contain_text("lagoon is live in slot")
    expect(tab.locator('#cards > li[data-concept="lagoon"]')).to_have_count(1)
    expect(tab.locator("#held > li")).to_have_count(0)
    expect(tab.locator("#fact-slots")).to_have_text("3 live · 0 held · 1 of 3 slots free")
    expect(tab.locator("#results-note")).to_have_text(  # the side-by-side pictures are from before both changes
        f"These pictures were drawn at version {version(site) - 2}; the federation is at version {version(site)} now.")
    shoot(tab, site, "final")
    assert not [e for e in tab.errors if "Content Security Policy" in e], tab.errors


def _expect():
    from playwright.sync_api import expect
    return expect
