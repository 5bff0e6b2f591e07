"""The Gradio app on the CPU: chat handler in-process, then the served app over HTTP with gradio_client.

Model: the tiny preset with random weights over assets/tokenizer.model ("untrained demo weights") and a
random Llama matched to it, float weights (the 8-bit path has its own tests in test_quant.py).
"""

from __future__ import annotations

import os
import time

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import pytest  # noqa: E402

gr = pytest.importorskip("gradio")
pytest.importorskip("transformers")

from tnllm.engine import ReplyStats, single_reply  # noqa: E402
from tnllm.sampling import SamplingParams  # noqa: E402
from tnllm.webui import chat as chat_module  # noqa: E402
from tnllm.webui.chat import chat_view, live_line  # noqa: E402
from tnllm.webui.validation import is_stats_message  # noqa: E402

GREEDY = dict(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, max_new_tokens=12, seed=0)
SEEDED = dict(temperature=0.9, top_p=0.95, top_k=50, repetition_penalty=1.1, max_new_tokens=16, seed=123)


def controls(p: dict, **changes) -> tuple:
    """The chat fn's additional inputs, in UI order."""
    p = {**p, **changes}
    return (p["temperature"], p["top_p"], p["top_k"], p["repetition_penalty"], p["max_new_tokens"], p["seed"])


def only_new_message(runtime, text: str, info: dict, previous: dict) -> bool:
    """The turn read only what the state had not seen: the previous reply's unfed ids (its last sampled id
    unless that was eos, then the eos closing it) and the new message, never the history."""
    unfed = 1 if previous["finish_reason"] == "eos" else 2
    return info["prompt_tokens"] == unfed + len(runtime.tokenizer.chat_ids([("human", text)]))


def engine_reply(runtime, text: str, p: dict) -> str:
    """The reply of a fresh single-session engine on the same model (no thread, nobody else in the batch)."""
    return single_reply(runtime.model, runtime.tokenizer, text, SamplingParams(**p)).text


# -- in-process ------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [GREEDY, SEEDED], ids=["greedy", "seeded-sampling"])
def test_chat_streams_the_engines_output(runtime, chat, p, monkeypatch):
    monkeypatch.setattr(chat_module, "UPDATE_INTERVAL_S", 0.0)  # an update per event (the tiny model is fast)
    updates = [reply for reply, _, _ in chat("hello there, how are you?", *controls(p))]
    assert len(updates) >= 5, "a reply streams as several cumulative updates"
    assert all(b.startswith(a) for a, b in zip(updates, updates[1:])), "updates are cumulative"
    assert updates[-1] == engine_reply(runtime, "hello there, how are you?", p)


def test_updates_are_spaced_and_lose_no_text(runtime, chat, monkeypatch):
    """Streamed updates come at most one per UPDATE_INTERVAL_S, the first text at once; text between them waits
    for the next update; the complete text streams as soon as the reply ends (before the turn is recorded), and
    the final result repeats it with the stats."""
    interval = 0.05
    monkeypatch.setattr(chat_module, "UPDATE_INTERVAL_S", interval)
    p = dict(GREEDY, max_new_tokens=300)
    stamps, updates = [], []
    for reply, _, info in chat("tell me a long story", *controls(p)):
        stamps.append(time.perf_counter())
        updates.append((reply, info))
    *streamed, (final, info) = updates
    assert len(streamed) >= 2 and all(b[0].startswith(a[0]) for a, b in zip(updates, updates[1:]))
    assert len(streamed) < info["new_tokens"], "several tokens per update"
    gaps = [b - a for a, b in zip(stamps[:-3], stamps[1:-2])]  # between streamed updates until the complete text
    assert min(gaps) >= 0.9 * interval, gaps
    assert final == engine_reply(runtime, "tell me a long story", p)
    assert streamed[-1][0] == final and streamed[-2][0] != final and info["finish_reason"] == "length"


