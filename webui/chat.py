"""Chat sessions and the reply handler: one engine session per browser session, streamed token by token.

The server owns each conversation. A session (keyed by Gradio's session hash) holds an engine session (its
recurrent state in one slot of the engine's pool, so concurrent users' replies decode as one batch) and the
turns that state has read; the browser's chat window is only a view of them, rebuilt by the server after
every update (`chat_view`). Nothing a client sends can rewrite a session's history, a new turn prefills only
its new message (the state has the same size however long the chat gets: the point of the model), and after
Stop, a time limit or an error the browser shows exactly what the state saw.

Stop is a flag the handler checks after every event of the reply (each prefill chunk and each token:
`SessionStore.stop`); it cancels the reply, which the engine ends at its next step, so Stop does not depend on
Gradio's event cancellation reaching the worker. Gradio's cancel and a client disconnect close the generator
at its next yield, which cancels the reply and records the turn the same way. A reply nobody reads (no result
stream open: `SessionStore.listening`, told by webui.guard) ends the same way, as "abandoned".
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field

import gradio as gr

from tnllm.engine import PoolFullError, Reply, ReplyStats, Session, Snapshot
from tnllm.memory import malloc_trim
from tnllm.webui.runtime import CHAT_SESSIONS, Runtime
from tnllm.webui.validation import FIELDS, STATS_ID, InputError, Limits, check_request, clean_text

__all__ = ["ChatSession", "SessionStore", "Turn", "chat_view", "live_line", "make_chat_fn", "make_validator",
           "session_key", "stats_message"]
log = logging.getLogger("tnllm.app")

MAX_SNAPSHOTS = 2         # states kept for retry/undo per session (each is one state: constant size)
STOP_WAIT_S = 30.0        # Stop waits this long at most for the reply to record its turn (one step in practice)
# The reply streams at most one update per this many seconds (the first text and the end go out at once; text
# between them waits for the next update, never skipped). Each update costs the server Python time (the queue's
# diff, JSON, SSE) that it takes from the engine thread of the same process: one update per token slowed a
# fast model's decoding to half its speed. 50 updates a second is more than a reader can follow.
UPDATE_INTERVAL_S = 0.02
# Finish reasons whose streamed text is the reply as recorded (the others end with a notice, or raise).
COMPLETE_AS_STREAMED = frozenset({"eos", "length", "stop", "time_limit"})
NUMERICAL_NOTICE = ("⚠️ Generation stopped: the model produced invalid numbers (NaN/inf). Nothing after this point "
                    "was sampled, and this conversation's model state was reset; send your message again.")
INTERNAL_NOTICE = "Internal error while generating; this conversation's model state was reset. Please try again."
ENDED = {"eos": "", "length": "length limit", "stop": "stop string", "cancelled": "⏹ stopped",
         "time_limit": "⏱ time limit", "abandoned": "⏹ abandoned (no client listening)"}


@dataclass
class Turn:
    """One exchange as the state read it: the user's text, the reply as streamed, and its stats."""

    user: str
    reply: str
    info: dict = field(default_factory=dict)


@dataclass
class ChatSession:
    """One browser session: its engine session (state slot + ids), its turns, snapshots for retry/undo, and its
    Stop flag."""

    runtime: Runtime
    session: Session = None  # type: ignore[assignment]
    turns: list[Turn] = field(default_factory=list)
    snapshots: dict[int, Snapshot] = field(default_factory=dict)    # n turns -> the session after n turns
    lock: threading.Lock = field(default_factory=threading.Lock)      # held while a reply streams
    stop: threading.Event = field(default_factory=threading.Event)    # set by the Stop button
    reply: Reply | None = None                                        # the reply streaming now, if any

    def __post_init__(self) -> None:
        self.session = self.session or self.runtime.engine.open()

    def clear(self) -> None:
        """A fresh conversation (Clear, and after a numerical fault or an internal error)."""
        if not self.session.closed:  # a dropped session's slot is gone; nothing to reset
            self.session.reset()
        self.turns, self.snapshots = [], {}

    def begin(self) -> None:
        """Snapshot the session before a new turn (keeping the last MAX_SNAPSHOTS)."""
        self.snapshots[len(self.turns)] = self.session.snapshot()
        for k in sorted(self.snapshots)[:-MAX_SNAPSHOTS]:
            del self.snapshots[k]

    def undo(self) -> Turn | None:
        """Drop the last turn and return it; the state goes back to before it (a snapshot, or, past the kept
        snapshots, one re-read of the remaining turns)."""
        if not self.turns:
            return None
        last, n = self.turns.pop(), len(self.turns)
        if n in self.snapshots:
            self.session.restore(self.snapshots[n])
        else:
            self.session.reset(pending=self.runtime.tokenizer.chat_ids(
                [(role, clean_text(text)) for t in self.turns for role, text in (("human", t.user),
                                                                                  ("assistant", t.reply))],
                add_generation_prompt=False))
        self.snapshots = {k: v for k, v in self.snapshots.items() if k <= n}
        return last

    @property
    def context_tokens(self) -> int:
        """Tokens the state has read."""
        return self.session.context_tokens

    @property
    def budget_tokens(self) -> int:
        """Tokens the conversation holds: read, plus those the next message reads first (the unfed end of the
        last reply, or the unread rest of a message stopped during its prefill). The context budget counts these."""
        return self.context_tokens + len(self.session.pending)

    def close(self) -> None:
        """Give the state slot back (the session was dropped); a reply still streaming ends as cancelled."""
        self.session.close()


