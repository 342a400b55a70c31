"""End to end: `imgsearch ui` on a tiny library, driven by Debian's headless chromium through Playwright.

Needs /usr/bin/chromium (`.ci/run` installs it). Missing, the test fails: it is never skipped silently,
and it never downloads a browser.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import imgsearch.synthetic as synthetic

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
CAPTION = '[data-testid="stImageCaption"]'

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def imgsearch_exe() -> str:
    exe = Path(sys.executable).with_name("imgsearch")
    assert exe.exists(), f"{exe} missing: install the package (pip install -e '.[dev]')"
    return str(exe)


@pytest.fixture()
def server(settings, photos, tmp_path):
    """`imgsearch ui` on a free port over the 54 indexed shapes; yields its base URL."""
    from imgsearch.indexer import index_paths

    assert index_paths(settings, [photos]).new == 54
    yield from run_ui(settings, tmp_path)


def run_ui(settings, tmp_path):
    """Start `imgsearch ui` over the settings' library, yield its URL, then stop it as Ctrl+C does."""
    port = free_port()
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen(
        [imgsearch_exe(), "--home", str(settings.home), "--model", settings.model, "--device", "cpu",
         "--precision", "fp32", "ui", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"imgsearch ui exited with {proc.returncode}:\n{log.read()}")
            try:
                with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail("imgsearch ui did not answer within 90 s")
            time.sleep(0.3)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)  # what Ctrl+C does; the command must stop Streamlit with it
        try:
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
        log.seek(0)
        output = log.read()
        log.close()
        assert code == 0, output
        assert "Traceback" not in output, output
        with socket.socket() as s:  # the server itself stopped: nothing is left listening
            assert s.connect_ex(("127.0.0.1", port)) != 0


def settled(page) -> None:
    """Wait until Streamlit has finished its rerun: no running indicator and no element still marked stale
    (a rerun leaves the previous results on screen, marked data-stale, until the new ones replace them)."""
    page.wait_for_function("() => !document.querySelector('[data-testid^=stStatusWidgetRunning]')"
                           " && !document.querySelector('[data-testid=stElementContainer][data-stale=true]')",
                           timeout=60_000)


def names(page) -> list[str]:
    """Result file names, best first, from the captions under the thumbnails ('0.845 · x.jpg')."""
    return [c.split(" · ", 1)[1] for c in page.locator(CAPTION).all_inner_texts() if " · " in c]


def test_search_in_a_real_browser(server, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium); "
                    ".ci/run does this")
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(server + "/?q=a+red+circle", timeout=90_000)
            # The first page of a fresh server also loads the model: allow for it.
            expect(page.get_by_text("20 results for “a red circle”")).to_be_visible(timeout=90_000)
            expect(page.locator(CAPTION)).to_have_count(20, timeout=30_000)
            first = names(page)
            assert first[0].startswith("red_circle"), first[:5]
            assert all(n.startswith("red_") for n in first[:3]), first[:5]
            # thumbnails really arrived (served by Streamlit from the cache under the library home)
            page.wait_for_function("() => [...document.querySelectorAll('[data-testid=\"stImage\"] img')]"
                                   ".every(i => i.complete && i.naturalWidth > 0)", timeout=30_000)
            # the form shows what the URL asked for
            expect(page.get_by_label("Search for")).to_have_value("a red circle")

            page.get_by_role("button", name="More like this").first.click()
            page.wait_for_url("**/?like=*", timeout=30_000)
            expect(page.get_by_text(f"Images like {first[0]}", exact=True)).to_be_visible(timeout=30_000)
            expect(page.get_by_text(f"20 results for images like {first[0]}")).to_be_visible(timeout=30_000)
            similar = names(page)
            assert first[0] not in similar
            # The tiny test model sees colour far better than shape: the neighbours of a red circle are red.
            assert all(n.startswith("red_") for n in similar[:3]), similar[:5]
            page.mouse.move(5, 5)  # no hover toolbar over the picture
            shot = tmp_path / "ui.png"
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 10_000
            print(f"screenshot: {shot}")

            # Index another folder from the sidebar: a progress bar, then the page refreshes by itself.
            more = tmp_path / "more"
            synthetic.generate(more, per_class=2, colors=["yellow"], size=64, fmt="png", seed=9, captions_file=None)
            page.get_by_label("Folder to index").fill(str(more))
            page.get_by_role("button", name="Index", exact=True).click()
            expect(page.get_by_test_id("stProgress")).to_be_visible(timeout=30_000)
            expect(page.get_by_text(f"Indexed {more}: 6 new", exact=False)).to_be_visible(timeout=120_000)
            expect(page.get_by_text("Images 60")).to_be_visible(timeout=30_000)
        finally:
            browser.close()


