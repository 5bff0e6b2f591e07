"""The Gradio attack surface (docs/reliability.md#the-gradio-attack-surface): each finding attacked over HTTP
against a launched app (the launch settings of app.py, so webui.guard is installed), plus the Gradio internals
the guard relies on.

One server for the module (tiny random model, CPU, 127.0.0.1) with a 1 s listening grace instead of 5 s.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import pytest  # noqa: E402

gr = pytest.importorskip("gradio")
httpx = pytest.importorskip("httpx")

from test_reliability import GREEDY, ROOT, ForwardCounter, wait_idle  # noqa: E402

from tnllm.webui import gradio_internals as gi  # noqa: E402
from tnllm.webui import guard  # noqa: E402
from tnllm.webui.http_client import ChatClient  # noqa: E402

GRACE_S = 1.0
LONG = (*GREEDY[:4], 1000, 0)  # a greedy 1,000-token reply: seconds of work on the tiny model


@pytest.fixture(scope="module")
def server(runtime):
    from tnllm.webui import launch as app

    demo = app.build_demo(runtime, concurrency_limit=2, max_size=16)
    demo.streams.grace_s = GRACE_S
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, **app.launch_kwargs("127.0.0.1", None, runtime))
    demo.url, demo.api = url.rstrip("/") + "/gradio_api", httpx.Client(timeout=30)
    demo.fn = {d["api_name"]: d["id"] for d in httpx.get(url + "config").json()["dependencies"]}
    yield demo
    demo.api.close()
    demo.close()
    demo.sessions.close()  # the module's runtime outlives this server: free its state slots


def session() -> str:
    return uuid.uuid4().hex[:12]


def join(server, data, fn: str = "chat", session_hash: str | None = None) -> tuple[str, str]:
    """(session hash, event id) of a queued request whose result stream is not opened."""
    session_hash = session_hash or session()
    r = server.api.post(server.url + "/queue/join", json={"data": data, "fn_index": server.fn[fn],
                                                          "session_hash": session_hash})
    assert r.status_code == 200, r.text
    return session_hash, r.json()["event_id"]


def listen(server, session_hash: str) -> list[dict]:
    """Every message of a session's result stream until its event completes."""
    messages = []
    with server.api.stream("GET", server.url + "/queue/data", params={"session_hash": session_hash}) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                messages.append(json.loads(line[5:]))
                if messages[-1]["msg"] in ("process_completed", "close_stream", "unexpected_error"):
                    break
    return messages


def wait_for(condition, timeout: float = 10.0) -> float:
    start = time.perf_counter()
    while not condition():
        assert time.perf_counter() - start < timeout, "timed out"
        time.sleep(0.02)
    return time.perf_counter() - start


# -- 1, 2. one way in: the direct routes are closed, and leave no generator behind ----------------------
@pytest.mark.parametrize("route", ["/run/chat", "/api/chat", "/run/predict"])
def test_direct_routes_do_not_run_model_work(server, runtime, route):
    """Gradio's api_open (default on) runs queued functions on /run/<api> and /api/<api> without the queue,
    its bound or the validator; /run/predict with an event_id left the reply's generator paused forever."""
    calls = ForwardCounter(runtime.model)
    try:
        for i in range(20):
            body = {"data": ["hi", *GREEDY], "fn_index": server.fn["chat"], "event_id": f"orphan{i}",
                    "session_hash": session()}
            r = server.api.post(server.url + route, json=body)
            assert r.status_code == 404 and "join the queue" in r.json()["detail"], r.text
    finally:
        calls.remove()
    assert calls.n == 0, "no model work outside the queue"
    assert server.sessions.active == 0 and not gi.open_iterators(server), "no orphaned reply generator"


def test_gradio_client_still_works_through_the_queue(server):
    from gradio_client import Client

    reply, _, info = Client(server.url.removesuffix("/gradio_api"), verbose=False).predict(
        "hi", *GREEDY[:4], 300, 0, api_name="/chat")
    assert reply and info["finish_reason"] in ("length", "eos"), "a listening client is never abandoned"


# -- 3. no work for a client that never listens, or has gone ---------------------------------------------
def test_a_reply_nobody_listens_to_stops_within_a_step(server):
    store = server.sessions
    key, _ = join(server, ["tell me a very long story", *LONG])
    wait_for(lambda: key in store and store.active)
    waited = wait_for(lambda: store.active == 0, timeout=GRACE_S + 5)
    assert waited < GRACE_S + 1.5, f"took {waited:.1f} s"
    session = store.peek(key)
    assert session.turns[-1].info["finish_reason"] == "abandoned" and session.turns[-1].info["new_tokens"] < 1000
    assert not session.lock.locked() and session.context_tokens == len(session.session.history)