class SessionStore:
    """Session hash -> ChatSession, least recently used first out; thread-safe.

    Also the server's counters: `active` replies streaming now, and `counts` of finished replies by outcome
    ("eos", "length", "stop", "cancelled", "time_limit", "abandoned", "numerical_error", "error", "rejected",
    "busy"). `listening(session key)` says whether a client reads that session's replies (webui.guard sets it;
    alone, everyone is).
    """

    def __init__(self, runtime: Runtime, max_sessions: int = CHAT_SESSIONS):
        self.runtime, self.max_sessions = runtime, max_sessions
        self._sessions: OrderedDict[str, ChatSession] = OrderedDict()
        self._lock = threading.Lock()
        self.active = 0
        self.counts: Counter[str] = Counter()
        self.last_finished = 0.0  # perf_counter() when the last reply's generator finished (tests: cancel latency)
        self.listening: Callable[[str], bool] = lambda key: True

    def count(self, outcome: str, delta_active: int = 0) -> None:
        with self._lock:
            self.counts[outcome] += 1
            self.active += delta_active
            if delta_active < 0:
                self.last_finished = time.perf_counter()

    def get(self, key: str) -> ChatSession:
        """The session for `key`, created when new (most recently used from now on). A new session beyond
        `max_sessions`, or one that finds every state slot taken (by another store on the engine), first drops the least
        recently used session (its slot goes to the new one)."""
        with self._lock:
            session = self._sessions.pop(key, None)
            while session is None:
                if len(self._sessions) >= self.max_sessions:
                    self._sessions.popitem(last=False)[1].close()
                    continue
                try:
                    session = ChatSession(self.runtime)
                except PoolFullError:
                    if not self._sessions:
                        raise
                    self._sessions.popitem(last=False)[1].close()
            self._sessions[key] = session
            return session

    def peek(self, key: str) -> ChatSession | None:
        with self._lock:
            return self._sessions.get(key)

    def arm_stop(self, key: str) -> None:
        """A message was just sent in session `key`: clear its Stop flag, so that a Stop from now on (while the
        reply still waits in the queue, too) ends that reply."""
        self.get(key).stop.clear()

    def stop(self, key: str) -> ChatSession | None:
        """Stop the reply streaming in that session (if any) and wait until it has recorded its turn."""
        session = self.peek(key)
        if session is not None:
            session.stop.set()
            if session.reply is not None:  # ends at the engine's next step, however far behind the stream is
                session.reply.cancel()
            if session.lock.acquire(timeout=STOP_WAIT_S):
                session.lock.release()
        return session

    def close(self) -> None:
        """Drop every session (their slots go back to the engine)."""
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), OrderedDict()
        for session in sessions:
            session.close()

    def drop(self, key: str) -> None:
        """Forget a session and free its state slot (the browser tab closed)."""
        with self._lock:
            session = self._sessions.pop(key, None)
        if session is not None:
            session.close()

    def __contains__(self, key: str) -> bool:
        return key in self._sessions

    def __len__(self) -> int:
        return len(self._sessions)


