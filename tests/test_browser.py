"""Real-browser end-to-end test: the app in a subprocess, driven through Debian Chromium by Playwright.

Starts ``python app.py`` on a free localhost port with the bundled teaching model (the default), then:
every Chat example answered correctly (the example's stored answer), Compare (Full + methods: table,
plotly charts, overlays), Inspect (overlays, heatmaps, token strip, one layer and head), saved runs
(an example run and an uploaded run file open in Inspect; saved runs side by side in Compare), the
decode replay (step buttons, arrow keys, play), presentation mode (``?present=1``: large type, the
switch on, number keys switch tabs) and the phone layout (390 px: every tab visible, tables readable).
Screenshots go to ``test-artifacts/``.

Chromium comes from ``apt-get install chromium`` (``scripts/test.sh`` installs it when missing and
running as root); the browser is never downloaded by Playwright. Under ``CI=true`` a missing browser
or Playwright is a failure, not a skip.
"""

from __future__ import annotations

import json
import os
import re
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
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-dev-shm-usage",
]


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
    port = _free_port()
    log = tmp_path_factory.mktemp("log") / "app.log"
    env = {
        **os.environ,
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("MMKV_MODEL", None)  # the bundled model: the examples' answers are checked
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py")], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
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
    page.wait_for_function(
        f"Array.from(document.querySelectorAll({selector!r})).filter(e => e.complete && e.naturalWidth > 0)"
        f".length >= {at_least}"
    )
    return page.eval_on_selector_all(selector, script)


def _count(page, selector: str) -> int:
    page.wait_for_function(f"document.querySelectorAll({selector!r}).length > 0")
    return page.locator(selector).count()


RUNS = ROOT / "mmkv" / "assets" / "runs"


def _pick(page, selector: str, option: str) -> None:
    """Choose ``option`` in the dropdown ``selector`` (Gradio renders the list on click)."""
    page.locator(f"{selector} input").click()
    page.get_by_role("option", name=option, exact=True).click()
    page.keyboard.press("Escape")


def _browser(p):
    return p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)