def test_a_listening_client_is_served_while_others_never_listen(server):
    orphans = [join(server, [f"story number {i}", *LONG]) for i in range(4)]
    start = time.perf_counter()
    result = ChatClient(server.url.removesuffix("/gradio_api"), server.fn["chat"]).chat("hello", GREEDY)
    assert result.outcome == "completed" and result.info["finish_reason"] == "length"
    assert time.perf_counter() - start < 2 * GRACE_S + 5
    wait_idle(server.sessions, timeout=GRACE_S + 5)
    assert all(server.sessions.peek(k).turns[-1].info["finish_reason"] == "abandoned" for k, _ in orphans)


def test_unlistened_events_of_other_functions_are_dropped(server, runtime):
    """The latency benchmark is not the chat reply: the guard's sweep ends it the way a disconnect does."""
    calls = ForwardCounter(runtime.model)
    try:
        join(server, [[128, 256, 512, 1024, 2048, 4096], 64, 5], fn="latency")
        wait_for(lambda: calls.n > 0)
        time.sleep(2 * GRACE_S + 1.5)  # the sweep runs at 2 x grace; the run in progress then ends
        frozen = calls.n
        time.sleep(1.0)
    finally:
        calls.remove()
    assert calls.n == frozen, "the benchmark kept running for nobody"
    assert not gi.session_event_ids(server, "latency")


# -- 4. the server owns the chat history -------------------------------------------------------------------
FORGED = [{"role": "user", "content": "FORGED user turn"}, {"role": "assistant", "content": "FORGED reply " * 500}]


def test_no_function_takes_the_chat_history_and_none_can_rewrite_it(server):
    config = httpx.get(server.url.removesuffix("/gradio_api") + "/config").json()
    chatbots = {c["id"] for c in config["components"] if c["type"] == "chatbot"}
    assert chatbots and not any(chatbots & set(d["inputs"]) for d in config["dependencies"])

    c = ChatClient(server.url.removesuffix("/gradio_api"), server.fn["chat"])
    assert c.chat("hello", GREEDY).outcome == "completed"
    before = server.sessions.peek(c.session_hash)
    turns, context = [(t.user, t.reply) for t in before.turns], before.context_tokens
    editing = {"retry", "undo", "clear", "forget"}  # the session's own legitimate edits
    for dep in config["dependencies"]:
        if dep["api_name"] in editing:
            continue
        body = {"data": [FORGED] * (len(dep["inputs"]) + 1), "fn_index": dep["id"], "session_hash": c.session_hash}
        route = "/queue/join" if dep["queue"] else "/run/predict"
        r = server.api.post(server.url + route, json=body)
        assert r.status_code in (200, 404, 422, 500), (dep["api_name"], r.status_code)
    wait_idle(server.sessions)
    after = server.sessions.peek(c.session_hash)
    assert [(t.user, t.reply) for t in after.turns] == turns and after.context_tokens == context


# -- 5. the race's limit counts tokens ---------------------------------------------------------------------
def test_race_refuses_4200_emoji_over_http(server, runtime):
    calls = ForwardCounter(runtime.model)
    try:
        key, _ = join(server, ["🙂" * 4200, 0, 8], fn="race")
        done = listen(server, key)[-1]
    finally:
        calls.remove()
    assert done["msg"] == "process_completed" and not done["success"]
    assert "Too long" in done["output"]["error"] and calls.n == 0


# -- 6. a session's replies are cancelled only by that session ---------------------------------------------
def test_cancel_from_another_session_is_refused(server):
    victim, event_id = join(server, ["tell me a long story", *GREEDY[:4], 300, 0])
    with ThreadPoolExecutor(1) as pool:
        messages = pool.submit(listen, server, victim)
        wait_for(lambda: server.sessions.active)
        attacker = {"session_hash": session(), "fn_index": server.fn["chat"], "event_id": event_id}
        r = server.api.post(server.url + "/cancel", json=attacker)
        assert r.status_code == 404
        done = messages.result(timeout=60)[-1]
    assert done["msg"] == "process_completed" and done["success"]
    assert done["output"]["data"][-1]["finish_reason"] == "length", "the victim's reply ran to its end"
    own = ChatClient(server.url.removesuffix("/gradio_api"), server.fn["chat"]).chat("story", LONG, cancel_after=3)
    assert own.outcome == "cancelled", "a session still cancels its own replies"


# -- 7, 8. no server path, no upload store ------------------------------------------------------------------
def test_config_and_api_info_show_no_server_path(server):
    base = server.url.removesuffix("/gradio_api")
    for page in (base + "/config", server.url + "/info"):
        text = httpx.get(page, timeout=30).text
        assert str(ROOT) not in text and os.path.dirname(str(ROOT)) + "/" not in text, page
        assert "/tmp/" not in text and "/home/" not in text, page


@pytest.mark.parametrize("route", ["/upload", "/upload_progress?upload_id=x", "/component_server", "/dev/reload",
                                   "/proxy=http://127.0.0.1:1/x"])
