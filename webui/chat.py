"""Chat tab handler: one `Conversation` per browser session, streamed token by token.

Each session keeps its recurrent state between turns, so a turn prefills only its new message, never the
history (the state has the same size however long the chat gets: the point of the model). The visible
history Gradio passes in is compared with what the session's state holds:
    same turns            -> continue the state as is;
    a prefix of them      -> retry / undo: restore the snapshot taken before that turn (the last few kept);
    empty                 -> clear: a fresh state;
    anything else         -> (server restart, evicted session, edited message) re-read the visible history once.
Stop closes the generator: `Conversation.reply` records exactly what its state saw, and the session keeps the
partial reply as the turn's text, matching what the browser shows.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field

import gradio as gr

from tnllm.generation import Conversation, NumericalError, ReplyStats
from tnllm.memory import malloc_trim
from webui.runtime import Runtime
from webui.validation import (
    FIELDS,
    MAX_MESSAGE_CHARS,
    STATS_ID,
    InputError,
    Limits,
    check_request,
    check_sampling,
    clean_text,
    history_turns,
    message_text,
)

__all__ = ["MAX_MESSAGE_CHARS", "ChatSession", "SessionStore", "history_turns", "make_chat_fn", "make_validator",
           "message_text", "session_key", "with_stats_messages"]
log = logging.getLogger("tnllm.app")

MAX_SESSIONS = 32         # least recently used sessions beyond this are dropped (their next turn re-reads history)
MAX_SNAPSHOTS = 2         # states kept for retry/undo per session (each is one state: constant size)
NUMERICAL_NOTICE = ("⚠️ Generation stopped: the model produced invalid numbers (NaN/inf). Nothing after this point "
                    "was sampled, and this conversation's model state was reset; send your message again.")
INTERNAL_NOTICE = "Internal error while generating; this conversation's model state was reset. Please try again."

Turn = tuple[str, str]  # (user text, assistant text as shown)


def _same(a: list[Turn], b: list[Turn]) -> bool:
    return len(a) == len(b) and all(x[0] == y[0] and x[1].strip() == y[1].strip() for x, y in zip(a, b))


@dataclass
class ChatSession:
    """One browser session: its conversation, the turns it holds, and snapshots for retry/undo."""

    runtime: Runtime
    conv: Conversation = None  # type: ignore[assignment]
    turns: list[Turn] = field(default_factory=list)
    snapshots: dict[int, Conversation] = field(default_factory=dict)  # n turns -> state after n turns
    lock: threading.Lock = field(default_factory=threading.Lock)
    rereads: int = 0  # how often the visible history had to be re-read (tests check it stays 0)

    def __post_init__(self) -> None:
        self.conv = self.conv or self._fresh()

    def _fresh(self) -> Conversation:
        return Conversation(self.runtime.model, self.runtime.tokenizer)

    def sync(self, visible: list[Turn]) -> None:
        """Make the conversation hold exactly the `visible` turns (see the module docstring)."""
        n = len(visible)
        if _same(visible, self.turns):
            return
        if n == 0 or (n in self.snapshots and _same(visible, self.turns[:n])):
            self.conv = self.snapshots[n].fork() if n else self._fresh()
        else:
            self.conv, self.rereads = self._fresh(), self.rereads + 1
            self.conv.pending = self.runtime.tokenizer.chat_ids(
                [(role, clean_text(text)) for user, reply in visible
                 for role, text in (("human", user), ("assistant", reply))], add_generation_prompt=False)
        self.turns = list(visible)
        self.snapshots = {k: v for k, v in self.snapshots.items() if k <= n}

    def reset(self) -> None:
        """Discard the state (after a numerical fault): the next turn re-reads the visible history."""
        self.conv, self.turns, self.snapshots = self._fresh(), [], {}

    def begin(self) -> None:
        """Snapshot the state before a new turn (keeping the last MAX_SNAPSHOTS)."""
        n = len(self.turns)
        self.snapshots[n] = self.conv.fork()
        for k in sorted(self.snapshots)[:-MAX_SNAPSHOTS]:
            del self.snapshots[k]

    @property
    def context_tokens(self) -> int:
        return int(self.conv.state.positions[0])


class SessionStore:
    """Session hash -> ChatSession, least recently used first out; thread-safe.

    Also the server's counters: `active` replies streaming now, and `counts` of finished replies by outcome
    ("eos", "length", "stop", "cancelled", "numerical_error", "error", "rejected", "busy").
    """

    def __init__(self, runtime: Runtime, max_sessions: int = MAX_SESSIONS):
        self.runtime, self.max_sessions = runtime, max_sessions
        self._sessions: OrderedDict[str, ChatSession] = OrderedDict()
        self._lock = threading.Lock()
        self.active = 0
        self.counts: Counter[str] = Counter()
        self.last_finished = 0.0  # perf_counter() when the last reply's generator finished (tests: cancel latency)

    def count(self, outcome: str, delta_active: int = 0) -> None:
        with self._lock:
            self.counts[outcome] += 1
            self.active += delta_active
            if delta_active < 0:
                self.last_finished = time.perf_counter()

    def get(self, key: str) -> ChatSession:
        with self._lock:
            session = self._sessions.pop(key, None) or ChatSession(self.runtime)
            self._sessions[key] = session
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
            return session

    def drop(self, key: str) -> None:
        with self._lock:
            self._sessions.pop(key, None)

    def __contains__(self, key: str) -> bool:
        return key in self._sessions

    def __len__(self) -> int:
        return len(self._sessions)


def session_key(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "default"


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.2f} MiB" if n_bytes >= 2**20 else f"{n_bytes / 1024:.1f} KiB"


def stats_line(stats: ReplyStats, context_tokens: int, live: bool = False) -> str:
    """The small line under each reply: speed, TTFT and the (constant) recurrent-state size."""
    state = _size(stats.state_bytes)
    head = f"{stats.new_tokens} tokens" + ("" if live else f" ({stats.finish_reason})")
    return (f"<small>{head} · **{stats.tokens_per_s:.1f} tok/s** · TTFT {stats.ttft_s * 1e3:.0f} ms · "
            f"recurrent state {state} (constant) · {stats.prompt_tokens} new prompt tokens · "
            f"{context_tokens} tokens in context</small>")


def stats_message(info: dict) -> dict:
    """The finished reply's stats as a message of its own under the reply, so every reply keeps its line.

    A collapsed Gradio "thought" (metadata title): it shows the speed, TTFT and state size in its title; the
    chat's history parser skips it (webui.validation.is_stats_message), so it never reaches the model.
    """
    state = _size(info["state_bytes"])
    title = (f"{info['new_tokens']} tokens · {info['tokens_per_s']:.1f} tok/s · TTFT {info['ttft_ms']:.0f} ms · "
             f"recurrent state {state}")
    body = (f"finish: {info['finish_reason']} · {info['prompt_tokens']} new prompt tokens prefilled · "
            f"{info['context_tokens']} tokens in context · the state has the same size at any context")
    return {"role": "assistant", "content": body, "metadata": {"title": title, "status": "done", "id": STATS_ID}}


def with_stats_messages(chat):
    """The chat fn for the Chat tab: as `chat`, but a finished reply comes with its `stats_message`.

    Only the final update of a completed reply changes (a list: the reply, then its stats message); the API's
    streamed updates and a stopped or failed reply stay plain text.
    """
    @functools.wraps(chat)
    def chat_with_stats(*args, **kwargs):
        for reply, line, info in chat(*args, **kwargs):
            if info and info.get("finish_reason") in ("eos", "length", "stop", "time_limit"):
                reply = [reply, stats_message(info)]
            yield reply, line, info

    return chat_with_stats


def stats_info(stats: ReplyStats, session: ChatSession) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "new_tokens": stats.new_tokens, "ttft_ms": stats.ttft_s * 1e3,
            "tokens_per_s": stats.tokens_per_s, "state_bytes": stats.state_bytes,
            "context_tokens": session.context_tokens, "finish_reason": stats.finish_reason,
            "history_rereads": session.rereads}


def make_params(temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed):
    """SamplingParams from the UI controls; a bad value becomes a readable gr.Error."""
    try:
        return check_sampling(temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed)
    except InputError as exc:
        raise gr.Error(str(exc)) from None


def make_validator(runtime: Runtime, limits: Limits | None = None):
    """Gradio `validator=` for the chat endpoint: runs before the event is queued (HTTP 422 when invalid, no
    queue slot, no model work). Returns one gr.validate per input, in the endpoint's input order."""
    limits = limits or Limits.for_context(runtime.max_context)

    def validate(message, history, temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed):
        try:
            check_request(runtime.tokenizer, limits, message, history, temperature, top_p, top_k,
                          repetition_penalty, max_new_tokens, seed)
            problems = {}
        except InputError as exc:
            problems = exc.fields
        # The history input is a gr.State: Gradio 6.26 stores whatever the validator returns for a State input
        # as its new value, so it gets a no-op update instead of a gr.validate.
        return [gr.update() if name == "history" else gr.validate(name not in problems, problems.get(name, ""))
                for name in FIELDS]

    return validate


