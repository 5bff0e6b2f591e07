"""The Chat tab: a chat window that shows what the server's session holds, and the /chat API endpoint.

Browser events (all keyed by the session hash; none takes the chat history as input):
    submit  -> `respond`: validated before it is queued (a refused value is named next to its control and
               the message stays in the box), then streams the reply into the window;
    stop    -> sets the session's Stop flag, waits until the reply has recorded its turn, shows it;
    retry   -> drops the last turn (restoring the state snapshot before it) and streams a new reply;
    undo    -> drops the last turn and puts its message back in the box;
    clear   -> a fresh conversation.
Each update rebuilds the window from the session (`webui.chat.chat_view`), so the window can never drift
from what the recurrent state has read.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path

import gradio as gr

from tnllm.webui.chat import SessionStore, chat_view, make_chat_fn, make_validator, session_key, stats_title
from tnllm.webui.components import ServerCheckedNumber, ServerCheckedSlider
from tnllm.webui.runtime import BUNDLED_TNL, Runtime
from tnllm.webui.validation import (
    CHAT_DEFAULTS,
    MAX_NEW_TOKENS_SLIDER,
    RANGES,
    InputError,
    Limits,
    check_sampling,
    clean_text,
)

EXAMPLES = [
    "Hi! How was your weekend?",
    "What is your favourite book, and why?",
    "Tell me something about the ocean.",
    "Do you like cooking? What do you make?",
]
PLACEHOLDER = "Type a message and press Enter"


def sampling_controls() -> list[gr.components.Component]:
    """The Sampling panel, in the order of the chat endpoint's inputs after the message."""
    slider = partial(ServerCheckedSlider, render=False)
    return [
        slider(*RANGES["temperature"], value=CHAT_DEFAULTS["temperature"], step=0.05,
               label="Temperature (0 = greedy)"),
        slider(*RANGES["top_p"], value=CHAT_DEFAULTS["top_p"], step=0.05, label="Top-p"),
        slider(*RANGES["top_k"], value=CHAT_DEFAULTS["top_k"], step=1, label="Top-k (0 = off)"),
        slider(*RANGES["repetition_penalty"], value=CHAT_DEFAULTS["repetition_penalty"], step=0.05,
               label="Repetition penalty"),
        slider(RANGES["max_new_tokens"][0], MAX_NEW_TOKENS_SLIDER, value=CHAT_DEFAULTS["max_new_tokens"], step=1,
               label="Max new tokens"),
        ServerCheckedNumber(value=-1, precision=0, step=1, label="Seed (-1 = random)", render=False),
    ]


def _box(value=None, busy: bool = False) -> dict:
    """The textbox while a reply streams (locked, Stop shown) or idle (Send shown); value None keeps its text."""
    update = gr.update(interactive=not busy, submit_btn=not busy, stop_btn=busy,
                       placeholder="" if busy else PLACEHOLDER)
    if value is not None:
        update["value"] = value
    return update


def _streamed(chat, store: SessionStore, message: str, controls: tuple, request: gr.Request) -> Iterator[tuple]:
    """(window, textbox, live line, info) updates of one reply to `message`; a refused or failed reply shows
    a toast and puts the message back in the box."""
    session = store.get(session_key(request))
    shown = clean_text(message) if isinstance(message, str) else ""
    yield chat_view(session, (shown, "")), _box("", busy=True), "", gr.skip()
    try:
        for reply, line, info in chat(message, *controls, request=request, stop_armed=True):
            if info:  # finished: the recorded turn (with its stats message) replaces the streamed one
                failed = info["finish_reason"] == "numerical_error"
                if failed:
                    gr.Warning(reply.rsplit("\n\n", 1)[-1])
                yield chat_view(session), _box(message if failed else ""), "", info
                return
            yield chat_view(session, (shown, reply)), gr.skip(), line, gr.skip()
    except gr.Error as exc:
        gr.Warning(exc.message)
        yield chat_view(store.get(session_key(request))), _box(message), "", gr.skip()


def _model_line(runtime: Runtime) -> str:
    """What is answering, in one line: users should know a 15 M-parameter demo model is not an assistant."""
    if runtime.untrained:
        return ("> ⚠️ **Untrained demo weights**: a tiny model with random weights (no bundled checkpoint found), "
                "so replies are gibberish; streaming, state reuse and the latency comparison are real.")
    params = int(runtime.info.get("parameters", "0").replace(",", "")) / 1e6
    if runtime.model_path and Path(runtime.model_path).resolve() == BUNDLED_TNL.resolve():
        return (f"> The bundled model is a small **{params:.1f} M-parameter chit-chat model** trained from scratch on "
                "casual dialogues: expect short, casual replies, not facts. For a real assistant run "
                "`python app.py --model OpenNLPLab/TransNormerLLM-1B` (or a local checkpoint directory).")
    return f"> Model: **{runtime.info.get('model', '?')}** ({params:,.0f} M parameters)."