def test_app_in_chromium(app_url):
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        try:
            page.goto(app_url, wait_until="domcontentloaded")
            expect(page.locator("#model-status")).to_contain_text("bundled")

            # ---- Chat: every example, clicked and sent, gets its stored answer ---------------------
            box = page.locator("#chat-input textarea")
            for n, example in enumerate(EXAMPLES, start=1):
                page.locator("#chat-clear").click()
                expect(page.locator("#chat-status")).to_contain_text("cleared")
                page.locator("#chat-examples").get_by_text(example["text"].splitlines()[-1], exact=False).first.click()
                expect(box).to_have_value(example["text"])
                expect(page.locator("#chat-method input")).to_have_value(example["method"])  # the example sets it
                expect(page.locator("#chat-budget input").first).to_have_value(str(example["budget"]))
                box.press("Enter")
                expect(page.locator("#chat-status")).to_contain_text("Done", timeout=90_000)
                answer = page.locator("#chatbot .message.bot, #chatbot [data-testid='bot']").last
                expect(answer).to_contain_text(example["answer"])
                assert example["answer"] in page.locator("#chatbot").inner_text(), (n, example)
                if example.get("followup"):  # the two-question example: the kept cache lost the second image
                    box.fill(example["followup"])
                    box.press("Enter")
                    # wait for turn 2 itself: its summary and its own answer (turn 1's are on the page meanwhile)
                    expect(page.locator("#chat-summary")).to_contain_text("turn 2", timeout=90_000)
                    expect(page.locator("#chat-summary")).to_contain_text("kept for the next turn")
                    expect(page.locator("#chat-status")).to_contain_text("Done")
                    expect(page.locator("#chatbot [data-testid='bot']")).to_have_count(2)
                    second = page.locator("#chatbot .message.bot, #chatbot [data-testid='bot']").last
                    expect(second).to_contain_text("The blue square is in image")
                    expect(second).not_to_contain_text(example["followup_answer"])
                    page.screenshot(path=str(ARTIFACTS / "app-chat-followup.png"), full_page=True)
            expect(page.locator("#chat-summary")).to_contain_text("KV bytes")
            page.screenshot(path=str(ARTIFACTS / "app-chat.png"), full_page=True)
            page.locator("#chat-to-inspect").click()
            expect(page.locator("#inspect-summary")).to_contain_text("chat")

            # ---- Compare: the text-prior example, Full + LOOK-M + SnapKV + H2O -------------------------
            page.get_by_role("tab", name="Compare").click()
            lookm = next(e for e in EXAMPLES if e["method"] == "lookm")
            page.locator("#compare-examples").get_by_text(lookm["text"].splitlines()[-1], exact=False).first.click()
            expect(page.locator("#compare-input textarea")).to_have_value(lookm["text"])
            page.locator("#compare-run").click()
            expect(page.locator("#compare-status")).to_contain_text("Ran 4 generations", timeout=120_000)
            table = page.locator("#compare-table")
            for name in ("full", "lookm", "snapkv", "h2o"):
                expect(table).to_contain_text(name)
            for plot in ("#compare-memory", "#compare-speed", "#compare-agreement", "#compare-kept"):
                expect(page.locator(f"{plot} .js-plotly-plot")).to_be_visible()
            assert _count(page, "#compare-kept .heatmaplayer image") >= 1  # the kept map is a rendered heatmap
            assert _loaded_images(page, "#compare-gallery img", 2) >= 2
            header = page.locator("#compare-table th").filter(has_text="prefill").first
            assert header.bounding_box()["width"] >= 50  # headers are not broken mid-word
            page.screenshot(path=str(ARTIFACTS / "app-compare.png"), full_page=True)

            # ---- Inspect: overlays over image and frames, heatmaps, token strip ----------------------
            page.get_by_role("tab", name="Inspect").click()
            expect(page.locator("#inspect-summary")).to_contain_text("compare")
            assert _loaded_images(page, "#inspect-gallery img", 3) >= 3
            assert _count(page, "#inspect-preference .heatmaplayer image") >= 1  # layer x head heatmap drawn
            expect(page.locator("#inspect-budget .js-plotly-plot")).to_be_visible()
            expect(page.locator("#inspect-strip")).to_contain_text("kept")
            page.screenshot(path=str(ARTIFACTS / "app-inspect.png"), full_page=True)
            for selector, option in (("#inspect-layer", "layer 1"), ("#inspect-head", "KV head 0")):
                page.locator(f"{selector} input").click()
                page.get_by_role("option", name=option, exact=True).click()
            expect(page.locator("#inspect-summary")).to_contain_text("Showing: layer 1, KV head 0")

            # ---- Saved runs: an example run, then an uploaded run file; no model runs ---------------
            page.locator("#inspect-saved").click()
            index = json.loads((RUNS / "index.json").read_text())
            h2o = next(e for e in index if e["method"] == "h2o")
            hybrid = next(e for e in index if e["method"] == "hybridkv")
            picker = page.locator("#inspect-example-runs input")
            picker.click()
            picker.fill(h2o["file"][:2] + " ·")
            picker.press("Enter")
            page.keyboard.press("Escape")
            page.locator("#inspect-open-run").click()
            expect(page.locator("#inspect-summary")).to_contain_text("saved", timeout=30_000)
            expect(page.locator("#inspect-summary")).to_contain_text(h2o["answer"])

            # ---- Decode replay: step buttons, arrow keys, play -----------------------------------------
            replay = page.locator("#replay-summary")
            expect(replay).to_contain_text("Step 0 of")
            page.locator("#replay-next").click()
            expect(replay).to_contain_text("Step 1 of")
            page.locator("#replay-next").click()
            expect(replay).to_contain_text("Step 2 of")
            expect(replay).to_contain_text("pairs evicted at this step (H2O)")
            assert _loaded_images(page, "#replay-gallery img", 2) >= 2
            expect(page.locator("#replay-bytes .js-plotly-plot")).to_be_visible()
            page.locator("body").click(position={"x": 5, "y": 5})
            page.keyboard.press("ArrowRight")
            expect(replay).to_contain_text("Step 3 of")
            page.keyboard.press("ArrowLeft")
            expect(replay).to_contain_text("Step 2 of")
            page.locator("#replay-play").click()
            expect(replay).to_contain_text(" of ", timeout=5_000)
            page.wait_for_function(
                "document.querySelector('#replay-summary').innerText.match(/Step (\\d+) of (\\d+)/) && "
                "(m => m[1] === m[2])(document.querySelector('#replay-summary').innerText.match(/Step (\\d+) of (\\d+)/))",
                timeout=60_000,
            )  # plays to the last step and stops
            expect(page.locator("#replay-play")).to_contain_text("Play")
            page.locator("#replay").screenshot(path=str(ARTIFACTS / "app-replay.png"))
            # an uploaded run file (HybridKV: retrieval at decode)
            page.locator("#inspect-runfiles input[type=file]").set_input_files(str(RUNS / hybrid["file"]))
            page.locator("#inspect-open-run").click()
            expect(page.locator("#inspect-summary")).to_contain_text("hybridkv", timeout=30_000)
            for _ in range(3):
                page.locator("#replay-next").click()
            expect(replay).to_contain_text("retrieved for this step's query")

            # ---- Compare saved runs side by side -------------------------------------------------------
            page.get_by_role("tab", name="Compare").click()
            page.get_by_text("Compare saved runs (no model needed)").click()
            picker = page.locator("#compare-example-runs input")
            for f in (h2o["file"], hybrid["file"]):  # type to filter, Enter picks the match
                picker.click()
                picker.fill(f[:2] + " ·")
                picker.press("Enter")
            page.keyboard.press("Escape")
            expect(page.locator("#compare-example-runs")).to_contain_text(hybrid["file"][:2])
            page.locator("#compare-saved-run").click()
            expect(page.locator("#compare-status")).to_contain_text("Compared 2 saved runs")
            expect(page.locator("#compare-table")).to_contain_text("hybridkv")

            # ---- About --------------------------------------------------------------------------------
            page.get_by_role("tab", name="About").click()
            expect(page.locator("#about")).to_contain_text("snapkv")
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "app-failure.png"), full_page=True)
            raise
        finally:
            browser.close()
        assert not errors, f"JavaScript errors on the page: {errors}"