def session_key(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "default"


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.2f} MiB" if n_bytes >= 2**20 else f"{n_bytes / 1024:.1f} KiB"


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def live_line(stats: ReplyStats) -> str:
    """The line under the textbox while a reply streams: prefill progress, then tokens, speed and TTFT."""
    if stats.new_tokens == 0:
        return f"<small>Reading your message: {stats.prefilled:,} of {_count(stats.prompt_tokens, 'token')}…</small>"
    rate = f" · **{stats.tokens_per_s:.1f} tok/s**" if stats.new_tokens > 1 else ""
    return f"<small>{_count(stats.new_tokens, 'token')}{rate} · TTFT {stats.ttft_s * 1e3:.0f} ms</small>"


def stats_title(info: dict) -> str:
    """One line of a finished reply's numbers, marked when it did not end by itself."""
    ended = ENDED.get(info["finish_reason"], info["finish_reason"])
    rate = f" · {info['tokens_per_s']:.1f} tok/s" if info["new_tokens"] > 1 else ""
    ttft = f" · TTFT {info['ttft_ms']:.0f} ms" if info["new_tokens"] else ""
    return ((f"{ended} · " if ended else "") + _count(info["new_tokens"], "token") + rate + ttft
            + f" · recurrent state {_size(info['state_bytes'])}")


def stats_message(info: dict) -> dict:
    """A reply's stats as a collapsed message of its own under the reply (display only, never model input)."""
    body = (f"finish: {info['finish_reason']} · {_count(info['prompt_tokens'], 'prompt token')} read · "
            f"{_count(info['context_tokens'], 'token')} in context · the state has the same size at any context")
    return {"role": "assistant", "content": body, "metadata": {"title": stats_title(info), "status": "done",
                                                               "id": STATS_ID}}


def chat_view(session: ChatSession | None, streaming: tuple[str, str] | None = None) -> list[dict]:
    """The chat window as the server knows it: every recorded turn with its stats message, then the turn
    streaming now (user text, reply so far), if any."""
    messages: list[dict] = []
    for turn in session.turns if session else []:
        messages.append({"role": "user", "content": turn.user})
        if turn.reply:
            messages.append({"role": "assistant", "content": turn.reply})
        if turn.info:
            messages.append(stats_message(turn.info))
    if streaming:
        messages.append({"role": "user", "content": streaming[0]})
        if streaming[1]:
            messages.append({"role": "assistant", "content": streaming[1]})
    return messages


def stats_info(stats: ReplyStats, session: ChatSession, outcome: str) -> dict:
    """A finished reply's numbers as the UI and the API show them (`outcome`: how it ended, as counted)."""
    return {"prompt_tokens": stats.prompt_tokens, "new_tokens": stats.new_tokens, "ttft_ms": stats.ttft_s * 1e3,
            "tokens_per_s": stats.tokens_per_s, "state_bytes": stats.state_bytes,
            "context_tokens": session.context_tokens, "finish_reason": outcome}


def make_validator(runtime: Runtime, store: SessionStore, limits: Limits | None = None):
    """Gradio `validator=` for the chat endpoints: runs before the event is queued (HTTP 422 when invalid, no
    queue slot, no model work). Returns one gr.validate per input, in FIELDS order; the context budget is
    counted against the session's own state."""
    limits = limits or Limits.for_context(runtime.max_context)

    def validate(message, temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed,
                 request: gr.Request = None):
        session = store.peek(session_key(request))
        try:
            check_request(runtime.tokenizer, limits, message, temperature, top_p, top_k, repetition_penalty,
                          max_new_tokens, seed, context_tokens=session.budget_tokens if session else 0)
            problems = {}
        except InputError as exc:
            problems = exc.fields
        return [gr.validate(name not in problems, problems.get(name, "")) for name in FIELDS]

    return validate


