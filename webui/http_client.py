"""A minimal HTTP client of the app's /chat endpoint (Gradio's queue protocol over SSE), for the reliability
tests and bench/soak.py: one session per `ChatClient`, streaming, cancel and abrupt disconnect.

    POST {url}gradio_api/queue/join  {data, fn_index, session_hash}  -> 200 {event_id} | 422 invalid | 503 full
    GET  {url}gradio_api/queue/data?session_hash=...                 -> SSE: process_generating ... completed
    POST {url}gradio_api/cancel      {session_hash, fn_index, event_id}
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

import httpx

from tnllm.webui.validation import message_text


@dataclass
class ChatResult:
    status: int                      # HTTP status of the join (200, 422, 503, ...)
    reply: str = ""
    updates: int = 0                 # streamed updates received
    info: dict = field(default_factory=dict)
    error: str | None = None         # 422/503 detail, or the server's error message
    outcome: str = ""                # "completed", "cancelled", "disconnected", "rejected", "busy", "error"
    cancelled_at: float | None = None  # time.perf_counter() when the cancel request was sent
    first_text_at: float | None = None  # time.perf_counter() of the first streamed update carrying reply text
    last_text_at: float | None = None   # ... of the message that brought the reply's text to its final form
    done_at: float | None = None     # time.perf_counter() when the final result arrived


class ChatClient:
    """One chat session (its own session hash) against a running app."""

    def __init__(self, url: str, fn_index: int, timeout: float = 120.0):
        self.url = url.rstrip("/") + "/gradio_api/"
        self.fn_index = fn_index
        self.session_hash = uuid.uuid4().hex[:12]
        self.http = httpx.Client(timeout=timeout)

    def close(self) -> None:
        self.http.close()

    @staticmethod
    def find_fn_index(url: str) -> int:
        config = httpx.get(url.rstrip("/") + "/config", timeout=30).json()
        for dep in config["dependencies"]:
            if dep.get("api_name") == "chat":
                return dep["id"]
        raise LookupError("no /chat endpoint")

    def chat(self, message, controls: tuple, *, cancel_after: int | None = None,
             disconnect_after: int | None = None) -> ChatResult:
        """Send one turn (history comes from the server-side session state) and stream it to the end, or
        cancel (Stop button: POST /cancel) / drop the connection after that many streamed updates."""
        body = {"data": [message, *controls], "fn_index": self.fn_index, "session_hash": self.session_hash,
                "event_data": None, "trigger_id": None}
        join = self.http.post(self.url + "queue/join", json=body)
        if join.status_code != 200:
            return _refused(join)
        event_id = join.json()["event_id"]
        result = ChatResult(200)
        with self.http.stream("GET", self.url + "queue/data", params={"session_hash": self.session_hash}) as stream:
            for line in stream.iter_lines():
                if not line.startswith("data:"):
                    continue
                msg = json.loads(line[5:])
                kind = msg.get("msg")
                if kind == "process_generating":
                    _take_update(result, msg)
                    if cancel_after is not None and result.updates >= cancel_after:
                        self._cancel(result, event_id)
                        cancel_after = None
                    if disconnect_after is not None and result.updates >= disconnect_after:
                        result.outcome = "disconnected"
                        return result  # leaving the `with` closes the connection mid-stream
                elif kind == "process_completed":
                    return _take_completion(result, msg)
                elif kind in ("close_stream", "unexpected_error"):
                    result.outcome = result.outcome or "error"
                    result.error = result.error or msg.get("message")
                    return result
        result.outcome = result.outcome or "error"
        return result

    def _cancel(self, result: ChatResult, event_id: str) -> None:
        """What the Stop button's cancel does: POST /cancel for this event."""
        result.cancelled_at = time.perf_counter()
        self.http.post(self.url + "cancel", json={"session_hash": self.session_hash, "fn_index": self.fn_index,
                                                   "event_id": event_id})
        result.outcome = "cancelled"


def _refused(join: httpx.Response) -> ChatResult:
    """A join the server refused (422 validator verdicts, 503 full queue, ...), its detail as one string."""
    try:
        detail = join.json().get("detail")
    except ValueError:
        detail = join.text
    if isinstance(detail, list):  # the validator's verdict per input: keep the failing ones
        detail = " ".join(d.get("message", "") for d in detail if isinstance(d, dict) and not d.get("is_valid"))
    outcome = {422: "rejected", 503: "busy"}.get(join.status_code, "error")
    return ChatResult(join.status_code, error=str(detail), outcome=outcome)


def _take_update(result: ChatResult, msg: dict) -> None:
    """One streamed update: the reply so far (the first update is the value, later ones diffs)."""
    data = msg["output"].get("data") or []
    before, result.reply = result.reply, _apply(result.reply, data[0]) if data else result.reply
    result.updates += 1
    if result.reply != before:
        result.last_text_at = time.perf_counter()
        if result.first_text_at is None:
            result.first_text_at = result.last_text_at


def _take_completion(result: ChatResult, msg: dict) -> ChatResult:
    """The final message: the whole reply and its info, or the server's error."""
    result.done_at = time.perf_counter()
    output = msg.get("output") or {}
    if msg.get("success") and output.get("data"):
        data = output["data"]
        final = message_text(data[0])
        if final != result.reply:
            result.reply, result.last_text_at = final, result.done_at
        result.info = data[-1] if isinstance(data[-1], dict) else {}
        result.outcome = result.outcome or "completed"
    elif not result.outcome:
        result.outcome, result.error = "error", str(output.get("error") or output)
    return result


def _apply(current: str, value) -> str:
    """A streamed output: the first update is the value, later ones are diffs [[op, path, value], ...]."""
    if isinstance(value, list) and all(isinstance(d, list) and len(d) == 3 for d in value):
        for op, path, piece in value:
            if path:
                continue
            if op == "append":
                current += piece
            elif op in ("replace", "add"):
                current = message_text(piece)
        return current
    return message_text(value)
