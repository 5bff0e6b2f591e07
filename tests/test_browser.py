"""The app in a real browser: headless Debian chromium driven by Python playwright.

Needs `apt-get install chromium` and `pip install playwright` (never `playwright install`: it downloads a
browser); skips cleanly without either. Screenshots go to tests/output/ (git-ignored; CI keeps them).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import pytest  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs chromium (apt-get install chromium)")
sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("gradio")
pytest.importorskip("transformers")

OUTPUT = Path(__file__).resolve().parent / "output"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def url():
    import app
    from webui.runtime import load_runtime

    runtime = load_runtime("preset:tiny", "matched", int8=False, device="cpu", max_context=4096)
    demo = app.build_demo(runtime)
    _, local_url, _ = demo.launch(prevent_thread_lock=True, quiet=True, **app.launch_kwargs("127.0.0.1", None))
    yield local_url
    demo.close()


@pytest.fixture(scope="module")
def page(url):
    OUTPUT.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        # Not "networkidle": Gradio keeps its queue connection open.
        page.goto(url, wait_until="domcontentloaded")
        page.wait_for_selector("textarea")
        yield page
        browser.close()


def last_reply(page) -> str:
    bots = page.locator("[data-testid=bot]")
    return bots.last.inner_text() if bots.count() else ""


def test_chat_streams_in_pieces_and_stops(page):
    page.get_by_text("Sampling", exact=True).click()
    max_tokens = page.get_by_label("number input for Max new tokens")
    max_tokens.wait_for(state="visible")
    max_tokens.fill("1000")  # long enough to still be streaming when Stop is clicked
    max_tokens.press("Enter")
    box = page.locator("textarea").first
    box.fill("hello there, how are you?")
    box.press("Enter")

    lengths = []
    deadline = time.monotonic() + 20
    while len(set(lengths) - {0}) < 3 and time.monotonic() < deadline:
        lengths.append(len(last_reply(page)))
        time.sleep(0.05)
    assert len({n for n in lengths if n}) >= 3, f"reply did not arrive in pieces: lengths {lengths}"
    # (No monotonic check: rendered Markdown of random text can shrink when a later token closes a "*" or "`".)

    # dispatch the click on the button itself: Gradio's status-tracker overlay can sit on top of it
    # while streaming, and a pointer click then waits until the reply has ended on its own.
    page.locator("button.stop-button").dispatch_event("click")
    page.locator("button.stop-button").wait_for(state="hidden", timeout=10_000)
    stopped = last_reply(page)
    time.sleep(1.0)
    assert last_reply(page) == stopped, "no text arrives after Stop"
    stats = page.locator("#reply-stats").inner_text()
    assert "tok/s" in stats and "recurrent state" in stats
    n_tokens = int(stats.split(" tokens")[0])
    assert 0 < n_tokens < 1000, f"Stop ended the reply early: {stats}"
    page.screenshot(path=str(OUTPUT / "app-chat.png"), full_page=True)


def test_every_finished_reply_keeps_its_stats_line(page):
    max_tokens = page.get_by_label("number input for Max new tokens")
    max_tokens.fill("8")
    max_tokens.press("Enter")
    box = page.locator("textarea").first
    stats = page.locator(".message-wrap").get_by_text("tok/s")  # the collapsed stats message's title
    for n, message in enumerate(("what do you like to do?", "and on weekends?"), start=1):
        box.fill(message)
        box.press("Enter")
        page.wait_for_function(f"document.querySelector('.message-wrap').innerText.split('tok/s').length > {n}",
                               timeout=30_000)
    titles = [stats.nth(i).inner_text() for i in range(stats.count())]
    assert len(titles) == 2 and all("recurrent state" in t and "TTFT" in t for t in titles), titles
    assert len({t.split("recurrent state ")[1] for t in titles}) == 1, f"the state size stays constant: {titles}"
    page.screenshot(path=str(OUTPUT / "app-chat-stats.png"), full_page=True)


def test_latency_tab_runs_and_plots(page):
    page.get_by_role("tab", name="Latency vs Transformer").click()
    for context in ("256", "512"):  # keep only 128 (the default selection is 128, 256, 512)
        page.get_by_label(context, exact=True).uncheck()
    page.get_by_role("button", name="Run benchmark").click()
    page.locator(".vega-embed canvas, .vega-embed svg").first.wait_for(state="visible", timeout=60_000)
    table = page.get_by_text("Llama", exact=True)
    table.first.wait_for(timeout=10_000)
    assert page.locator(".vega-embed").count() >= 3, "decode, TTFT and memory plots"
    time.sleep(0.5)  # let the plots finish drawing before the screenshot
    page.screenshot(path=str(OUTPUT / "app-latency.png"), full_page=True)
