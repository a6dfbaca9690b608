"""Real-browser end-to-end test: the app in a subprocess, driven through Debian Chromium by Playwright.

Starts ``python app.py`` on a free localhost port with a tiny random Qwen2.5-VL (``MMKV_MODEL``),
then: Chat (click an example, send it, see the streamed answer), Compare (click an example, run Full +
two methods, check the answers table, the plotly charts and the overlay images), Inspect (overlays,
heatmap, token strip), About. Screenshots go to ``test-artifacts/``.

Chromium comes from ``apt-get install chromium`` (``scripts/test.sh`` installs it when missing and
running as root); the browser is never downloaded by Playwright. Under ``CI=true`` a missing browser
or Playwright is a failure, not a skip.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
EXAMPLES = json.loads((ROOT / "mmkv" / "assets" / "examples" / "examples.json").read_text())
CHROMIUM = os.environ.get("MMKV_CHROMIUM", "/usr/bin/chromium")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--no-first-run", "--disable-dev-shm-usage"]


def _missing(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: the browser test must run; scripts/test.sh installs chromium as root)")
    pytest.skip(reason)


try:
    from playwright.sync_api import expect, sync_playwright

    # Every wait is a condition on the page with a generous limit (a loaded CI machine renders slowly),
    # never a fixed sleep; a condition that holds returns at once.
    expect.set_options(timeout=60_000)
except ImportError:  # pragma: no cover - reported by the fixture below
    sync_playwright = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    if sync_playwright is None:
        _missing("playwright is not installed (pip install -r requirements-dev.txt)")
    if not os.access(CHROMIUM, os.X_OK):
        _missing(f"{CHROMIUM} not found (apt-get install -y --no-install-recommends chromium)")
    from mmkv.testing.tiny import save_tiny

    model = save_tiny("qwen2_5_vl", tmp_path_factory.mktemp("model") / "tiny")
    port = _free_port()
    log = tmp_path_factory.mktemp("log") / "app.log"
    env = {**os.environ, "MMKV_MODEL": str(model), "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the app exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"the app did not start listening in 300 s:\n{log.read_text()[-3000:]}")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]


def _loaded_images(page, selector: str, at_least: int) -> int:
    """Wait until ``at_least`` images under ``selector`` have loaded (decoded, non-empty); return how many have."""
    script = "els => els.filter(e => e.complete && e.naturalWidth > 0).length"
    page.wait_for_function(f"Array.from(document.querySelectorAll({selector!r})).filter(e => e.complete && e.naturalWidth > 0)"
                           f".length >= {at_least}")
    return page.eval_on_selector_all(selector, script)


def _count(page, selector: str) -> int:
    page.wait_for_function(f"document.querySelectorAll({selector!r}).length > 0")
    return page.locator(selector).count()


def test_app_in_chromium(app_url):
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        try:
            page.goto(app_url, wait_until="domcontentloaded")
            expect(page.locator("#model-status")).to_contain_text("parameters")

            # ---- Chat: click an example, send it, get a streamed answer -------------------------
            first, fourth = (e["text"] for e in EXAMPLES[:4:3])
            page.locator("#chat-examples").get_by_text(first).click()
            box = page.locator("#chat-input textarea")
            expect(box).to_have_value(first)
            box.press("Enter")
            expect(page.locator("#chat-status")).to_contain_text("Done", timeout=90_000)
            expect(page.locator("#chat-summary")).to_contain_text("KV bytes")
            assert page.locator("#chatbot").get_by_text(first).count() >= 1
            page.screenshot(path=str(ARTIFACTS / "app-chat.png"), full_page=True)

            # ---- Compare: example + Full + two methods ----------------------------------------
            page.get_by_role("tab", name="Compare").click()
            page.locator("#compare-examples").get_by_text(fourth).click()
            expect(page.locator("#compare-input textarea")).to_have_value(fourth)
            methods = page.locator("#compare-methods")
            for name, want in (("full", True), ("snapkv", True), ("adakv", False), ("streamingllm", True)):
                checkbox = methods.locator(f"input[name='{name}']")
                if checkbox.is_checked() != want:
                    checkbox.click()
            page.locator("#compare-run").click()
            expect(page.locator("#compare-status")).to_contain_text("Ran 3 generations", timeout=120_000)
            table = page.locator("#compare-table")
            for name in ("full", "snapkv", "streamingllm"):
                expect(table).to_contain_text(name)
            for plot in ("#compare-memory", "#compare-speed", "#compare-agreement", "#compare-kept"):
                expect(page.locator(f"{plot} .js-plotly-plot")).to_be_visible()
            assert _count(page, "#compare-kept .heatmaplayer image") >= 1  # the kept map is a rendered heatmap
            assert _loaded_images(page, "#compare-gallery img", 2) >= 2
            page.screenshot(path=str(ARTIFACTS / "app-compare.png"), full_page=True)

            # ---- Inspect: overlays over image and frames, heatmaps, token strip ------------------
            page.get_by_role("tab", name="Inspect").click()
            expect(page.locator("#inspect-summary")).to_contain_text("compare")
            assert _loaded_images(page, "#inspect-gallery img", 3) >= 3
            expect(page.locator("#inspect-gallery")).to_contain_text("video 1 · frame")
            assert _count(page, "#inspect-preference .heatmaplayer image") >= 1  # layer x head heatmap drawn
            expect(page.locator("#inspect-budget .js-plotly-plot")).to_be_visible()
            expect(page.locator("#inspect-strip")).to_contain_text("kept")
            page.screenshot(path=str(ARTIFACTS / "app-inspect.png"), full_page=True)
            # one layer and one KV head: the views re-render without re-running the model
            for selector, option in (("#inspect-layer", "layer 1"), ("#inspect-head", "KV head 0")):
                page.locator(f"{selector} input").click()
                page.get_by_role("option", name=option, exact=True).click()
            expect(page.locator("#inspect-summary")).to_contain_text("Showing: layer 1, KV head 0")

            # ---- About --------------------------------------------------------------------------
            page.get_by_role("tab", name="About").click()
            expect(page.locator("#about")).to_contain_text("snapkv")
            page.screenshot(path=str(ARTIFACTS / "app-about.png"), full_page=True)
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "app-failure.png"), full_page=True)
            raise
        finally:
            browser.close()
        assert not errors, f"JavaScript errors on the page: {errors}"