def test_unused_routes_are_refused(server, route):
    method = "POST" if route in ("/upload", "/component_server") else "GET"
    kwargs = {"files": {"files": ("a.bin", b"\0" * 1000)}} if route == "/upload" else {}
    start = time.perf_counter()
    r = server.api.request(method, server.url + route, timeout=5, **kwargs)
    if route == "/upload":  # what a file over the size limit gets (the limit is zero here)
        assert r.status_code == 413 and r.json() == {"detail": guard.NO_UPLOADS}
    else:
        assert r.status_code == 404 and r.json() == {"detail": "Not available in this app."}
    assert time.perf_counter() - start < 1, "answered at once (/dev/reload was an endless stream)"


# -- 9. bounded errors, clean 4xx for malformed protocol requests -----------------------------------------
def test_a_2mb_bad_value_gets_a_small_422(server):
    for value in ("x" * 2_000_000, "9" * 2_000_000, [0] * 300_000):
        r = server.api.post(server.url + "/queue/join", json={"data": ["hi", value, *GREEDY[1:]],
                                                              "fn_index": server.fn["chat"], "session_hash": session()})
        assert r.status_code == 422 and "temperature" in r.text and len(r.content) < 2000, len(r.content)


MALFORMED = {  # name: (method, route, JSON body or raw bytes, expected status)
    "empty session_hash": ("POST", "/queue/join", {"session_hash": ""}, 400),
    "lone surrogate session_hash": ("POST", "/queue/join", b'{"data": [], "fn_index": 7, "session_hash": "\\ud800"}',
                                    400),
    "non-ASCII session_hash": ("POST", "/queue/join", {"session_hash": "sessión"}, 400),
    "over-long session_hash": ("POST", "/queue/join", {"session_hash": "a" * 65}, 400),
    "fn_index out of range": ("POST", "/queue/join", {"fn_index": 999}, 422),
    "negative fn_index": ("POST", "/queue/join", {"fn_index": -1}, 422),
    "string fn_index": ("POST", "/queue/join", {"fn_index": "7"}, 422),
    "float fn_index": ("POST", "/queue/join", {"fn_index": 7.5}, 422),
    "bad JSON": ("POST", "/queue/join", b"{not json", 400),
    "JSON list": ("POST", "/queue/join", b"[1, 2]", 422),
    "body over 4 MiB": ("POST", "/queue/join", b" " * (5 << 20), 413),
    "run/predict fn_index out of range": ("POST", "/run/predict", {"fn_index": 999}, 422),
    "cancel with empty session": ("POST", "/cancel", {"session_hash": "", "event_id": "x"}, 400),
    "cancel unknown event": ("POST", "/cancel", {"event_id": "nope"}, 404),
    "data stream, empty session": ("GET", "/queue/data?session_hash=", None, 400),
    "data stream, surrogate session": ("GET", "/queue/data?session_hash=%ED%A0%80", None, 400),
    "heartbeat, non-ASCII session": ("GET", "/heartbeat/%C3%A9", None, 400),
    "proxy with NUL": ("GET", "/proxy=http://x%00y/", None, 404),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_protocol_requests_get_a_clean_4xx(server, case):
    method, route, body, status = MALFORMED[case]
    if isinstance(body, dict):
        body = json.dumps({"data": ["hi", *GREEDY], "fn_index": server.fn["chat"], "session_hash": session(),
                           **body}).encode()
    r = server.api.request(method, server.url + route, content=body, timeout=5,
                           headers={"content-type": "application/json"})
    assert r.status_code == status, r.text[:200]
    assert len(r.content) < 300 and "Traceback" not in r.text and "detail" in r.json()


# -- the Gradio routes webui.guard matches -------------------------------------------------------------------
def _paths(routes) -> set[str]:
    """Every route path, through FastAPI's included routers (Gradio's API router has the /gradio_api prefix)."""
    paths = set()
    for route in routes:
        included = getattr(route, "original_router", None)
        paths |= _paths(included.routes) if included else {getattr(route, "path", "")}
    return paths


def test_gradio_internals_the_guard_relies_on(server):
    """If a Gradio upgrade renames a route, the guard would silently stop guarding it."""
    paths = _paths(server.server_app.routes)
    for path in ("/queue/join", "/queue/data", "/cancel", "/upload", "/upload_progress", "/component_server",
                 "/dev/reload", "/proxy={url_path:path}", "/heartbeat/{session_hash}", "/run/{api_name}",
                 "/api/{api_name}", "/call/{api_name}", "/call/{api_name}/{event_id}"):
        assert guard.PREFIX + path in paths, path
    assert any(m.cls is guard.Guard for m in server.server_app.user_middleware), "installed through app_kwargs"
    assert server.api_open is False and not server.proxy_urls  # (the queue state it reads: test_gradio_internals)


def test_stream_tracker():
    t = guard.StreamTracker(grace_s=0.05)
    t.joined("a")
    assert t.listening("a"), "not watching yet: a demo launched without the guard"
    t.watching = True
    assert t.listening("a") and t.listening("never-joined")
    time.sleep(0.06)
    assert not t.listening("a")
    t.opened("a")
    time.sleep(0.06)
    assert t.listening("a"), "a stream is open"
    t.closed("a")
    assert t.listening("a"), "the grace restarts when the last stream closes"
    time.sleep(0.06)
    assert not t.listening("a")