@pytest.fixture()
def travels(settings, tmp_path):
    """`imgsearch ui` over test_when_where's photos (red circles from Paris 2021 and Tokyo 2023 with EXIF GPS
    and dates, others without GPS) and an album "trips" of all 11; yields its URL."""
    from imgsearch import Library

    from test_when_where import make_dated

    with Library(settings=settings) as lib:
        assert lib.index(make_dated(tmp_path / "dated")).new == 11
        lib.save_album("trips", "a red circle", k=11)
    yield from run_ui(settings, tmp_path)


def red_blobs(png: bytes) -> list[tuple[float, float]]:
    """Centres of the red pins in a screenshot of the map (pixels of the pin colour, grouped by distance)."""
    import io

    import numpy as np
    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    ys, xs = np.nonzero((rgb[..., 0] > 180) & (rgb[..., 1] < 110) & (rgb[..., 2] < 110))
    groups: list[list[tuple[int, int]]] = []
    for x, y in zip(xs.tolist(), ys.tolist()):
        group = next((g for g in groups if abs(g[0][0] - x) < 40 and abs(g[0][1] - y) < 40), None)
        if group is None:
            groups.append([(x, y)])
        else:
            group.append((x, y))
    return [(sum(x for x, _ in g) / len(g), sum(y for _, y in g) / len(g)) for g in groups if len(g) > 30]


