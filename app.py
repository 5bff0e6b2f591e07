"""TransNormerLLM chat demo: streaming chat with constant-memory decoding, a latency race against a
Transformer, and what is loaded.

    python app.py                                   # bundled model (or tiny demo weights), CPU or GPU, 127.0.0.1
    python app.py --model OpenNLPLab/TransNormerLLM-385M --no-int8 --device cuda

Every flag has an environment variable (TNLLM_MODEL, TNLLM_BASELINE, TNLLM_INT8, TNLLM_DEVICE, TNLLM_DTYPE,
TNLLM_MAX_CONTEXT, TNLLM_HOST, TNLLM_PORT, TNLLM_CONCURRENCY). Without --host, Gradio's own GRADIO_SERVER_NAME
applies (a Space sets it), else loopback. Launch settings follow reliability.md §3: share off, no SSR, no
monitoring/MCP/run-history endpoints, 1 MB uploads, model directories blocked from file serving.
"""

from __future__ import annotations

import argparse
import logging
import os
from functools import partial

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from webui.chat import SessionStore, make_chat_fn, session_key  # noqa: E402
from webui.latency import COLUMNS, context_choices, race, run_benchmark  # noqa: E402
from webui.runtime import BUNDLED_LLAMA, BUNDLED_TNL, Runtime, load_runtime  # noqa: E402

log = logging.getLogger("tnllm.app")

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


def _sampling_controls() -> list[gr.components.Component]:
    return [
        gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature (0 = greedy)", render=False),
        gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p", render=False),
        gr.Slider(0, 200, value=40, step=1, label="Top-k (0 = off)", render=False),
        gr.Slider(1.0, 2.0, value=1.1, step=0.05, label="Repetition penalty", render=False),
        gr.Slider(1, 1024, value=128, step=1, label="Max new tokens", render=False),
        gr.Number(value=-1, precision=0, label="Seed (-1 = random)", render=False),
    ]


def _model_card(runtime: Runtime) -> str:
    lines = ["### TransNormerLLM (chat model)", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in runtime.info.items()]
    lines += [f"| max context | {runtime.max_context:,} tokens |",
              f"| recurrent state | {runtime.model.allocate_state(1).nbytes / 2**20:.2f} MiB, whatever the context |",
              "", "### Transformer baseline (latency tab)", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in runtime.baseline_info.items()]
    return "\n".join(lines)


def _chat_tab(runtime: Runtime, store: SessionStore, concurrency_limit: int) -> None:
    stats = gr.Markdown(elem_id="reply-stats", render=False)
    info = gr.JSON(visible=False, render=False)
    with gr.Accordion("Sampling", open=False):  # rendered here, above the chat, not in ChatInterface's accordion
        controls = [c.render() for c in _sampling_controls()]
    gr.ChatInterface(
        make_chat_fn(runtime, store),
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


def build_demo(runtime: Runtime, *, concurrency_limit: int = 2, max_size: int = 16) -> gr.Blocks:
    """The app: Chat, Latency vs Transformer and Model tabs over one loaded `Runtime`."""
    store = SessionStore(runtime)
    with gr.Blocks(title="TransNormerLLM chat", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(HEADER + ("\n\n" + UNTRAINED if runtime.untrained else ""))
        with gr.Tabs():
            with gr.Tab("Chat"):
                _chat_tab(runtime, store, concurrency_limit)
            with gr.Tab("Latency vs Transformer"):
                _latency_tab(runtime)
            with gr.Tab("Model"):
                gr.Markdown(_model_card(runtime))

        def forget(request: gr.Request) -> None:  # the tab closed: free that session's state
            store.drop(session_key(request))

        demo.unload(forget)
    demo.sessions = store  # for tests and debugging
    return demo.queue(default_concurrency_limit=concurrency_limit, max_size=max_size)


def launch_kwargs(host: str | None, port: int | None, runtime: Runtime | None = None) -> dict:
    """Safe launch settings (reliability.md §3.3); host/port None leave Gradio's env vars in charge."""
    blocked = [str(BUNDLED_TNL), str(BUNDLED_LLAMA)]
    if runtime and os.path.isdir(runtime.info.get("model", "")):
        blocked.append(os.path.abspath(runtime.info["model"]))
    return dict(server_name=host, server_port=port, share=False, ssr_mode=False, show_error=False,
                max_file_size="1mb", enable_monitoring=False, mcp_server=False, run_history=False,
                strict_cors=True, allowed_paths=[], blocked_paths=blocked)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python app.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=env("TNLLM_MODEL"),
                   help="local checkpoint dir or Hub repo id (default: assets/tnl/, else tiny demo weights)")
    p.add_argument("--baseline", default=env("TNLLM_BASELINE"),
                   help="local Llama dir (default: assets/llama/, else a random Llama matched to the model)")
    p.add_argument("--int8", action=argparse.BooleanOptionalAction,
                   default=env("TNLLM_INT8", "1").lower() not in ("0", "false", "no", "off"),
                   help="8-bit decoder weights (default on; falls back to float when unavailable)")
    p.add_argument("--device", default=env("TNLLM_DEVICE"), help="cpu / cuda (default: cuda when available)")
    p.add_argument("--dtype", default=env("TNLLM_DTYPE"), choices=["fp32", "bf16", "fp16"],
                   help="default: bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--max-context", type=int, default=env("TNLLM_MAX_CONTEXT"),
                   help="token limit of a chat and of the latency tab (default 16k CPU, 128k GPU)")
    p.add_argument("--host", default=env("TNLLM_HOST"), help="default: GRADIO_SERVER_NAME or 127.0.0.1")
    p.add_argument("--port", type=int, default=env("TNLLM_PORT"), help="default: GRADIO_SERVER_PORT or 7860")
    p.add_argument("--concurrency", type=int, default=int(env("TNLLM_CONCURRENCY", "2")),
                   help="chat replies streamed at once (the benchmark runs one at a time)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("tnllm").setLevel(logging.INFO)  # startup progress; Gradio/httpx stay quiet
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    runtime = load_runtime(args.model, args.baseline, int8=args.int8, device=args.device, dtype=args.dtype,
                           max_context=args.max_context)
    demo = build_demo(runtime, concurrency_limit=args.concurrency)
    demo.launch(**launch_kwargs(args.host, args.port, runtime))


if __name__ == "__main__":
    main()
