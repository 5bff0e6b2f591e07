"""What tnllm.webui.gradio_internals relies on in Gradio, pinned on a small launched app (no model).

Each function there reads or patches Gradio's private state; if an upgrade changes what one relies on, the test
of that function fails and its message names the function, before the guard or the soak silently misreads."""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
import time
from types import SimpleNamespace

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import httpx  # noqa: E402
import pytest  # noqa: E402

from tests.conftest import free_port  # noqa: E402
from tnllm.webui import gradio_internals as gi  # noqa: E402

RELEASE = threading.Event()  # the handler runs until the test lets it finish


def _wait_for_release(text: str):
    yield text
    RELEASE.wait(30)
    yield text + "!"


@pytest.fixture(scope="module")
def app():
    with gr.Blocks() as demo:
        box, out = gr.Textbox(), gr.Textbox()
        box.submit(_wait_for_release, box, out, api_name="echo")
    demo.queue(default_concurrency_limit=1, api_open=False)
    gi.serialize_joins(demo)
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, server_name="127.0.0.1", server_port=free_port())
    yield demo, url.rstrip("/") + "/gradio_api"
    demo.close()


def _join(base: str, fn_index: int, session: str) -> str:
    r = httpx.post(f"{base}/queue/join", json={"data": ["hi"], "fn_index": fn_index, "session_hash": session,
                                                "event_data": None, "trigger_id": None}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["event_id"]


def _until(condition, what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_our_attributes_are_free_on_a_blocks():
    taken = [name for name in gi.APP_ATTRIBUTES if hasattr(gr.Blocks(), name)]
    assert not taken, f"Gradio now uses {taken} on Blocks: rename them in gradio_internals.APP_ATTRIBUTES"


def test_function_ids_are_the_fn_index_clients_send(app):
    demo, _ = app
    ids = {dep["id"] for dep in demo.get_config_file()["dependencies"]}
    assert set(gi.function_ids(demo)) == ids, "function_ids: Blocks.fns keys no longer match the config's ids"


def test_events_sessions_and_iterators_of_a_running_reply(app):
    demo, base = app
    (fn_index,) = gi.function_ids(demo)
    RELEASE.clear()
    event_id = _join(base, fn_index, "pin-a")
    second = _join(base, fn_index, "pin-b")  # waits: concurrency 1
    assert gi.event_session(demo, event_id) == "pin-a", "event_session: the queue's event_ids_to_events changed"
    assert gi.event_session(demo, "no-such-event") is None
    assert event_id in gi.session_event_ids(demo, "pin-a"), "session_event_ids: pending_event_ids_session changed"
    assert gi.session_event_ids(demo, "nobody") == ()
    with httpx.stream("GET", f"{base}/queue/data", params={"session_hash": "pin-a"}, timeout=30) as stream:
        lines = stream.iter_lines()
        next(line for line in lines if "process_generating" in line)
        _until(lambda: gi.open_iterators(demo) == 1, "open_iterators: server_app.iterators no longer holds the reply")
        assert gi.queued_events(demo) == 1, "queued_events: len(Blocks._queue) no longer counts waiting events"
        RELEASE.set()
        next(line for line in lines if "process_completed" in line)
    _until(lambda: gi.open_iterators(demo) == 0, "open_iterators: a finished reply's iterator stays")
    assert gi.gradio_sessions(demo) >= 1, "gradio_sessions: state_holder.session_data no longer holds sessions"
    assert second in gi.session_event_ids(demo, "pin-b")


def test_drop_session_events_is_gradios_disconnect_path(app):
    demo, _ = app
    clean = demo._queue.clean_events
    assert inspect.iscoroutinefunction(clean) and "session_hash" in inspect.signature(clean).parameters, \
        "drop_session_events: Queue.clean_events(session_hash=...) changed"
    coroutine = gi.drop_session_events(demo, "pin-b")
    assert inspect.iscoroutine(coroutine)
    coroutine.close()


def test_serialize_joins_wraps_the_queues_push(app):
    demo, _ = app
    assert inspect.iscoroutinefunction(type(demo._queue).push), "serialize_joins: Queue.push is no longer async"
    assert demo._queue.push.__name__ == "serialized_push", "serialize_joins: the patched push was replaced"


def test_serialized_joins_keep_their_order():
    """One join at a time, in the order they arrived (a stand-in queue whose earlier pushes take longer)."""
    class Queue:
        async def push(self, i):
            await asyncio.sleep(0.01 * (3 - i))
            order.append(i)

    order, demo = [], SimpleNamespace(_queue=Queue())
    gi.serialize_joins(demo)

    async def main():
        await asyncio.gather(*(demo._queue.push(i) for i in range(3)))

    asyncio.run(main())
    assert order == [0, 1, 2]