def test_album_map_and_timeline_in_a_real_browser(travels, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)")
    from playwright.sync_api import expect, sync_playwright

    taken = {"red_2021": "2021-03", "red_2023": "2023-03", "blue_2023": "2023-07", "red_nodate": "2019-05",
             "green_rotated": "2022-12", "yellow_badgps": "2020-01"}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(travels + "/?page=albums", timeout=90_000)
            page.get_by_role("button", name="trips").click(timeout=90_000)
            page.wait_for_url("**album=trips*", timeout=30_000)
            expect(page.get_by_text("Album: trips")).to_be_visible(timeout=30_000)
            expect(page.locator(CAPTION)).to_have_count(11, timeout=30_000)

            # The map: no tile server is reachable, and none is needed; two pins of three photos each.
            page.get_by_role("tab", name="Map").click()
            chart = page.get_by_test_id("stDeckGlJsonChart")
            expect(chart).to_be_visible(timeout=30_000)
            expect(page.get_by_text("6 of 11 photos have a GPS position")).to_be_visible()
            page.wait_for_timeout(2000)  # deck.gl draws on the next animation frames
            shot = tmp_path / "map.png"
            pins = red_blobs(chart.screenshot(path=str(shot)))
            assert len(pins) == 2, pins
            box = chart.bounding_box()
            west, east = sorted(pins)  # Paris lies west of Tokyo, and north of it
            assert west[1] < east[1]
            page.mouse.move(box["x"] + east[0], box["y"] + east[1])
            expect(page.get_by_text("3 photos", exact=True)).to_be_visible(timeout=10_000)  # the pin's tooltip
            page.mouse.click(box["x"] + east[0], box["y"] + east[1])
            expect(page.get_by_text("3 photos here")).to_be_visible(timeout=30_000)
            settled(page)
            here = names(page.locator('[role="tabpanel"]:visible'))
            assert sorted(here) == ["red_2023_0.jpg", "red_2023_1.jpg", "red_2023_2.jpg"], here
            print(f"screenshot: {shot}")

            # A pin clicked on a search's map, then another search: the click belongs to the first one's pins
            # (it was kept, and "3 photos here" stood under a map of Paris alone).
            page.goto(travels + "/?q=a+red+circle&k=11", timeout=60_000)
            expect(page.locator(CAPTION)).to_have_count(11, timeout=60_000)
            page.get_by_role("tab", name="Map").click()
            expect(page.get_by_text("6 of 11 photos have a GPS position")).to_be_visible(timeout=30_000)
            page.wait_for_timeout(2000)  # deck.gl draws on the next animation frames
            east = max(red_blobs(chart.screenshot()))  # Tokyo's pin
            box = chart.bounding_box()  # where the screenshot scrolled the map to
            page.mouse.click(box["x"] + east[0], box["y"] + east[1])
            expect(page.get_by_text("3 photos here")).to_be_visible(timeout=30_000)
            page.get_by_text("When and where").click()
            page.get_by_role("textbox", name="Near (lat,lon[,km])").fill("48.8584,2.2945,10")
            page.get_by_role("button", name="Search", exact=True).click()
            expect(page.get_by_text("3 of 3 photos have a GPS position")).to_be_visible(timeout=30_000)
            settled(page)
            assert not page.get_by_text("photos here").count()
            assert sorted(names(page.locator('[role="tabpanel"]:visible'))) == []

            # The timeline on a search: dragging across the earlier years searches those dates only.
            page.goto(travels + "/?q=a+red+circle&k=11", timeout=60_000)
            expect(page.locator(CAPTION)).to_have_count(11, timeout=60_000)
            page.get_by_role("tab", name="Timeline").click()
            plot = page.get_by_test_id("stVegaLiteChart")
            expect(plot).to_be_visible(timeout=30_000)
            page.wait_for_timeout(1000)
            plot.screenshot(path=str(tmp_path / "timeline.png"))
            box = plot.bounding_box()
            y = box["y"] + box["height"] * 0.4
            page.mouse.move(box["x"] + box["width"] * 0.1, y)  # right of the y axis
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] * 0.55, y, steps=8)
            page.mouse.up()
            # Streamlit rewrites the address with history.replaceState, which page.url does not follow.
            page.wait_for_function("() => location.search.includes('after=')", timeout=30_000)
            query = dict(p.split("=", 1) for p in page.evaluate("location.search")[1:].split("&"))
            after, before = query["after"], query["before"]
            expect(page.get_by_text(f"taken from {after}", exact=False)).to_be_visible(timeout=30_000)
            settled(page)
            found = names(page)
            assert found, "the brushed range holds photos"
            for name in found:
                month = next(v for k, v in taken.items() if name.startswith(k))
                assert after[:7] <= month <= before[:7], (name, after, before)
            assert not any(n.startswith(("red_2023", "blue_2023")) for n in found), found
        finally:
            browser.close()


def test_another_site_cannot_show_the_page_in_a_frame(server):
    """A page elsewhere framing the UI (its websocket then carries the UI's own Origin, which the host check
    lets through) could lure clicks onto an album's Delete or the index form: the browser must refuse."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium); "
                    ".ci/run does this")
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from playwright.sync_api import sync_playwright

    class Elsewhere(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            body = f"<h1>win a prize</h1><iframe width=900 height=600 src='{server}/?page=albums'></iframe>".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    other = HTTPServer(("127.0.0.1", 0), Elsewhere)  # another origin: another port
    threading.Thread(target=other.serve_forever, daemon=True).start()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{other.server_address[1]}/", wait_until="load", timeout=90_000)
            framed = [f for f in page.frames if f != page.main_frame]
            assert len(framed) == 1 and not framed[0].url.startswith(server), framed[0].url  # an error page
            # the page itself, opened directly, still works
            page.goto(server + "/?page=albums", timeout=90_000)
            page.get_by_text("No albums yet").wait_for(timeout=90_000)
        finally:
            browser.close()
            other.shutdown()
