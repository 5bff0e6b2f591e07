"""The app's layout: Chat, Latency vs Transformer and Model tabs over one loaded `Runtime` (app.py launches it).

The chat endpoint gets a Gradio `validator=` (webui.validation.check_request): API callers bypass the
browser's sliders and textbox limits, so every value is checked on the server before the event is queued.
"""

from __future__ import annotations

import asyncio
from functools import partial

import gradio as gr

from tnllm.memory import limit_malloc_arenas
from webui.chat import SessionStore, make_chat_fn, make_validator, session_key, with_stats_messages
from webui.latency_tab import latency_tab
from webui.model_tab import model_tab
from webui.runtime import Runtime
from webui.validation import CHAT_DEFAULTS, MAX_REPLY_SECONDS, RANGES, InputError, Limits, check_text

MALLOC_ARENAS = 2  # glibc heaps shared by all threads of the server (measured in tnllm/memory.py)
EXAMPLES = [
    "Hi! How was your weekend?",
    "What is your favourite book, and why?",
    "Tell me something about the ocean.",
    "Do you like cooking? What do you make?",
]
HEADER = ("# ⚡ TransNormerLLM chat\nLinear attention with a **constant-size recurrent state**: each reply "
          "costs the same per token however long the chat gets, and the history is never re-read.")
UNTRAINED = ("> ⚠️ **Untrained demo weights.** No bundled checkpoint was found (`assets/tnl/`), so this is a tiny "
             "model with random weights: replies are gibberish, but streaming, state reuse and the latency "
             "comparison are real.")


class _ServerCheckedSlider(gr.Slider):
    """A Slider whose value reaches the handler unchanged: Gradio's own bound check would answer API callers
    with an unnamed "Value 5.0 is greater than maximum value 2.0." (HTTP 400); webui.validation names the
    parameter and answers 422 through the validator instead."""

    def get_block_name(self) -> str:
        return "slider"

    def preprocess(self, payload):
        return payload


class _ServerCheckedNumber(gr.Number):
    """A Number passed through unrounded, so that a non-integer seed is rejected rather than rounded."""

    def get_block_name(self) -> str:
        return "number"

    def preprocess(self, payload):
        return payload


def _sampling_controls() -> list[gr.components.Component]:
    slider = partial(_ServerCheckedSlider, render=False)
    return [
        slider(*RANGES["temperature"], value=CHAT_DEFAULTS["temperature"], step=0.05, label="Temperature (0 = greedy)"),
        slider(*RANGES["top_p"], value=CHAT_DEFAULTS["top_p"], step=0.05, label="Top-p"),
        slider(*RANGES["top_k"], value=CHAT_DEFAULTS["top_k"], step=1, label="Top-k (0 = off)"),
        slider(*RANGES["repetition_penalty"], value=CHAT_DEFAULTS["repetition_penalty"], step=0.05,
               label="Repetition penalty"),
        slider(*RANGES["max_new_tokens"], value=CHAT_DEFAULTS["max_new_tokens"], step=1, label="Max new tokens"),
        _ServerCheckedNumber(value=-1, precision=0, label="Seed (-1 = random)", render=False),
    ]


def _text_validator(runtime: Runtime, limits: Limits):
    """The browser's submit: the message alone (the sliders bound the rest), before it joins the chat."""

    def validate(message):
        try:
            text = check_text(message, limits)
            n = len(runtime.tokenizer.encode(text))
            if n > limits.max_input_tokens:
                raise InputError(f"Message too long: {n:,} tokens (limit {limits.max_input_tokens:,} per message).")
        except InputError as exc:
            return gr.validate(False, str(exc))
        return gr.validate(True, "")

    return validate


def _chat_tab(runtime: Runtime, store: SessionStore, concurrency_limit: int, limits: Limits) -> None:
    stats = gr.Markdown(elem_id="reply-stats", render=False)
    info = gr.JSON(visible=False, render=False)
    with gr.Accordion("Sampling", open=False):  # rendered here, above the chat, not in ChatInterface's accordion
        controls = [c.render() for c in _sampling_controls()]
    gr.ChatInterface(
        with_stats_messages(make_chat_fn(runtime, store, limits)),
        validator=_text_validator(runtime, limits),
        additional_inputs=controls,
        additional_outputs=[stats, info],
        examples=[[e] for e in EXAMPLES],
        api_name="chat",
        concurrency_limit=concurrency_limit,
        fill_height=False,
        autofocus=False,
    )
    stats.render()
    info.render()


def build_demo(runtime: Runtime, *, concurrency_limit: int = 2, max_size: int = 16,
               max_reply_s: float = MAX_REPLY_SECONDS) -> gr.Blocks:
    """The app: Chat, Latency vs Transformer and Model tabs over one loaded `Runtime`.

    `max_reply_s`: a reply's wall-clock limit (prefill included), after which it ends as if stopped."""
    limit_malloc_arenas(MALLOC_ARENAS)  # before Gradio's worker threads start (tnllm.memory)
    store = SessionStore(runtime)
    limits = Limits.for_context(runtime.max_context, max_reply_s)
    with gr.Blocks(title="TransNormerLLM chat", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(HEADER + ("\n\n" + UNTRAINED if runtime.untrained else ""))
        with gr.Tabs():
            with gr.Tab("Chat"):
                _chat_tab(runtime, store, concurrency_limit, limits)
            with gr.Tab("Latency vs Transformer"):
                latency_tab(runtime)
            with gr.Tab("Model"):
                model_tab(runtime)

        def forget(request: gr.Request) -> None:  # the tab closed: free that session's state
            store.drop(session_key(request))

        demo.unload(forget)
    chat_api = [fn for fn in demo.fns.values() if fn.api_name == "chat"]
    assert len(chat_api) == 1, "the /chat endpoint"  # noqa: S101 (a Gradio upgrade renamed it: fail loudly)
    chat_api[0].validator = make_validator(runtime, limits)  # ChatInterface only validates the browser's textbox
    demo.sessions = store  # for tests and debugging
    demo.queue(default_concurrency_limit=concurrency_limit, max_size=max_size)
    _serialize_joins(demo._queue)
    return demo


def _serialize_joins(queue) -> None:
    """Gradio 6.26 checks `max_size` before awaiting the validator and enqueues after it, so a burst of
    simultaneous requests all pass the check and the bound is exceeded. Admitting one request at a time
    (validation takes milliseconds) makes the bound exact: the rest get HTTP 503 "Queue is full"."""
    push, lock = queue.push, asyncio.Lock()

    async def serialized_push(*args, **kwargs):
        async with lock:
            return await push(*args, **kwargs)

    queue.push = serialized_push
