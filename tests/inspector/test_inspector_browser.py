"""The inspector in a real browser: Debian's chromium driven by playwright (its own browser download is not used).

Serves the app on 127.0.0.1 over the small hand-made run of test_inspector.py, opens a unit by URL, waits for its
charts and images, clicks a point of the profile (which selects that step), clicks Next, checks the new unit is
shown within a second, and saves screenshots (to $DIFFLENS_TEST_ARTIFACTS when set, else the test's tmp dir).

Needs `apt-get install -y chromium chromium-driver` and `pip install playwright`; skipped only when they are not
installed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlencode

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium")
try:
    import playwright.sync_api  # noqa: F401

    HAVE_PLAYWRIGHT = True
except ImportError:
    HAVE_PLAYWRIGHT = False

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)"),
    pytest.mark.skipif(not HAVE_PLAYWRIGHT, reason="playwright is not installed (pip install playwright)"),
]
NEXT_BUDGET_S = 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from inspector_runs import build_run

    runs = tmp_path_factory.mktemp("browser") / "runs"
    build_run(runs, "tiny")
    port = _free_port()
    log = open(runs.parent / "streamlit.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "inspector/app.py", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true", "--", "--runs", str(runs)],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"streamlit did not start: {(runs.parent / 'streamlit.log').read_text()[-2000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _artefacts(tmp_path: Path) -> Path:
    out = Path(os.environ.get("DIFFLENS_TEST_ARTIFACTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def test_unit_page_in_chromium(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    out = _artefacts(tmp_path)
    query = urlencode({"run": "tiny", "layer": "mid_block.attentions.0", "kind": "feature", "unit": "2"})
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{server}/unit?{query}", wait_until="domcontentloaded")
            expect(page.get_by_role("heading", name="feature 2")).to_be_visible(timeout=60_000)
            charts = page.locator("[data-testid='stVegaLiteChart']")
            expect(charts.first).to_be_visible(timeout=30_000)
            images = page.locator("[data-testid='stImage'] img, [data-testid='stImageContainer'] img")
            expect(images.first).to_be_visible(timeout=30_000)
            page.wait_for_function(
                "() => [...document.querySelectorAll('[data-testid=\"stImage\"] img, "
                "[data-testid=\"stImageContainer\"] img')].some(i => i.complete && i.naturalWidth > 0)",
                timeout=30_000)
            assert charts.count() >= 4
            assert "unit=2" in page.url
            page.wait_for_timeout(500)  # let the first script run settle
            page.screenshot(path=str(out / "inspector-unit-2.png"), full_page=True)

            # a click on a point of the profile selects that step (here step 1, feature 2's peak)
            points = charts.first.locator("svg .mark-symbol path")
            expect(points.nth(1)).to_be_attached(timeout=10_000)
            points.nth(1).click(force=True)
            page.wait_for_function("() => window.location.search.includes('step=1')", timeout=20_000)
            expect(page.get_by_text("at step 1", exact=False).first).to_be_visible(timeout=20_000)

            started = time.perf_counter()
            page.get_by_role("button", name="Next ▶").click()
            expect(page.get_by_role("heading", name="feature 3")).to_be_visible(timeout=30_000)
            switch_s = time.perf_counter() - started
            expect(charts.first).to_be_visible()
            page.wait_for_function("() => window.location.search.includes('unit=3')", timeout=10_000)
            page.wait_for_timeout(500)
            page.screenshot(path=str(out / "inspector-unit-3.png"), full_page=True)
            (out / "inspector-next-seconds.txt").write_text(f"{switch_s:.3f}\n")
            print(f"Next -> new unit shown after {switch_s * 1000:.0f} ms; screenshots in {out}")
            assert not errors, errors
            assert switch_s < NEXT_BUDGET_S, f"switching units took {switch_s:.2f} s"
        finally:
            browser.close()


@contextmanager
def _page(viewport_height: int = 1800):
    """A chromium page (Debian's chromium through playwright) that records the page's script errors in .errors."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": viewport_height})
            page.errors = []
            page.on("pageerror", lambda exc: page.errors.append(str(exc)))
            yield page
        finally:
            browser.close()


