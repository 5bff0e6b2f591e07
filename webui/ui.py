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
from webui.latency import COLUMNS, context_choices, race, run_benchmark
from webui.runtime import Runtime
from webui.validation import MAX_REPLY_SECONDS, RANGES, InputError, Limits, check_text

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
        slider(*RANGES["temperature"], value=0.7, step=0.05, label="Temperature (0 = greedy)"),
        slider(*RANGES["top_p"], value=0.9, step=0.05, label="Top-p"),
        slider(*RANGES["top_k"], value=40, step=1, label="Top-k (0 = off)"),
        slider(*RANGES["repetition_penalty"], value=1.1, step=0.05, label="Repetition penalty"),
        slider(*RANGES["max_new_tokens"], value=128, step=1, label="Max new tokens"),
        _ServerCheckedNumber(value=-1, precision=0, label="Seed (-1 = random)", render=False),
    ]


def _model_card(runtime: Runtime) -> str:
    lines = ["### TransNormerLLM (chat model)", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in runtime.info.items()]
    lines += [f"| max context | {runtime.max_context:,} tokens |",
              f"| recurrent state | {runtime.model.allocate_state(1).nbytes / 2**20:.2f} MiB, whatever the context |",
              "", "### Transformer baseline (latency tab)", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in runtime.baseline_info.items()]
    return "\n".join(lines)


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


def _latency_tab(runtime: Runtime) -> None:
    choices = context_choices(runtime)
    gr.Markdown("Both models run through `tnllm.bench.sweep`, the code behind `bench/decode.py`: same seeded "
                "prompts, warm-up excluded, medians. TNL's decode step and state stay flat; the Transformer's "
                "KV cache and step time grow with the context.")
    with gr.Row():
        contexts = gr.CheckboxGroup(choices, value=choices[:3], label="Context lengths (tokens)", scale=3)
        n_tokens = gr.Slider(4, 64, value=16, step=4, label="Timed decode steps per context", scale=1)
    run = gr.Button("Run benchmark", variant="primary")
    with gr.Row():
        plots = [gr.LinePlot(x="context", y=y, color="model", title=title, height=260) for y, title in (
            ("decode ms/token", "Per-token decode latency (ms)"), ("TTFT ms", "Time to first token (ms)"),
            ("cache MiB", "Decode cache: state vs KV cache (MiB)"))]
    table = gr.Dataframe(headers=COLUMNS, interactive=False, label="Measurements")
    run.click(partial(run_benchmark, runtime), [contexts, n_tokens], [*plots, table], api_name="latency",
              concurrency_id="bench", concurrency_limit=1)

    gr.Markdown("### Live race\nBoth models answer the same prompt (greedy) after the same filler context; "
                "whichever has spent less compute time takes the next step, so the faster one pulls ahead.")
    with gr.Row():
        prompt = gr.Textbox("Tell me about your favourite place.", label="Prompt", scale=3)
        filler = gr.Slider(0, min(8192, runtime.max_context), value=min(2048, runtime.max_context), step=128,
                           label="Context before the prompt (tokens)")
        new_tokens = gr.Slider(8, 256, value=64, step=8, label="New tokens")
    with gr.Row():
        start, stop = gr.Button("Start race", variant="primary"), gr.Button("Stop race", variant="stop")
    with gr.Row():
        boxes = [gr.Textbox(label="TransNormerLLM (recurrent state)", lines=6),
                 gr.Textbox(label="Llama (KV cache)", lines=6)]
    counters = gr.Markdown(elem_id="race-counters")
    event = start.click(partial(race, runtime), [prompt, filler, new_tokens], [*boxes, counters], api_name="race",
                        concurrency_id="bench", concurrency_limit=1)
    stop.click(None, None, None, cancels=[event])


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
                _latency_tab(runtime)
            with gr.Tab("Model"):
                gr.Markdown(_model_card(runtime))

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
