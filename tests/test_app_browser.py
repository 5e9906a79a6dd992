"""The web app in a real browser: Debian's Chromium, driven by Playwright, against a real server on 127.0.0.1.

Screenshots of every step land in ``<tmp>/output/`` (the test prints the folder).
Outside CI a machine without Chromium skips this test; in CI (``CI=true``),
where ``.ci/run`` installs Chromium, a missing browser is a failure.
"""
from __future__ import annotations

import os
import re
import shutil

import pytest

from conftest import FOOD_QUERIES, serving

pytest.importorskip("fastapi")
playwright_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    if os.environ.get("CI"):
        raise RuntimeError("Chromium is missing: .ci/run installs it with `apt-get install -y chromium`")
    pytest.skip("no Chromium on this machine (apt-get install chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def server(food_features):
    from similar_finder.app import create_app
    from similar_finder.library import Library

    with serving(create_app(Library(food_features))) as url:
        yield url


@pytest.fixture()
def page(server):
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        # The first upload builds the model and the first K-Means tunes itself: on two cores shared with other
        # work that can take longer than Playwright's default 5 s.
        playwright_api.expect.set_options(timeout=20_000)
        errors, foreign = [], []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        # What the Content-Security-Policy blocks is reported on the console: the page must need none of it.
        page.on("console", lambda msg: errors.append(msg.text) if "Content Security Policy" in msg.text else None)
        # Nothing from the internet: any request to another origin fails, and is listed.
        page.route(re.compile(r"^(?!" + re.escape(server) + r").*"),
                   lambda route: (foreign.append(route.request.url), route.abort()))
        yield page
        browser.close()
        assert not errors, f"JavaScript errors on the page: {errors}"
        assert not foreign, f"requests to other origins: {foreign}"


def test_browse_click_upload_and_errors_in_a_real_browser(server, page, tmp_path):
    shots = tmp_path / "output"
    shots.mkdir()
    print(f"screenshots in {shots}")
    expect = playwright_api.expect

    # The library view: a grid of thumbnails, the library's size on screen.
    page.goto(server)
    expect(page.locator("#library-count")).to_have_text("36 photos")
    expect(page.locator(".tile img").first).to_be_visible()
    page.wait_for_function("() => [...document.querySelectorAll('.tile img')].every(i => i.complete && i.naturalWidth)")
    page.screenshot(path=shots / "1-library.png")

    # Click a burger: the photo large, its similar photos with readable distances, burgers first.
    page.locator(".tile[title='burger/burger3_resized.jpeg']").click()
    expect(page).to_have_url(re.compile(r"#/photo/\d+$"))
    results = page.locator("#results li")
    expect(results.first).to_be_visible()
    assert results.count() >= 3
    distances = [float(t) for t in page.locator("#results .distance").all_inner_texts()]
    assert distances == sorted(distances) and all(0 < d < 2 for d in distances)
    first_path = results.first.get_attribute("title")
    assert first_path.startswith("burger/") and first_path != "burger/burger3_resized.jpeg"
    expect(page.locator("#query-facts")).to_contain_text("burger/burger3_resized.jpeg")
    page.wait_for_function("() => document.querySelector('#query-img').complete")
    page.screenshot(path=shots / "2-similar.png")

    # Browse by similarity: a click on a result opens that photo's own similar view.
    results.first.click()
    expect(page.locator("#query-facts")).to_contain_text(first_path)

    # Esc goes back to the library; the keyboard moves on from the photo clicked last, and opens.
    page.keyboard.press("Escape")
    expect(page.locator("#library-view")).to_be_visible()
    expect(page.locator(".tile.selected")).to_have_attribute("title", "burger/burger3_resized.jpeg")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("Enter")
    expect(page.locator("#query-facts")).to_contain_text("burger/burger4_resized.jpeg")

    # Upload a new photo: results from its class, and nothing stored.
    page.locator("#file").set_input_files(str(FOOD_QUERIES / "asparagus_test.jpg"))
    expect(page).to_have_url(re.compile(r"#/search$"))
    expect(page.locator("#similar-title")).to_contain_text("asparagus_test.jpg")
    expect(results.first).to_have_attribute("title", re.compile(r"^asparagus/"))
    expect(page.locator("#query-facts")).to_contain_text("nothing was stored")
    page.screenshot(path=shots / "3-upload.png")

    # The approach switch: the K-Means baseline answers the same upload with its cluster.
    page.locator("#approaches input[value=kmeans]").check()
    expect(page.locator("#similar-title")).to_contain_text("K-Means")
    expect(page.locator("#results .path").first).to_contain_text("cluster")
    page.locator("#approaches input[value=cosine]").check()

    # An upload that is not a photo: the server's one-line reason, on the page.
    text = tmp_path / "notes.txt"
    text.write_text("not a photo\n")
    page.locator("#file").set_input_files(str(text))
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text("notes.txt cannot be used: not an image")
    page.screenshot(path=shots / "4-error.png")

    # A photo from elsewhere: "No similar images found", said plainly.
    import skimage.data
    from PIL import Image

    Image.fromarray(skimage.data.astronaut()).save(tmp_path / "astronaut.jpg")
    page.locator("#file").set_input_files(str(tmp_path / "astronaut.jpg"))
    expect(page.locator("#no-results")).to_be_visible()
    expect(page.locator("#no-results")).to_contain_text("No similar images found")
    assert results.count() == 0
    page.screenshot(path=shots / "5-no-results.png")

    # The map: thumbnails on a canvas; a click on one opens its similar view.
    page.locator("#views a[data-view=map]").click()
    expect(page.locator("#map-note")).to_contain_text("t-SNE of all 36 photos")
    page.wait_for_timeout(500)
    page.screenshot(path=shots / "6-map.png")
    point = page.evaluate("""() => { const g = mapGeometry(); const p = map.points[0];
                                      return {x: g.x(p), y: g.y(p), id: p.image_id}; }""")
    page.locator("#map").click(position={"x": point["x"], "y": point["y"]})
    expect(page).to_have_url(re.compile(rf"#/photo/{point['id']}$"))

    # Duplicates: none among these 36 different photos, and the page says so.
    page.locator("#views a[data-view=duplicates]").click()
    expect(page.locator("#dup-note")).to_have_text("No near-duplicates found")
    for name in ("1-library", "2-similar", "3-upload", "4-error", "5-no-results", "6-map"):
        assert (shots / f"{name}.png").stat().st_size > 10_000


def test_the_api_docs_render_offline_under_the_policy(server, page):
    # Swagger UI from the fastapi-offline package, served by the app: it renders with no other origin reachable.
    page.goto(server + "docs")
    playwright_api.expect(page.locator(".swagger-ui .info .title")).to_contain_text("similar_finder")
    playwright_api.expect(page.locator(".opblock-summary-path", has_text="/api/similar/{image_id}")).to_be_visible()
