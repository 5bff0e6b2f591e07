"""What Gradio 6.26 leaves open and has no switch for, closed in one place
(docs/reliability.md#the-gradio-attack-surface).

The switches Gradio does have are set where they belong: `queue(api_open=False)` in webui.ui (model work only
through the queue) and the launch settings in launch.py. Everything else is here:

* `Guard`, an ASGI middleware in front of Gradio's routes (installed by `middleware()` through launch's
  `app_kwargs`):
    - refuses the routes this app has no use for: uploads (no file input: 413, the answer to a file over the
      size limit), upload progress, `/component_server` (no server functions), `/dev/reload` (an endless
      stream meant for `gradio app.py` reloading) and `/proxy=` (no loaded Space: 404);
    - answers malformed protocol requests with a clean 4xx where Gradio answers a bare 500: a session hash
      that is empty, non-ASCII or too long, an unknown or non-integer `fn_index`, a body that is not JSON
      or larger than `MAX_BODY_BYTES`;
    - lets `/cancel` cancel only events of the session that sends it (Gradio's route closes any event id);
    - tracks which sessions have their result stream open (`StreamTracker`) and, twice the grace after a
      join, drops the events of a session nobody listens to, exactly as Gradio does when a stream
      disconnects (queued events leave the queue, a running one ends at its next yield).
* `install` also serialises queue joins (`gradio_internals.serialize_joins`), so the queue bound is exact.

Gradio's private state (function ids, a session's events, dropping them, the Blocks behind a request) is read
only through `tnllm.webui.gradio_internals`, which tests/test_gradio_internals.py pins.

The chat reply asks `StreamTracker.listening` after every prefill chunk and token (webui.chat), so a reply
nobody reads ends within one step as "abandoned", before the sweep would end it as "cancelled".
tests/test_guard.py attacks each point over HTTP and pins the Gradio routes matched here.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from urllib.parse import parse_qs

from starlette.middleware import Middleware

from tnllm.webui import gradio_internals as gi

__all__ = ["LISTEN_GRACE_S", "Guard", "StreamTracker", "install", "middleware"]

LISTEN_GRACE_S = 5.0          # a join's result stream must open within this long (clients open it right after)
FORGET_AFTER_S = 600.0        # a session's stream record is dropped this long after its last stream closed
MAX_BODY_BYTES = 4 << 20      # protocol JSON bodies: a maximal chat message is < 0.1 MB even fully escaped
SESSION_HASH = re.compile(r"[A-Za-z0-9_-]{1,64}")  # browsers send 11 base-36 characters, gradio_client a UUID
PREFIX = "/gradio_api"
REFUSED = ("/upload", "/upload_progress", "/component_server", "/dev/reload", "/proxy=")
NO_UPLOADS = "Uploads are off: this app has no file input."  # 413, as for a file over the (zero) size limit
JOINS = ("/queue/join", "/call/", "/run/", "/api/")  # POST routes that name a function and a session


class StreamTracker:
    """Session hash -> its open result streams, and since when it has had none; thread-safe.

    Knows only what the Guard tells it: until the Guard has handled a request (a demo launched without it),
    and for a session it never saw join, everyone counts as listening."""

    def __init__(self, grace_s: float = LISTEN_GRACE_S):
        self.grace_s = grace_s
        self.watching = False
        self._open: dict[str, int] = {}
        self._since: dict[str, float] = {}  # no stream open since then (the join, or the last stream's end)
        self._lock = threading.Lock()

    def joined(self, key: str) -> None:
        """A request of this session was queued: its stream has `grace_s` from now to open."""
        now = time.monotonic()
        with self._lock:
            self._forget_older_than(now - FORGET_AFTER_S)
            if not self._open.get(key):
                self._since[key] = now

    def opened(self, key: str) -> None:
        with self._lock:
            self._open[key] = self._open.get(key, 0) + 1

    def closed(self, key: str) -> None:
        with self._lock:
            self._open[key] -= 1
            if not self._open[key]:
                del self._open[key]
                self._since[key] = time.monotonic()

    def listening(self, key: str) -> bool:
        """False once `key` has had no result stream open for `grace_s`."""
        with self._lock:
            if not self.watching or self._open.get(key) or key not in self._since:
                return True
            return time.monotonic() - self._since[key] < self.grace_s

    def _forget_older_than(self, limit: float) -> None:
        for key in [k for k, t in self._since.items() if t < limit and not self._open.get(k)]:
            del self._since[key]


def install(demo, store) -> StreamTracker:
    """Wire the guard's parts into a built demo: the stream tracker (`demo.streams`, asked by the chat reply
    through `store.listening`) and serialised joins. Call after `demo.queue(...)`."""
    tracker = StreamTracker()
    gi.attach(demo, "streams", tracker)
    store.listening = tracker.listening
    gi.serialize_joins(demo)
    return tracker


def middleware() -> list[Middleware]:
    """The launch's `app_kwargs["middleware"]` (Gradio's App is a FastAPI app built with **app_kwargs)."""
    return [Middleware(Guard)]


class Refused(Exception):
    """A request answered by the guard itself: HTTP `status` with a one-line `detail`."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def _route(path: str) -> str:
    """The route inside Gradio's API: "/gradio_api/queue/join/" -> "/queue/join"."""
    path = path.removeprefix(PREFIX)
    return path.rstrip("/") or "/"