def make_chat_fn(runtime: Runtime, store: SessionStore, limits: Limits | None = None):
    """The ChatInterface fn: yields (cumulative reply, stats line, stats dict).

    Every reply ends in exactly one outcome counted in `store.counts`; the `finally` block runs on completion,
    error, Stop and client disconnect alike (Gradio closes the generator at its next yield, and a yield comes
    after every prefill chunk and every decoded token).
    """
    limits = limits or Limits.for_context(runtime.max_context)

    def chat(message: str, history: list[dict], temperature: float, top_p: float, top_k: int,
             repetition_penalty: float, max_new_tokens: int, seed: int,
             request: gr.Request = None) -> Iterator[tuple[str, str, dict]]:
        try:
            req = check_request(runtime.tokenizer, limits, message, history, temperature, top_p, top_k,
                                repetition_penalty, max_new_tokens, seed)
        except InputError as exc:
            store.count("rejected")
            raise gr.Error(str(exc)) from None
        raw = message_text(message)  # as the browser shows it: the next turn's history is compared with it
        session = store.get(session_key(request))
        if not session.lock.acquire(blocking=False):
            store.count("busy")
            raise gr.Error("A reply is still streaming in this session: stop it first.")
        store.count("started", +1)
        reply, started, outcome = "", False, "cancelled"
        try:
            session.sync(history_turns(history))
            session.begin()
            started = True
            deadline = time.monotonic() + limits.max_reply_s
            with closing(session.conv.reply(req.text, req.params)) as pieces:
                for piece in pieces:  # "" while prefilling: a chance to cancel
                    reply += piece
                    yield reply, stats_line(session.conv.last_stats, session.context_tokens, live=True), {}
                    if time.monotonic() > deadline:  # ends like Stop: the state keeps what it saw
                        break
            if session.conv.last_stats.finish_reason == "cancelled":  # left the loop above, not Stop
                session.conv.last_stats.finish_reason = "time_limit"
            outcome = session.conv.last_stats.finish_reason
        except NumericalError:
            outcome = "numerical_error"
        except Exception:  # noqa: BLE001 (OOM, driver errors...: curated message to the user, details in the log)
            log.exception("chat reply failed")
            outcome = "error"
        finally:
            # Runs on completion, error, Stop and disconnect alike: the session holds what the browser shows.
            if outcome in ("numerical_error", "error"):
                session.reset()
            elif started:
                session.turns.append((raw, reply))
            session.lock.release()
            store.count(outcome, -1)
            malloc_trim()  # the reply's activations go back to the OS, not into a heap that only grows
        if outcome == "error":
            raise gr.Error(INTERNAL_NOTICE)
        stats = session.conv.last_stats
        if outcome == "numerical_error":
            info = {**stats_info(stats, session), "finish_reason": outcome}
            yield (reply + "\n\n" if reply else "") + NUMERICAL_NOTICE, stats_line(stats, 0), info
            return
        yield reply, stats_line(stats, session.context_tokens), stats_info(stats, session)

    return chat
