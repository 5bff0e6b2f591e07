"""The Latency vs Transformer tab: a sweep of context lengths (plots + table) and a live race."""

from __future__ import annotations

from functools import partial

import gradio as gr

from webui.latency import COLUMNS, context_choices, race, run_benchmark
from webui.runtime import Runtime


def latency_tab(runtime: Runtime) -> None:
    """The Latency vs Transformer tab's layout and events (inside an open gr.Tab)."""
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