@pytest.mark.parametrize("how", ["close", "stop-flag"], ids=["gradio-cancel", "stop-button"])
def test_stop_mid_stream_keeps_the_session_consistent(runtime, chat, how):
    """Gradio's cancel closes the generator; the Stop button sets the session's flag: either way the turn
    records what the state read, marked stopped, and the next turn continues the state."""
    eos = runtime.model.config.eos_token_id
    gen = chat("tell me a long story", *controls(SEEDED, max_new_tokens=500))
    shown = [next(gen)[0] for _ in range(6)][-1]
    session = chat.store.get("default")
    if how == "close":
        gen.close()
    else:
        session.stop.set()
        *_, (final, _, info) = gen
        assert final.startswith(shown) and info["finish_reason"] == "cancelled"
        shown = final
    held = session.session
    assert not session.lock.locked(), "Stop released the session"
    (turn,) = session.turns
    assert turn.info["new_tokens"] < 500
    assert runtime.engine.pool.position(held.slot) == len(held.history), "state holds exactly the recorded ids"
    assert held.pending[-1] == eos, "the cut reply is closed with eos before the next message"
    # the engine runs ahead of a slow reader: the turn holds every token the state read, shown or not yet
    assert (turn.user, turn.info["finish_reason"]) == ("tell me a long story", "cancelled")
    assert turn.reply.startswith(shown) and (how == "close" or turn.reply == shown)
    assert chat_view(session)[-1]["metadata"]["title"].startswith("⏹ stopped")

    *_, (reply, _, info) = chat("and then?", *controls(GREEDY))
    assert only_new_message(runtime, "and then?", info, turn.info)
    chat.store.drop("default")
    assert "default" not in chat.store and len(chat.store) == 0


def test_retry_restores_the_snapshot_and_clear_starts_fresh(runtime, chat):
    first = [u[0] for u in chat("hi!", *controls(GREEDY))][-1]
    *_, (second, _, info2) = chat("what now?", *controls(GREEDY))
    session = chat.store.get("default")
    assert session.undo().user == "what now?" and len(session.turns) == 1  # Retry = undo, then send again
    *_, (again, _, info) = chat("what now?", *controls(GREEDY))
    assert again == second and info == {**info2, "ttft_ms": info["ttft_ms"], "tokens_per_s": info["tokens_per_s"]}
    session.clear()
    *_, (fresh, _, info) = chat("hi!", *controls(GREEDY))
    assert fresh == first and info["prompt_tokens"] == len(runtime.tokenizer.chat_ids([("human", "hi!")]))


def test_undo_past_the_kept_snapshots_reads_the_remaining_turns(runtime, chat):
    replies = [[u[0] for u in chat(m, *controls(GREEDY))][-1] for m in ("one", "two", "three", "four")]
    session = chat.store.get("default")
    for _ in range(3):
        session.undo()
    assert [t.user for t in session.turns] == ["one"] and session.turns[0].reply == replies[0]
    *_, (again, _, _) = chat("two", *controls(GREEDY))
    assert again == replies[1], "the state after undo equals the state the turn first saw"


def test_live_line_shows_prefill_progress_then_speed(runtime, chat):
    lines = [line for _, line, info in chat("tell me a long story " * 150, *controls(GREEDY)) if not info]
    progress = [line for line in lines if "Reading your message" in line]
    # a slow reader gets merged updates (the latest numbers), so only the order is certain
    assert lines.index(progress[-1]) < len(progress) if progress else lines[0].startswith("<small>")
    assert " tokens · **" in lines[-1] and "tok/s" in lines[-1] and "TTFT" in lines[-1]
    assert live_line(ReplyStats(prompt_tokens=700, prefilled=512)) == (
        "<small>Reading your message: 512 of 700 tokens…</small>")
    assert live_line(ReplyStats(new_tokens=1, ttft_s=0.02)) == "<small>1 token · TTFT 20 ms</small>"


def test_bad_input_is_a_readable_error(chat):
    with pytest.raises(gr.Error, match="Type a message"):
        next(chat("  \n", *controls(GREEDY)))
    with pytest.raises(gr.Error, match="top_p"):
        next(chat("hi", *controls(GREEDY, top_p=0.0)))
    with pytest.raises(gr.Error, match="too long"):
        next(chat("x" * 9000, *controls(GREEDY)))


def test_launch_settings_are_safe(monkeypatch):
    from tnllm.webui import launch as app

    kw = app.launch_kwargs(None, None)
    assert kw["server_name"] is None, "host left to GRADIO_SERVER_NAME (127.0.0.1 unless a Space sets it)"
    assert kw["share"] is False and kw["ssr_mode"] is False and kw["show_error"] is False
    assert kw["max_file_size"] == "1mb" and kw["allowed_paths"] == [] and kw["strict_cors"] is True
    assert not (kw["enable_monitoring"] or kw["mcp_server"] or kw["run_history"])
    args = app.parse_args(["--no-int8", "--port", "7000"])
    assert args.int8 is False and args.port == 7000 and args.host is None and args.max_reply_seconds == 120
    with pytest.raises(SystemExit):
        app.parse_args(["--max-reply-seconds", "-1"])
    assert args.switch_interval_ms == app.SWITCH_INTERVAL_MS < 5  # shorter than Python's own
    monkeypatch.setenv("TNLLM_SWITCH_INTERVAL_MS", "2")
    assert app.parse_args([]).switch_interval_ms == 2
    with pytest.raises(SystemExit):
        app.parse_args(["--switch-interval-ms", "0"])