def _check_session(value, required: bool) -> None:
    if value is None and not required:
        return
    if not isinstance(value, str) or not SESSION_HASH.fullmatch(value):
        raise Refused(400, "session_hash must be 1-64 letters, digits, '-' or '_'.")


def _check_fn_index(blocks, value, required: bool) -> None:
    if value is None and not required:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value not in gi.function_ids(blocks):
        raise Refused(422, "fn_index must be the id of one of this app's functions.")


def _json_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise Refused(400, "The request body must be JSON.") from None
    if not isinstance(body, dict):
        raise Refused(422, "The request body must be a JSON object.")
    return body


class Guard:
    """ASGI middleware: the checks of the module docstring, then Gradio's own routes."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        blocks = gi.blocks_of(scope)
        tracker: StreamTracker | None = getattr(blocks, "streams", None)
        if tracker is not None:
            tracker.watching = True
        route, method = _route(scope["path"]), scope["method"]
        try:
            if route == "/upload":
                raise Refused(413, NO_UPLOADS)
            if route.startswith(REFUSED):
                raise Refused(404, "Not available in this app.")
            if method == "GET" and (route == "/queue/data" or route.startswith(("/heartbeat/", "/call/"))):
                return await self._stream(blocks, tracker, route, scope, receive, send)
            if method == "POST" and (route == "/cancel" or route.startswith(JOINS)):
                body, receive = await self._read_body(receive)
                if route == "/cancel":
                    self._check_cancel(blocks, body)
                    return await self.app(scope, receive, send)
                _check_session(body.get("session_hash"), required=route == "/queue/join")
                _check_fn_index(blocks, body.get("fn_index"), required=route == "/queue/join")
                return await self._join(blocks, tracker, scope, receive, send)
        except Refused as refused:
            return await _answer(send, refused.status, refused.detail)
        return await self.app(scope, receive, send)

    @staticmethod
    async def _read_body(receive):
        """The whole body (bounded), and a `receive` that replays it to Gradio."""
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise Refused(400, "The request body was not sent.")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise Refused(413, f"The request body is over {MAX_BODY_BYTES >> 20} MiB.")
            chunks.append(chunk)
            more = message.get("more_body", False)
        raw, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # what comes after the body: the client's disconnect
            replayed = True
            return {"type": "http.request", "body": raw, "more_body": False}

        return _json_body(raw), replay

    @staticmethod
    def _check_cancel(blocks, body: dict) -> None:
        """Gradio's /cancel removes and closes `event_id` whoever sends it; only its own session may."""
        session = body.get("session_hash")
        _check_session(session, required=True)
        _check_fn_index(blocks, body.get("fn_index"), required=True)
        if body.get("event_id") not in gi.session_event_ids(blocks, session):
            raise Refused(404, "No such event in this session.")

    async def _stream(self, blocks, tracker, route: str, scope, receive, send):
        """A result stream (/queue/data?session_hash=, /call/<api>/<event_id>) or a heartbeat: the session
        hash is checked, and the tracker counts the stream open until its response ends."""
        if route == "/queue/data" or route.startswith("/heartbeat/"):
            query = parse_qs(scope["query_string"].decode("latin-1"), keep_blank_values=True)
            session = query.get("session_hash", [None])[0] if route == "/queue/data" else route.split("/", 2)[2]
            _check_session(session, required=True)
        else:  # /call/<api>/<event_id>: the event names its session while it is queued or running
            session = gi.event_session(blocks, route.rsplit("/", 1)[-1])
        if tracker is None or session is None or route.startswith("/heartbeat/"):
            return await self.app(scope, receive, send)
        tracker.opened(session)
        try:
            return await self.app(scope, receive, send)
        finally:
            tracker.closed(session)

    async def _join(self, blocks, tracker, scope, receive, send):
        """Pass a join on; once it is queued, its session has LISTEN_GRACE_S to open its result stream."""
        status, chunks = 0, []

        async def capture(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif status == 200:
                chunks.append(message.get("body", b""))
            await send(message)

        await self.app(scope, receive, capture)
        if tracker is None or status != 200:
            return
        try:
            event_id = json.loads(b"".join(chunks)).get("event_id")
        except (ValueError, AttributeError):
            return  # a direct /run call's result (only queue=False functions answer there)
        session = gi.event_session(blocks, event_id)
        if session is not None:
            tracker.joined(session)
            # twice the grace: the chat reply's own check (every step) ends it first, as "abandoned"
            asyncio.get_running_loop().call_later(2 * tracker.grace_s, _sweep, blocks, tracker, session)


def _sweep(blocks, tracker: StreamTracker, session: str) -> None:
    """Drop a session's events if nobody has listened for its results: Gradio's own disconnect path."""
    if not tracker.listening(session):
        asyncio.ensure_future(gi.drop_session_events(blocks, session))


async def _answer(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
