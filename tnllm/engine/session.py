"""What a caller holds: a `Session` (one conversation, one pool slot) and the `Reply` streaming in it.

    session = engine.open()
    reply = session.send("hello", SamplingParams(...), time_limit_s=60)
    for event in reply:             # Event(text, stats, finish): text pieces, live stats, then the finish
        ...
    reply.cancel()                  # from any thread: the reply ends within one engine step
    session.fork() / session.save(path) / engine.load(path) / session.close()

Bookkeeping: `history` holds every id written into the slot, `pending` the ids still to write (a streamed id
not fed back yet and the eos closing the assistant turn, or the unread rest of a message stopped during its
prefill); they are fed with the next message. A sampled id is fed back by the step after the one that sampled
it: a synchronous engine ends a reply before that step, so its last id is pending; an engine running one step
ahead (CUDA) has usually launched it already, so the state holds it. Either way the state reads exactly the
streamed text, then the closing eos. An id sampled but never received (cancelled in flight) is dropped.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from tnllm.config import TNLConfig
from tnllm.sampling import SamplingParams
from tnllm.state import RecurrentState
from tnllm.streaming import TextStreamer

if TYPE_CHECKING:
    from tnllm.engine.engine import Engine

@dataclass
class ReplyStats:
    """Live numbers of one reply (the app shows them under each message)."""

    prompt_tokens: int = 0
    prefilled: int = 0          # prompt tokens read into the state so far (prefill progress)
    new_tokens: int = 0
    ttft_s: float = 0.0         # prompt submitted -> first token sampled
    decode_s: float = 0.0       # first token -> last token
    state_bytes: int = 0
    finish_reason: str = ""     # one of FINISH_REASONS once the reply has ended

    @property
    def tokens_per_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else 0.0


# How a reply ended. "numerical_error" (NaN/inf logits) and "error" (an exception in its step) also reset the
# session's state; the others keep what the state read.
FINISH_REASONS = ("eos", "length", "stop", "cancelled", "time_limit", "error", "numerical_error")


@dataclass(frozen=True)
class Event:
    """One update of a reply: new text (may be ""), a snapshot of its stats, and `finish` on the last one."""

    text: str
    stats: ReplyStats
    finish: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish is not None


@dataclass(frozen=True)
class Snapshot:
    """A session as it was between two replies: a copy of its state (outside the pool) and its ids."""

    state: RecurrentState
    history: tuple[int, ...]
    pending: tuple[int, ...]


class Reply:
    """One reply streaming from the engine. Iterate it for `Event`s (ends after the finish); `cancel()`.

    The engine thread fills its event queue; without an engine thread, iterating drives the engine itself.
    """

    def __init__(self, session: "Session", prompt: list[int], params: SamplingParams, deadline: float | None,
                 streamer: TextStreamer):
        self.session, self.prompt, self.params, self.deadline = session, prompt, params, deadline
        self.streamer = streamer
        self.fed = 0                      # prompt ids read into the state (counted when their step is launched)
        self.sampled: list[int] = []      # ids sampled so far, as the host has received them
        self.launched = 0                 # ids whose sampling has been launched (received or still in flight)
        self.fed_sampled = 0              # sampled ids read into the state (a decode step feeds the last one)
        self.stats = ReplyStats(prompt_tokens=len(prompt), state_bytes=session.engine.pool.slot_bytes)
        self.submitted = time.perf_counter()
        self.text = ""                    # the reply as streamed
        self.finish_reason: str | None = None
        self.cancel_requested = False
        self._events: queue.Queue[Event] = queue.Queue()

    @property
    def prefilling(self) -> bool:
        """Prompt ids are left to read (launch-time view: a chunk counts once its step is launched)."""
        return self.fed < len(self.prompt)

    def cancel(self) -> None:
        """Ask the reply to stop; it finishes with "cancelled" at the next engine step (thread-safe)."""
        self.cancel_requested = True

    def emit(self, text: str = "", finish: str | None = None, outbox: list | None = None) -> None:
        """Engine side: an event carrying the reply's stats as they are now, queued for the consumer, or held in
        `outbox` as (reply, event) for the scheduler to `deliver` later."""
        self.text += text
        event = Event(text, replace(self.stats), finish)
        if outbox is None:
            self.deliver(event)
        else:
            outbox.append((self, event))

    def deliver(self, event: Event) -> None:
        """Hand an emitted event to the consumer."""
        self._events.put(event)

    def __iter__(self) -> Iterator[Event]:
        engine = self.session.engine
        while True:
            try:
                event = self._events.get(timeout=None if engine.threaded else 0)
            except queue.Empty:
                engine.step()  # no engine thread: the consumer drives the engine
                continue
            yield event
            if event.finished:
                return

    def updates(self) -> Iterator[Event]:
        """Like iterating, but every event already queued is merged into the one yielded (text joined, the
        latest stats and finish): a consumer slower than the engine (a browser) skips no text and never falls
        more than one update behind."""
        for event in self:
            text = [event.text]
            while not event.finished:
                try:
                    event = self._events.get_nowait()
                except queue.Empty:
                    break
                text.append(event.text)
            yield replace(event, text="".join(text))
            if event.finished:
                return

    def wait(self) -> "Reply":
        """Consume every event (the reply's text then sits in `text`)."""
        for _ in self:
            pass
        return self


class Session:
    """One conversation whose recurrent state lives in a pool slot. Create with `Engine.open` / `Engine.load`."""

    def __init__(self, engine: "Engine", slot: int, history: list[int] | None = None,
                 pending: list[int] | None = None):
        self.engine, self.slot = engine, slot
        self.history: list[int] = history or []
        self.pending: list[int] = pending or []
        self.reply: Reply | None = None   # the reply streaming now, if any
        self.closed = False

    @property
    def context_tokens(self) -> int:
        """Tokens the state has read."""
        return len(self.history)

    def send(self, user_text: str, params: SamplingParams, time_limit_s: float | None = None) -> Reply:
        """Start the assistant's reply to a user turn (chat format); it reads `pending` + the new message."""
        return self.feed_ids(self.engine.tokenizer.chat_ids([("human", user_text)]), params, time_limit_s)

    def feed_ids(self, ids: list[int], params: SamplingParams, time_limit_s: float | None = None) -> Reply:
        """Start a reply continuing from raw ids (after `pending`)."""
        return self.engine.submit(self, self.pending + list(ids), params, time_limit_s)

    def fork(self) -> "Session":
        """An independent copy in a new slot (same state, history and pending)."""
        return self.engine.fork(self)

    def save(self, path: str | Path) -> None:
        """State + ids in one safetensors file (`write_session_file`)."""
        self.engine.save(self, path)

    def snapshot(self) -> Snapshot:
        """A copy to `restore` later (undo); the session must be idle."""
        return self.engine.snapshot(self)

    def restore(self, snapshot: Snapshot) -> None:
        """Back to `snapshot`: state, history and pending."""
        self.engine.restore(self, snapshot)

    def reset(self, pending: list[int] | None = None) -> None:
        """A fresh state; `pending` ids are read first with the next message (e.g. earlier turns to re-read)."""
        self.engine.reset(self, pending)

    def close(self) -> None:
        """Cancel any reply and give the slot back."""
        self.engine.close(self)


def write_session_file(path: str | Path, state: RecurrentState, history: list[int], pending: list[int]) -> None:
    """One safetensors file: the state's tensors plus `history` and `pending` ids."""
    tensors = state.tensors()
    tensors["history"] = torch.tensor(history, dtype=torch.long)
    tensors["pending"] = torch.tensor(pending, dtype=torch.long)
    save_file(tensors, str(path), metadata={"format": "pt", "kind": "tnllm-conversation"})


def read_session_file(path: str | Path, config: TNLConfig) -> tuple[RecurrentState, list[int], list[int]]:
    """(state, history, pending) from a file of `write_session_file`, the state checked against `config`."""
    tensors = load_file(str(path))
    state = RecurrentState.from_tensors(tensors, config, path)
    if state.batch_size != 1:
        raise ValueError(f"session file {path} holds {state.batch_size} sequences, expected 1")
    return state, tensors["history"].tolist(), tensors["pending"].tolist()
