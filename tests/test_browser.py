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
def demo():
    from tnllm.webui import launch as app
    from tnllm.webui.runtime import load_runtime

    runtime = load_runtime("preset:tiny", "matched", int8=False, device="cpu", max_context=4096)
    demo = app.build_demo(runtime)
    demo.launch(prevent_thread_lock=True, quiet=True, **app.launch_kwargs("127.0.0.1", None))
    yield demo
    demo.close()
    demo.sessions.close()  # the module's runtime outlives this server: free its state slots


@pytest.fixture(scope="module")
def browser():
    OUTPUT.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(demo, browser):
    """A fresh tab (its own chat session) on the app; Gradio keeps its queue connection open, so it waits for
    the textbox, not for "networkidle"."""
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(demo.local_url, wait_until="domcontentloaded")
    page.wait_for_selector("#chat-input textarea")
    yield page
    page.close()


def session_of(demo):
    """The server-side session used last: this test's tab (each test opens its own)."""
    return list(demo.sessions._sessions.values())[-1]


def eventually(check, timeout_s: float = 10.0) -> None:
    """Wait on the server's state (the browser may show a change before the server has made it)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "the server never reached the expected state"
        time.sleep(0.05)


def set_sampling(page, **values) -> None:
    """Fill Sampling panel fields by label: max_new_tokens, seed."""
    if not page.get_by_label("Seed (-1 = random)").is_visible():
        page.get_by_text("Sampling", exact=True).click()
    for label, value in values.items():
        field = (page.get_by_label("Seed (-1 = random)") if label == "seed"
                 else page.get_by_label("number input for Max new tokens"))
        field.fill(str(value))
        field.press("Tab")


def send(page, text: str) -> None:
    box = page.locator("#chat-input textarea")
    sync_api.expect(box).to_be_editable()
    box.fill(text)
    box.press("Enter")


STATS_TITLES = "#chat-window .thought-group .title"  # each finished reply's collapsed stats message


def wait_replies(page, n: int) -> None:
    """Wait on state, not time: `n` replies have ended (each has its stats message) and the box is usable."""
    sync_api.expect(page.locator(STATS_TITLES)).to_have_count(n, timeout=60_000)
    sync_api.expect(page.locator("#chat-input textarea")).to_be_editable()
    sync_api.expect(page.locator("#chat-input button.submit-button")).to_be_visible()


def stats_titles(page) -> list[str]:
    return page.locator(STATS_TITLES).all_inner_texts()


RECORD_LENGTHS = """() => {
    // Every length the last bot message shows, recorded in the page: no round trips to miss or slow down.
    window.__lengths = [];
    const record = () => {
        const bots = document.querySelectorAll('#chat-window [data-testid=bot]');
        window.__lengths.push(bots.length ? bots[bots.length - 1].innerText.length : 0);
    };
    new MutationObserver(record).observe(document.querySelector('#chat-window'),
                                         {subtree: true, childList: true, characterData: true});
}"""


def test_chat_streams_in_pieces_and_stop_keeps_what_the_state_read(demo, page):
    set_sampling(page, max_new_tokens=1024, seed=1)  # seed 1: 1,024 tokens without eos on this model
    page.evaluate(RECORD_LENGTHS)
    send(page, "hello there, how are you?")
    page.wait_for_function("new Set(window.__lengths.filter(n => n > 0)).size >= 3", timeout=30_000)
    # dispatched on the button itself: a pointer click waits for the button to be "stable", and each streamed
    # update may re-render it
    page.locator("#chat-input button.stop-button").dispatch_event("click")
    wait_replies(page, 1)
    titles = stats_titles(page)
    assert len(titles) == 1 and titles[0].startswith("⏹ stopped"), f"the stopped reply is marked: {titles}"
    turn = session_of(demo).turns[-1]
    n_tokens = int(titles[0].split(" · ")[1].split()[0])
    assert turn.info["finish_reason"] == "cancelled" and n_tokens == turn.info["new_tokens"] < 1024
    stopped = page.locator("#chat-window [data-testid=bot]").first.inner_text()
    page.wait_for_timeout(500)
    assert page.locator("#chat-window [data-testid=bot]").first.inner_text() == stopped, "nothing after Stop"
    sync_api.expect(page.locator("#reply-stats")).to_have_text("")  # the live line is cleared

    send(page, "and then?")  # continues the state: only the new message is read
    wait_replies(page, 2)
    turn = session_of(demo).turns[-1]
    assert turn.info["prompt_tokens"] < 20 and len(stats_titles(page)) == 2
    page.screenshot(path=str(OUTPUT / "app-chat.png"), full_page=True)


def test_a_refused_seed_is_named_and_the_message_kept(demo, page):
    set_sampling(page, max_new_tokens=8, seed="1.5")
    started = demo.sessions.counts["started"]
    send(page, "hello there")
    sync_api.expect(page.get_by_text("seed must be a whole number")).to_be_visible()
    box = page.locator("#chat-input textarea")
    sync_api.expect(box).to_have_value("hello there")
    sync_api.expect(box).to_be_editable()
    assert demo.sessions.counts["started"] == started, "refused before the queue: no model work"
    assert page.locator(".toast-body.error, .error-overlay").count() == 0
    page.screenshot(path=str(OUTPUT / "app-chat-seed.png"), full_page=True)
    set_sampling(page, seed=1)
    box.press("Enter")
    wait_replies(page, 1)
    assert box.input_value() == ""


def test_every_reply_keeps_its_stats_and_undo_clear_reset_the_view(demo, page):
    set_sampling(page, max_new_tokens=8, seed=3)
    for n, message in enumerate(("what do you like to do?", "and on weekends?"), start=1):
        send(page, message)  # back to back: the second as soon as the box is usable again
        wait_replies(page, n)
    titles = stats_titles(page)
    assert len(titles) == 2 and all("recurrent state" in t and "TTFT" in t for t in titles), titles
    assert len({t.split("recurrent state ")[1] for t in titles}) == 1, f"the state size stays constant: {titles}"
    users = page.locator("#chat-window [data-testid=user]").all_inner_texts()
    assert [u.strip() for u in users] == ["what do you like to do?", "and on weekends?"]
    order = page.locator("#chat-window [data-testid=user], #chat-window [data-testid=bot]").evaluate_all(
        "nodes => nodes.map(n => n.dataset.testid)")
    assert order == ["user", "bot", "bot"] * 2, f"each reply, then its stats message; nothing stray: {order}"
    assert page.locator("#chat-window .dot-flashing").count() == 0, "no pending bubble left behind"
    page.screenshot(path=str(OUTPUT / "app-chat-stats.png"), full_page=True)

    page.get_by_role("button", name="Undo").click()
    sync_api.expect(page.locator("#chat-input textarea")).to_have_value("and on weekends?")
    sync_api.expect(page.locator("#chat-window [data-testid=user]")).to_have_count(1)
    assert len(session_of(demo).turns) == 1
    page.get_by_role("button", name="Clear").click()
    sync_api.expect(page.locator("#chat-window [data-testid=user]")).to_have_count(0)
    sync_api.expect(page.locator("#reply-stats")).to_have_text("")
    eventually(lambda: session_of(demo).turns == [])  # the window clears itself before the server does


def test_latency_tab_runs_and_plots(page):
    page.get_by_role("tab", name="Latency vs Transformer").click()
    for context in ("256", "512"):  # keep only 128 (the default selection is 128, 256, 512)
        page.get_by_label(context, exact=True).uncheck()
    page.get_by_role("button", name="Run benchmark").click()
    page.locator("#latency-status").get_by_text("Done").wait_for(timeout=60_000)
    page.locator(".vega-embed canvas, .vega-embed svg").first.wait_for(state="visible", timeout=10_000)
    assert page.locator(".vega-embed").count() >= 3, "decode, TTFT and memory plots"
    page.wait_for_timeout(500)  # let the plots finish drawing before the screenshot
    page.screenshot(path=str(OUTPUT / "app-latency.png"), full_page=True)


def test_race_stop_button_ends_the_race_as_stopped(page):
    page.get_by_role("tab", name="Latency vs Transformer").click()
    for label, value in (("New tokens", 256), ("Context before the prompt (tokens)", 3584)):  # a long race
        field = page.get_by_label(f"number input for {label}")
        field.fill(str(value))
        field.press("Tab")
    page.get_by_role("button", name="Start race").click()
    counters = page.locator("#race-counters")
    sync_api.expect(counters).to_contain_text("running", timeout=60_000)
    page.get_by_role("button", name="Stop race").dispatch_event("click")
    sync_api.expect(counters).to_contain_text("🏁", timeout=60_000)
    assert "finished: stopped" in counters.inner_text(), counters.inner_text()