IMAGES_SHOWN = ("n => { const imgs = [...document.querySelectorAll('[data-testid=\"stImage\"] img, "
                "[data-testid=\"stImageContainer\"] img, .atlas-grid img')]; return imgs.length >= n && "
                "imgs.every(i => i.complete && i.naturalWidth > 0); }")


def test_atlas_first_grid_in_chromium(server, tmp_path):
    """The Atlas page by URL: every tile's prior and dream are shown (decoded by the browser), and a tile's link
    opens that unit's page. (How fast is benchmarks/inspector_latency.py's business.)"""
    from inspector_runs import N_FEATURES
    from playwright.sync_api import expect

    query = urlencode({"run": "tiny", "layer": "mid_block.attentions.0", "kind": "feature"})
    with _page() as page:
        page.goto(f"{server}/atlas?{query}", wait_until="domcontentloaded")
        expect(page.get_by_role("heading", name="Atlas")).to_be_visible(timeout=60_000)
        page.wait_for_function(IMAGES_SHOWN, arg=N_FEATURES + 6, timeout=30_000)  # 6 tiles have a dream too
        links = page.locator(".atlas-grid a.atlas-tile")  # each tile is a link to its unit
        expect(links).to_have_count(N_FEATURES, timeout=10_000)
        page.screenshot(path=str(_artefacts(tmp_path) / "inspector-atlas.png"), full_page=True)
        page.get_by_title("open feature 2", exact=True).click()
        expect(page.get_by_role("heading", name="feature 2")).to_be_visible(timeout=30_000)
        page.wait_for_function("() => window.location.pathname.endsWith('/unit') && "
                               "window.location.search.includes('unit=2')", timeout=10_000)
        expect(page.get_by_role("heading", name="Atlas: prior and dreams")).to_be_visible(timeout=30_000)
        assert not page.errors, page.errors


def test_painted_mask_reaches_the_steering_in_chromium(server, tmp_path):
    """The Lab with the demo model: paint a stroke over the top-left of the image, steer; the mask given to the
    steering is the painted one, over the layer's 4x4 grid, inside the painted cells only."""
    from playwright.sync_api import expect

    with _page(2600) as page:
        page.goto(f"{server}/lab?run=tiny", wait_until="domcontentloaded")
        page.get_by_role("button", name="Load model").click(timeout=60_000)
        page.get_by_label("Prompt").fill("a large red circle on the left, gray background", timeout=120_000)
        page.get_by_role("button", name="Generate").click()
        expect(page.get_by_text("Top units of this image")).to_be_visible(timeout=120_000)
        page.get_by_text("Paint the mask").click()
        canvas = page.locator("canvas.upper-canvas")
        expect(canvas).to_be_visible(timeout=60_000)
        box = canvas.bounding_box()  # 320 x 320 px: a cell of the 4x4 grid is 80 px
        page.mouse.move(box["x"] + 20, box["y"] + 20)
        page.mouse.down()
        for i in range(1, 11):  # a stroke from (20, 20) to (80, 40): cells of row 0, columns 0 and 1
            page.mouse.move(box["x"] + 20 + 6 * i, box["y"] + 20 + 2 * i, steps=2)
        page.mouse.up()
        page.wait_for_timeout(1500)  # the canvas sends its strokes on mouse up; the script reruns
        page.get_by_role("button", name="Steer", exact=True).click()
        shown = page.get_by_text("mask (painted):")
        expect(shown).to_be_visible(timeout=120_000)
        assert shown.inner_text() == "mask (painted): 4x4, 2 of 16 cells inside (rows 0-0, columns 0-1)"
        expect(page.get_by_text("steered:", exact=False).first).to_be_visible()
        page.screenshot(path=str(_artefacts(tmp_path) / "inspector-lab-painted-mask.png"), full_page=True)
        assert not page.errors, page.errors