def test_presentation_mode_and_phone_layout(app_url):
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = _browser(p)
        errors: list[str] = []
        try:
            # ---- presentation mode straight from the URL: large type, the switch on, keys --------------
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(app_url + "/?present=1", wait_until="domcontentloaded")
            expect(page.locator("body")).to_have_class(re.compile("mmkv-present"))
            expect(page.locator("#present-toggle input")).to_be_checked()
            size = page.eval_on_selector("#title p", "e => parseFloat(getComputedStyle(e).fontSize)")
            assert size >= 20, size
            page.locator("body").click(position={"x": 5, "y": 5})
            page.keyboard.press("3")  # number keys switch tabs
            expect(page.get_by_role("tab", name="Inspect")).to_have_attribute("aria-selected", "true")
            page.locator("#inspect-saved").click()
            page.locator("#inspect-example-runs input").click()
            page.get_by_role("option").first.click()
            page.keyboard.press("Escape")
            page.locator("#inspect-open-run").click()
            expect(page.locator("#inspect-summary")).to_contain_text("saved", timeout=30_000)
            expect(page.locator("#inspect-budget .js-plotly-plot")).to_be_visible()
            # the figures are drawn at presentation size (once the switch's event has reached the server: under
            # load it can arrive after the run was first drawn, and then re-draws it)
            page.wait_for_function(
                "() => { const e = document.querySelector('#inspect-budget .gtitle');"
                " return e && parseFloat(getComputedStyle(e).fontSize) >= 24; }",
                timeout=30_000,
            )
            page.screenshot(path=str(ARTIFACTS / "app-present.png"), full_page=False)
            page.locator("body").click(position={"x": 5, "y": 5})
            page.keyboard.press("p")  # and off again
            expect(page.locator("body")).not_to_have_class(re.compile("mmkv-present"))
            page.close()

            # ---- phone: every tab reachable, tables scroll instead of wrapping a letter per line ------
            phone = browser.new_page(viewport={"width": 390, "height": 844})
            phone.on("pageerror", lambda exc: errors.append(str(exc)))
            phone.goto(app_url, wait_until="domcontentloaded")
            expect(phone.locator("#model-status")).to_contain_text("bundled")
            tabs = phone.get_by_role("tab")
            for name in ("Chat", "Compare", "Inspect", "About"):
                expect(phone.get_by_role("tab", name=name)).to_be_visible()
            assert tabs.count() == 4
            phone.get_by_role("tab", name="Compare").click()
            phone.locator("#compare-examples").get_by_text(EXAMPLES[0]["text"], exact=False).first.click()
            phone.locator("#compare-run").click()
            expect(phone.locator("#compare-status")).to_contain_text("Ran", timeout=120_000)
            answer = phone.locator("#compare-table th").filter(has_text="answer").first
            assert answer.bounding_box()["width"] >= 60
            phone.screenshot(path=str(ARTIFACTS / "app-phone-compare.png"), full_page=True)
            phone.get_by_role("tab", name="Inspect").click()
            expect(phone.locator("#inspect-summary")).to_contain_text("compare")
            phone.screenshot(path=str(ARTIFACTS / "app-phone-inspect.png"), full_page=True)
        finally:
            browser.close()
        assert not errors, f"JavaScript errors on the page: {errors}"