def test_switch_interval_is_set_before_the_engine_starts(monkeypatch):
    """The switch interval (given or the app's default) applies to the whole process before the model (and its
    engine thread) loads."""
    import sys

    from tnllm.webui import launch as app

    default, seen = sys.getswitchinterval(), []

    def stop_at_load(*args, **kwargs):
        seen.append(sys.getswitchinterval())
        raise app.StartupError("stop here")

    monkeypatch.setattr(app, "load_runtime", stop_at_load)
    try:
        with pytest.raises(SystemExit):
            app.main(["--switch-interval-ms", "2", "--device", "cpu"])
        with pytest.raises(SystemExit):
            app.main(["--device", "cpu"])
    finally:
        sys.setswitchinterval(default)
    assert seen == [pytest.approx(0.002), pytest.approx(app.SWITCH_INTERVAL_MS / 1e3)]


@pytest.mark.parametrize("limit_s", [1e-9, 0.3], ids=["during-prefill", "during-decode"])
def test_reply_time_limit_ends_the_reply_like_stop(runtime, limit_s):
    """A reply over `max_reply_s` ends at the next yield (a prefill chunk or a token) with "time_limit"; the
    session keeps exactly what its state saw, so the next turn continues without re-reading anything."""
    from tnllm.webui.chat import SessionStore, chat_view, make_chat_fn
    from tnllm.webui.validation import Limits

    store = SessionStore(runtime)
    chat = make_chat_fn(runtime, store, Limits.for_context(runtime.max_context, max_reply_s=limit_s))
    long_message = "tell me a long story " * 200  # > 1 prefill chunk (512 tokens)
    started = time.monotonic()
    *_, (reply, _, info) = chat(long_message, *controls(GREEDY, max_new_tokens=1000))
    elapsed = time.monotonic() - started
    assert info["finish_reason"] == "time_limit"
    assert chat_view(store.get("default"))[-1]["metadata"]["title"].startswith("⏱ time limit")
    assert elapsed < limit_s + 2.0
    if limit_s < 1e-3:  # over before the engine's first step: nothing read, nothing sampled
        assert reply == "" and info["new_tokens"] == 0 and info["context_tokens"] == 0
    else:
        assert 0 < info["new_tokens"] < 1000 and reply
    unlimited = make_chat_fn(runtime, store)  # the same session, the default limit
    *_, (_, _, info2) = unlimited("and then?", *controls(GREEDY))
    assert info2["finish_reason"] == "length"
    if info["new_tokens"]:
        assert only_new_message(runtime, "and then?", info2, info)
    else:  # the unread rest of the long message is read first, then the new one
        assert info2["prompt_tokens"] > len(runtime.tokenizer.chat_ids([("human", "and then?")]))


# -- over HTTP ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(runtime):
    from tnllm.webui import launch as app

    demo = app.build_demo(runtime)
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, **app.launch_kwargs("127.0.0.1", None))
    yield url
    demo.close()
    demo.sessions.close()  # the module's runtime outlives this server: free its state slots


@pytest.fixture
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False)


def test_http_chat_turn_streams(client, monkeypatch):
    # An update per event: with the 20 ms interval the count would follow the machine's speed (16 tokens).
    monkeypatch.setattr(chat_module, "UPDATE_INTERVAL_S", 0.0)
    job = client.submit("hello there", *controls(SEEDED), api_name="/chat")
    updates = [u[0] for u in job]
    reply, stats, info = job.result()
    assert reply and updates[-1] == reply and all(isinstance(u, str) and reply.startswith(u) for u in updates)
    assert any(0 < len(u) < len(reply) for u in updates)  # partial text reached the client before the reply ended
    assert f"{info['new_tokens']} tokens" in stats and f"{info['tokens_per_s']:.1f} tok/s" in stats
    assert f"recurrent state {info['state_bytes'] / 1024:.1f} KiB" in stats and "TTFT" in stats
    assert info["new_tokens"] == SEEDED["max_new_tokens"] or info["finish_reason"] == "eos"


def test_http_two_turns_reuse_the_state(runtime, client):
    _, _, first = client.predict("hello there", *controls(GREEDY), api_name="/chat")
    _, _, second = client.predict("and how was your day?", *controls(GREEDY), api_name="/chat")
    assert only_new_message(runtime, "and how was your day?", second, first), "not the history"
    assert second["context_tokens"] == first["context_tokens"] + second["prompt_tokens"] + second["new_tokens"] - 1
    assert second["state_bytes"] == first["state_bytes"], "the recurrent state does not grow"


