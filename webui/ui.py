"""The app's layout: Chat, Latency vs Transformer and Model tabs over one loaded `Runtime` (launch.py serves it).

The chat endpoint gets a Gradio `validator=` (webui.validation.check_request): API callers bypass the
browser's sliders and textbox limits, so every value is checked on the server before the event is queued.
"""

from __future__ import annotations

import gradio as gr

from tnllm.webui import gradio_internals as gi
from tnllm.webui.chat import SessionStore, session_key
from tnllm.webui.chat_tab import chat_tab
from tnllm.webui.guard import install as install_guard
from tnllm.webui.latency_tab import latency_tab
from tnllm.webui.malloc import MALLOC_ARENAS, limit_malloc_arenas
from tnllm.webui.model_tab import model_tab
from tnllm.webui.runtime import Runtime
from tnllm.webui.validation import CHAT_CONCURRENCY, MAX_REPLY_SECONDS, Limits

HEADER = ("# ⚡ TransNormerLLM chat\nLinear attention with a **constant-size recurrent state**: each reply "
          "costs the same per token however long the chat gets, and the history is never re-read.")


def build_demo(runtime: Runtime, *, concurrency_limit: int = CHAT_CONCURRENCY, max_size: int = 16,
               max_reply_s: float = MAX_REPLY_SECONDS) -> gr.Blocks:
    """The app: Chat, Latency vs Transformer and Model tabs over one loaded `Runtime`.

    `max_reply_s`: a reply's wall-clock limit (prefill included), after which it ends as if stopped."""
    limit_malloc_arenas(MALLOC_ARENAS)  # before Gradio's worker threads start (tnllm.webui.malloc)
    store = SessionStore(runtime)
    limits = Limits.for_context(runtime.max_context, max_reply_s)
    with gr.Blocks(title="TransNormerLLM chat", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(HEADER)
        with gr.Tabs():
            with gr.Tab("Chat"):
                chat_tab(runtime, store, concurrency_limit, limits)
            with gr.Tab("Latency vs Transformer"):
                latency_tab(runtime)
            with gr.Tab("Model"):
                model_tab(runtime)

        def forget(request: gr.Request) -> None:  # the tab closed: free that session's state
            store.drop(session_key(request))

        demo.unload(forget)
    gi.attach(demo, "sessions", store)  # for the tests and the soak
    # api_open=False: the /run/<api> and /api/<api> routes refuse queued functions (HTTP 404), so model work
    # only runs through the queue, behind the validator and within the concurrency limit.
    demo.queue(default_concurrency_limit=concurrency_limit, max_size=max_size, api_open=False)
    install_guard(demo, store)
    return demo