def chat_tab(runtime: Runtime, store: SessionStore, concurrency_limit: int, limits: Limits) -> None:
    """The Chat tab's layout and events (inside an open gr.Tab), plus the public /chat API endpoint."""
    chat = make_chat_fn(runtime, store, limits)
    validate = make_validator(runtime, store, limits)
    gr.Markdown(_model_line(runtime), elem_id="model-line")
    with gr.Accordion("Sampling", open=False):
        controls = [c.render() for c in sampling_controls()]
    window = gr.Chatbot(label="Chat", elem_id="chat-window", height=460, buttons=["copy"])
    box = gr.Textbox(show_label=False, placeholder=PLACEHOLDER, submit_btn=True, stop_btn=False, lines=1,
                     max_lines=8, elem_id="chat-input", autofocus=False)
    live = gr.Markdown(elem_id="reply-stats")
    info = gr.JSON(visible=False, label="reply stats")
    gr.Examples([[e] for e in EXAMPLES], inputs=[box], label="Try")
    outputs = [window, box, live, info]
    stream_kwargs = dict(concurrency_id="chat", concurrency_limit=concurrency_limit, show_progress="hidden",
                         api_visibility="private")

    # Explicit parameters: Gradio injects `request` by its annotation, which it cannot see past *args.
    def respond(message, temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed,
                request: gr.Request):
        values = (temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed)
        yield from _streamed(chat, store, message, values, request)

    def retry(temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed, request: gr.Request):
        values = (temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed)
        yield from _retried(chat, store, values, request)

    def stop(request: gr.Request):
        store.stop(session_key(request))  # returns once the reply has recorded its turn
        return chat_view(store.peek(session_key(request))), _box(), ""

    def undo(request: gr.Request):
        return _undone(store.get(session_key(request)))

    def clear(request: gr.Request):
        return _cleared(store.get(session_key(request)))

    def arm_stop(request: gr.Request) -> None:
        store.arm_stop(session_key(request))

    box.submit(arm_stop, None, None, queue=False, api_visibility="private")
    window.retry(arm_stop, None, None, queue=False, api_visibility="private")
    box.submit(respond, [box, *controls], outputs, validator=validate, **stream_kwargs)
    window.retry(retry, controls, outputs, **stream_kwargs)
    # No `cancels=`: Gradio's cancel of a streaming reply marks its outputs "Error" in the browser, and the flag
    # already ends the reply (running or still queued) at its next step, with its final update.
    quick = dict(queue=False, api_visibility="private", show_progress="hidden")  # no timer over the stats line
    box.stop(stop, None, [window, box, live], **quick)
    window.undo(undo, None, [window, box, live], **quick)
    window.clear(clear, None, [window, live, info], **quick)
    _api_endpoint(chat, validate, controls, concurrency_limit)


def _retried(chat, store: SessionStore, values: tuple, request: gr.Request) -> Iterator[tuple]:
    """Retry: the last turn dropped (state back to before it) and its message sent again. Bad sampling values
    are refused before anything is dropped; a busy or empty session is left as it is."""
    session = store.get(session_key(request))
    try:
        check_sampling(*values)  # before the last turn is dropped: a refused retry keeps it
    except InputError as exc:
        gr.Warning(str(exc))
        session = None
    if session is None or session.lock.locked() or not session.turns:
        yield chat_view(store.peek(session_key(request))), gr.skip(), gr.skip(), gr.skip()
        return
    yield from _streamed(chat, store, session.undo().user, values, request)


def _undone(session) -> tuple:
    """Undo: the last turn dropped and its message back in the box (nothing while a reply streams)."""
    if session.lock.locked():
        return chat_view(session), gr.skip(), gr.skip()
    last = session.undo()
    return chat_view(session), _box(last.user if last else None), ""


def _cleared(session) -> tuple:
    """Clear: a fresh conversation (nothing while a reply streams)."""
    if not session.lock.locked():
        session.clear()
    return chat_view(session), "", None


def _api_endpoint(chat, validate, controls, concurrency_limit: int) -> None:
    """POST /chat: (message, temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed) -> streams
    (reply so far, stats, info). The session hash keys the conversation, so a client's turns continue its own
    recurrent state."""
    message = gr.Textbox(visible=False, label="message")
    reply, stats, info = (gr.Textbox(visible=False, label="reply"), gr.Textbox(visible=False, label="stats"),
                          gr.JSON(visible=False, label="info"))

    def api_chat(message, temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed,
                 request: gr.Request):
        """Send one chat message in this client's session and stream the reply; info holds the finished
        reply's stats (tokens, tok/s, TTFT, state size, finish reason)."""
        for text, line, details in chat(message, temperature, top_p, top_k, repetition_penalty, max_new_tokens,
                                        seed, request=request):
            yield text, stats_title(details) if details else line, details

    gr.Button(visible=False).click(api_chat, [message, *controls], [reply, stats, info], api_name="chat",
                                   validator=validate, concurrency_id="chat", concurrency_limit=concurrency_limit)