def test_http_latency_returns_numbers_for_both_models(client):
    *plots, table = client.predict([128, 256], 4, api_name="/latency")
    rows = table["data"]
    assert {(r[0], r[1]) for r in rows} == {(m, c) for m in ("TNL", "Llama") for c in (128, 256)}
    for _, _, decode_ms, ttft_ms, tok_s, cache_mib, *_ in rows:
        assert decode_ms > 0 and ttft_ms > 0 and tok_s > 0 and cache_mib > 0
    cache = {(r[0], r[1]): r[5] for r in rows}
    assert cache["TNL", 128] == cache["TNL", 256] and cache["Llama", 256] > cache["Llama", 128]
    assert all(p["data"] for p in plots)


def test_http_race_streams_both_models(client):
    job = client.submit("Hi there", 128, 8, api_name="/race")
    updates = list(job)
    tnl, llama, counters = job.result()
    assert len(updates) >= 8 and "TNL" in counters and "Llama" in counters and "tok/s" in counters


def test_http_monitoring_endpoint_is_off(server):
    import httpx

    assert httpx.get(server.rstrip("/") + "/monitoring/summary").status_code != 200


def test_the_window_is_rebuilt_from_the_session_with_a_stats_message_per_reply(runtime, chat):
    """The browser's window is `chat_view` of the session: each reply followed by its stats message, which
    is display only (the session's turns, not the window, are what the model continues)."""
    *_, (first, _, info) = chat("hi!", *controls(GREEDY))
    *_, (second, _, info2) = chat("what now?", *controls(GREEDY))
    view = chat_view(chat.store.get("default"))
    assert [m["role"] for m in view] == ["user", "assistant", "assistant"] * 2
    assert [view[1]["content"], view[4]["content"]] == [first, second]
    titles = [view[2]["metadata"]["title"], view[5]["metadata"]["title"]]
    assert all(is_stats_message(view[i]) for i in (2, 5)) and f"{info['tokens_per_s']:.1f} tok/s" in titles[0]
    assert titles[0].split("recurrent state ")[1] == titles[1].split("recurrent state ")[1]
    assert chat_view(chat.store.get("default"), ("next", "partial"))[-2:] == [
        {"role": "user", "content": "next"}, {"role": "assistant", "content": "partial"}]


def test_python_app_py_serves_a_chat_end_to_end():
    """The README's first command, as a process: `python app.py` with flags → a chat turn over HTTP."""
    import signal
    import subprocess
    import sys

    from gradio_client import Client

    from tests.conftest import ROOT, free_port

    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "app.py", "--model", "preset:tiny", "--no-int8", "--device", "cpu",
                             "--port", str(port), "--max-reply-seconds", "30"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                client = Client(f"http://127.0.0.1:{port}", verbose=False)
                break
            except Exception:  # noqa: BLE001 (not up yet)
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"python app.py did not start:\n{proc.stdout.read()[-3000:]}")
                time.sleep(0.5)
        reply, _, info = client.predict("hello there", *controls(GREEDY), api_name="/chat")
        assert reply and info["finish_reason"] in ("length", "eos")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_http_api_documents_every_endpoint_by_name(client):
    """view_api: each public endpoint has its own description and named parameters and outputs, under the
    components' public names."""
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    chat = api["/chat"]
    assert [p["parameter_name"] for p in chat["parameters"]] == [
        "message", "temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens", "seed"]
    assert [r["label"] for r in chat["returns"]] == ["reply", "stats", "info"]
    for name, endpoint in api.items():
        assert endpoint.get("description") and "partial" not in endpoint["description"], name
        assert all(not p["component"].startswith("_") for p in endpoint["parameters"]), name
        assert all(r["label"] and not r["label"].startswith("value_") for r in endpoint["returns"]), name


def test_stop_sent_while_the_reply_waits_in_the_queue_ends_it_at_once(runtime, chat):
    """The browser arms the flag when the message is sent; a Stop before the reply starts ends it at its first
    step, and the next message is served normally (the flag is spent by the reply it stopped)."""
    store = chat.store
    store.arm_stop("default")
    store.stop("default")  # Stop while queued: no reply holds the session yet
    *_, (reply, _, info) = chat("hello there", *controls(GREEDY), stop_armed=True)
    assert info["finish_reason"] == "cancelled" and info["new_tokens"] <= 1
    store.arm_stop("default")
    *_, (reply, _, info) = chat("hello there", *controls(GREEDY), stop_armed=True)
    assert info["finish_reason"] == "length" and reply
