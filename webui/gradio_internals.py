"""Every use of Gradio's private state, in one place (Gradio 6.26 has no public API for any of these).

The protocol guard needs to know which function ids exist, which events a session has queued, which session an
event belongs to, and to drop a session's events; it also serialises queue joins. The soak benchmark and the
tests read how many events are queued, how many reply iterators are open and how many sessions Gradio keeps
state for. tests/test_gradio_internals.py pins each function here against the installed Gradio, so an upgrade
that renames or changes one fails there with a message naming it, rather than silently switching a check off.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Coroutine
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the guard imports this module before the model has loaded, and Gradio only after
    import gradio as gr

# Our attributes on a built demo (the session store, the stream tracker): Gradio must not use these names.
APP_ATTRIBUTES = ("sessions", "streams")


def attach(demo: gr.Blocks, name: str, value) -> None:
    """Keep `value` on `demo` as `demo.<name>` (one of APP_ATTRIBUTES), for the guard, the tests and the soak."""
    if name not in APP_ATTRIBUTES:
        raise ValueError(f"{name!r} is not one of {APP_ATTRIBUTES}")
    setattr(demo, name, value)


def blocks_of(scope: dict) -> gr.Blocks:
    """The Blocks a request is served by (an ASGI scope's app is Gradio's FastAPI App)."""
    return scope["app"].get_blocks()


def function_ids(blocks: gr.Blocks) -> Collection[int]:
    """The ids a queue-protocol request may name as `fn_index`."""
    return blocks.fns.keys()


def session_event_ids(blocks: gr.Blocks, session: str) -> Collection[str]:
    """The ids of the events `session` has queued or running."""
    return blocks._queue.pending_event_ids_session.get(session, ())


def event_session(blocks: gr.Blocks, event_id) -> str | None:
    """The session hash of a queued or running event, or None for an unknown id."""
    event = blocks._queue.event_ids_to_events.get(event_id)
    return event.session_hash if event is not None else None


def drop_session_events(blocks: gr.Blocks, session: str) -> Coroutine:
    """Gradio's own disconnect path for `session`: queued events leave the queue, a running one ends at its next
    yield. Returns the coroutine to schedule on the server's event loop."""
    return blocks._queue.clean_events(session_hash=session)


def serialize_joins(demo: gr.Blocks) -> None:
    """Admit one queue join at a time. Gradio 6.26 checks `max_size` before awaiting the validator and enqueues
    after it, so a burst of simultaneous requests all pass the check and the bound is exceeded; one at a time
    (validation takes milliseconds), the bound is exact: the rest get HTTP 503 "Queue is full"."""
    queue = demo._queue
    push, lock = queue.push, asyncio.Lock()

    async def serialized_push(*args, **kwargs):
        async with lock:
            return await push(*args, **kwargs)

    queue.push = serialized_push


def queued_events(demo: gr.Blocks) -> int:
    """Events waiting in the queue."""
    return len(demo._queue)


def open_iterators(demo: gr.Blocks) -> int:
    """Generator handlers Gradio still holds open (a reply's stream that has not ended)."""
    return len(demo.server_app.iterators)


def gradio_sessions(demo: gr.Blocks) -> int:
    """Sessions Gradio keeps per-session state for (capped by launch's `state_session_capacity`)."""
    return len(demo.state_holder.session_data)
