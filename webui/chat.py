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

import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field

import gradio as gr

from tnllm.generation import Conversation, ReplyStats
from tnllm.sampling import SamplingParams
from webui.runtime import Runtime

MAX_SESSIONS = 32         # least recently used sessions beyond this are dropped (their next turn re-reads history)
MAX_SNAPSHOTS = 2         # states kept for retry/undo per session (each is one state: constant size)
MAX_MESSAGE_CHARS = 8000  # rejected before tokenisation

Turn = tuple[str, str]  # (user text, assistant text as shown)


def message_text(content) -> str:
    """Text of a message's content: a string, or (Gradio 6) a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or "")
    if isinstance(content, (list, tuple)):
        return "".join(message_text(part) for part in content)
    return ""


def history_turns(history: list[dict] | None) -> list[Turn]:
    """[(user, assistant)] from Gradio's messages list (an unanswered user message gets "")."""
    turns: list[Turn] = []
    for message in history or []:
        role, text = message.get("role"), message_text(message.get("content"))
        if role == "user":
            turns.append((text, ""))
        elif role == "assistant" and turns:
            turns[-1] = (turns[-1][0], turns[-1][1] + text)
    return turns


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
                [(role, text) for user, reply in visible for role, text in (("human", user), ("assistant", reply))],
                add_generation_prompt=False)
        self.turns = list(visible)
        self.snapshots = {k: v for k, v in self.snapshots.items() if k <= n}

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
    """Session hash -> ChatSession, least recently used first out; thread-safe."""

    def __init__(self, runtime: Runtime, max_sessions: int = MAX_SESSIONS):
        self.runtime, self.max_sessions = runtime, max_sessions
        self._sessions: OrderedDict[str, ChatSession] = OrderedDict()
        self._lock = threading.Lock()

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


def stats_line(stats: ReplyStats, context_tokens: int, live: bool = False) -> str:
    """The small line under each reply: speed, TTFT and the (constant) recurrent-state size."""
    size = stats.state_bytes
    state = f"{size / 2**20:.2f} MiB" if size >= 2**20 else f"{size / 1024:.1f} KiB"
    head = f"{stats.new_tokens} tokens" + ("" if live else f" ({stats.finish_reason})")
    return (f"<small>{head} · **{stats.tokens_per_s:.1f} tok/s** · TTFT {stats.ttft_s * 1e3:.0f} ms · "
            f"recurrent state {state} (constant) · {stats.prompt_tokens} new prompt tokens · "
            f"{context_tokens} tokens in context</small>")


def stats_info(stats: ReplyStats, session: ChatSession) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "new_tokens": stats.new_tokens, "ttft_ms": stats.ttft_s * 1e3,
            "tokens_per_s": stats.tokens_per_s, "state_bytes": stats.state_bytes,
            "context_tokens": session.context_tokens, "finish_reason": stats.finish_reason,
            "history_rereads": session.rereads}


def make_params(temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed) -> SamplingParams:
    """SamplingParams from the UI controls; a bad value becomes a readable gr.Error."""
    seed = None if seed is None or seed == "" or int(seed) < 0 else int(seed)
    try:
        return SamplingParams(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                              repetition_penalty=float(repetition_penalty), max_new_tokens=int(max_new_tokens),
                              seed=seed)
    except (TypeError, ValueError) as exc:
        raise gr.Error(str(exc)) from None


def make_chat_fn(runtime: Runtime, store: SessionStore):
    """The ChatInterface fn: yields (cumulative reply, stats line, stats dict)."""

    def chat(message: str, history: list[dict], temperature: float, top_p: float, top_k: int,
             repetition_penalty: float, max_new_tokens: int, seed: int,
             request: gr.Request = None) -> Iterator[tuple[str, str, dict]]:
        text = message_text(message)
        if not text.strip():
            raise gr.Error("Type a message first.")
        if len(text) > MAX_MESSAGE_CHARS:
            raise gr.Error(f"Message too long: {len(text)} characters (limit {MAX_MESSAGE_CHARS}).")
        params = make_params(temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed)
        session = store.get(session_key(request))
        if not session.lock.acquire(blocking=False):
            raise gr.Error("A reply is still streaming in this session: stop it first.")
        reply, started = "", False
        try:
            session.sync(history_turns(history))
            if session.context_tokens + len(text) // 2 > runtime.max_context:
                raise gr.Error(f"The conversation reached the {runtime.max_context}-token limit: clear it.")
            session.begin()
            started = True
            with closing(session.conv.reply(text, params)) as pieces:
                for piece in pieces:  # "" while prefilling: a chance to cancel
                    reply += piece
                    yield reply, stats_line(session.conv.last_stats, session.context_tokens, live=True), {}
        finally:
            # Runs on completion, error and Stop alike: the session holds what the browser shows.
            if started:
                session.turns.append((text, reply))
            session.lock.release()
        stats = session.conv.last_stats
        yield reply, stats_line(stats, session.context_tokens), stats_info(stats, session)

    return chat