def _stream(reply: Reply, stop: threading.Event, listening: Callable[[], bool]
            ) -> Generator[tuple[str, str, dict], None, str]:
    """Yield (reply so far, live line, {}) after events until the reply finishes, at most one per
    UPDATE_INTERVAL_S (the first text and the complete text at once); return what a cancel means: "abandoned" when
    nobody was listening, else "cancelled". Stop and a client that is not listening cancel the reply (the engine
    ends it at its next step); events after the cancel are not streamed."""
    text, cancelled_as, shown, next_update = "", "cancelled", "", 0.0
    if stop.is_set():  # a Stop while the message was queued: end before the first step
        reply.cancel()
    for event in reply.updates():
        text += event.text
        if reply.cancel_requested:
            continue
        if event.finished:
            # The complete text goes out before the turn is recorded and the final result is built, so a reader
            # sees the reply end when the engine ends it (the final result repeats it with the stats).
            if event.finish in COMPLETE_AS_STREAMED and reply.text != shown:
                yield reply.text, live_line(event.stats), {}
            continue
        if stop.is_set():
            reply.cancel()
        elif not listening():  # the client never connected, or left
            cancelled_as = "abandoned"
            reply.cancel()
        elif time.perf_counter() >= next_update or (text and not shown):  # the first text goes out at once
            shown, next_update = text, time.perf_counter() + UPDATE_INTERVAL_S
            yield text, live_line(event.stats), {}
    return cancelled_as


def _record_turn(session: ChatSession, text: str, reply: Reply | None, cancelled_as: str) -> str:
    """End a reply's turn in its session and return its outcome: a reply the client left mid-stream is cancelled
    and waited for; the turn records what the state read (an error or NaN clears the conversation instead);
    the session's Stop flag, reply and lock are released."""
    outcome = "error"  # the engine never started the reply
    if reply is not None:
        if reply.finish_reason is None:  # the client left mid-stream (GeneratorExit): end the reply here
            reply.cancel()
            reply.wait()
        outcome = cancelled_as if reply.finish_reason == "cancelled" else reply.finish_reason
    if outcome in ("numerical_error", "error"):
        session.clear()
    else:
        session.turns.append(Turn(text, reply.text, stats_info(reply.stats, session, outcome)))
    session.stop.clear()  # this reply has taken any Stop meant for it
    session.reply = None
    session.lock.release()
    malloc_trim()  # the reply's activations go back to the OS, not into a heap that only grows
    return outcome


def make_chat_fn(runtime: Runtime, store: SessionStore, limits: Limits | None = None):
    """The reply handler: chat(message, *sampling controls, request) yields (reply so far, live line, info).

    `info` is {} while streaming and the finished reply's stats at the end. Every reply ends in exactly one
    outcome counted in `store.counts`; the `finally` block runs on completion, Stop, error, time limit and
    client disconnect alike (Stop and the listener are checked after every prefill chunk and decoded token; a yield
    comes at most every UPDATE_INTERVAL_S).
    """
    limits = limits or Limits.for_context(runtime.max_context)

    def chat(message: str, temperature: float, top_p: float, top_k: int, repetition_penalty: float,
             max_new_tokens: int, seed: int, request: gr.Request = None, *,
             stop_armed: bool = False) -> Iterator[tuple[str, str, dict]]:
        held = store.peek(session_key(request))  # a refused request creates no session
        try:
            req = check_request(runtime.tokenizer, limits, message, temperature, top_p, top_k, repetition_penalty,
                                max_new_tokens, seed, context_tokens=held.budget_tokens if held else 0)
        except InputError as exc:
            store.count("rejected")
            raise gr.Error(str(exc)) from None
        session = store.get(session_key(request))
        if not session.lock.acquire(blocking=False):
            store.count("busy")
            raise gr.Error("A reply is still streaming in this session: stop it first.")
        if not stop_armed:  # the browser clears the flag when the message is sent, so a Stop while queued counts
            session.stop.clear()
        store.count("started", +1)
        reply, cancelled_as = None, "cancelled"
        try:
            session.begin()
            reply = session.reply = session.session.send(req.text, req.params, time_limit_s=limits.max_reply_s)
            cancelled_as = yield from _stream(reply, session.stop, lambda: store.listening(session_key(request)))
        except Exception:  # noqa: BLE001 (the engine failed to start the reply: details in the log)
            log.exception("chat reply failed")
        finally:
            # Runs on completion, error, Stop and disconnect alike: the turn records what the state read.
            outcome = _record_turn(session, req.text, reply, cancelled_as)
            store.count(outcome, -1)
        if outcome == "error":
            raise gr.Error(INTERNAL_NOTICE)
        if outcome == "numerical_error":
            info = stats_info(reply.stats, session, outcome)
            yield (reply.text + "\n\n" if reply.text else "") + NUMERICAL_NOTICE, "", info
            return
        yield reply.text, "", session.turns[-1].info

    return chat
