"""The Latency vs Transformer tab: a sweep of context lengths (plots + tables, live and recorded) and a live race."""

from __future__ import annotations

from functools import partial

import gradio as gr

from tnllm.webui.chat import session_key
from tnllm.webui.components import ServerCheckedSlider
from tnllm.webui.latency import (
    DECODE_STEPS,
    MEMORY_NOTE,
    PLOT_Y,
    RACE_FILLER,
    RACE_NEW_TOKENS,
    REPEATS,
    SPACER,
    RaceStops,
    columns,
    context_choices,
    load_recorded,
    plot_series,
    race,
    recorded_frame,
    run_benchmark,
    run_benchmark_in_tab,
)
from tnllm.webui.runtime import Runtime
from tnllm.webui.validation import MAX_REPLY_SECONDS

LATENCY_API = ("Measure TNL and the Llama baseline at the chosen context lengths (`contexts`: ints or their "
               "strings, from the listed choices), `n_tokens` timed decode steps per run, `repeats` rounds. "
               "Streams (decode plot data, TTFT plot data, cache plot data, table) after every context of every "
               "round: medians over the runs so far and the min–max of the runs' medians. Plot data also holds the "
               "recorded reference series.")
RACE_API = ("Both models answer `prompt` greedily after `context_tokens` filler tokens, `max_new_tokens` at most "
            "each; streams (TNL text, Llama text, counters Markdown). The last counters name the winner (tokens "
            "per second of compute, prefill included) and each side's finish reason: eos, length or time limit "
            f"(a race runs at most {MAX_REPLY_SECONDS:.0f} s).")


class _ContextChoices(gr.CheckboxGroup):
    """Context lengths as ints, documented as ints. Gradio documents a CheckboxGroup's values as strings
    whatever their type (its schema says "string", gradio_client quotes every enum value) and then refuses
    the strings; here the handler (`check_contexts`) accepts both, and the schema says int, no enum."""

    def get_block_name(self) -> str:
        return "checkboxgroup"

    def get_block_class(self) -> str:
        return "checkboxgroup"

    def api_info(self) -> dict:
        values = ", ".join(str(value) for _, value in self.choices)
        return {"items": {"type": "integer"}, "title": "Context lengths", "type": "array",
                "description": f"context lengths in tokens, each one of {values} (ints or their strings)"}

    def preprocess(self, payload):
        return payload


def latency_tab(runtime: Runtime) -> None:
    """The Latency vs Transformer tab's layout and events (inside an open gr.Tab)."""
    choices = context_choices(runtime)
    recorded = load_recorded(runtime.device.type)
    gr.Markdown("Both models run through `tnllm.bench`, the code behind `bench/decode.py`: same seeded prompts, "
                "each run's warm-up dropped, medians over repeated rounds that visit every context and model in "
                "turn (so a burst of load on a shared machine hits single runs, not one whole curve). TNL's "
                "decode step and state stay flat; the Transformer's KV cache and step time grow with the context.")
    with gr.Row():
        contexts = _ContextChoices(choices, value=choices[:3], label="Context lengths (tokens)", scale=3)
        n_tokens = ServerCheckedSlider(*DECODE_STEPS, value=16, step=4, label="Timed decode steps per run", scale=1)
        repeats = ServerCheckedSlider(*REPEATS, value=3, step=1, label="Rounds (medians over them)", scale=1)
    run = gr.Button("Run benchmark", variant="primary")
    status = gr.Markdown(elem_id="latency-status", label="Benchmark progress")
    series = plot_series(runtime, recorded)
    # live: strong orange (TNL) and blue (Llama); recorded: the same hues, lighter
    colours = dict(zip(series, ["#e8590c", "#1c7ed6", "#ffa94d", "#74c0fc", "#2a9d8f", "#9775fa"], strict=False))
    # Two plots a row at most (min_width): the legend sits under each plot and is cut off when narrower.
    # No chart title and no fixed height: both push the legend (under the plot) out of view.
    with gr.Row():
        plots = [gr.LinePlot(x="context", y=y, color="series", label=title, min_width=560,
                             color_title="", x_title="context (tokens, log scale)",
                             color_map={**colours, SPACER: "transparent"}, colors_in_legend=list(colours))
                 for y, title in PLOT_Y.items()]
    table = gr.Dataframe(headers=columns(runtime), interactive=False, label="Measurements (this server, live)")
    gr.Markdown(MEMORY_NOTE)
    if recorded is not None:
        gr.Markdown(recorded.note())
        gr.Dataframe(recorded_frame(recorded), interactive=False, label=f"Reference: {recorded.label}")
    inputs, outputs = [contexts, n_tokens, repeats], [*plots, table]
    # The browser's button also streams a status line (not part of the API: /latency's outputs stay the plots
    # and the table) and hides Gradio's progress overlay, whose "elapsed/expected s" guesses from the last run.
    run.click(partial(run_benchmark_in_tab, runtime, recorded=recorded), inputs, [*outputs, status],
              show_progress="hidden", api_visibility="private", concurrency_id="bench", concurrency_limit=1)
    api_trigger = gr.Button(visible=False)  # /latency: the same sweep for API clients (progress as job status)
    api_trigger.click(partial(run_benchmark, runtime, recorded=recorded), inputs, outputs, api_name="latency",
                      api_description=LATENCY_API, concurrency_id="bench", concurrency_limit=1)

    gr.Markdown("### Live race\nBoth models answer the same prompt (greedy) after the same filler context; "
                "whichever has spent less compute time takes the next step, so the faster one pulls ahead.")
    with gr.Row():
        prompt = gr.Textbox("Tell me about your favourite place.", label="Prompt", scale=3)
        filler = ServerCheckedSlider(0, min(RACE_FILLER, runtime.max_context), value=min(2048, runtime.max_context),
                                      step=128, label="Context before the prompt (tokens)")
        new_tokens = ServerCheckedSlider(*RACE_NEW_TOKENS, value=64, step=1, label="New tokens")
    with gr.Row():
        start, stop = gr.Button("Start race", variant="primary"), gr.Button("Stop race", variant="stop")
    with gr.Row():
        boxes = [gr.Textbox(label="TransNormerLLM (recurrent state)", lines=6),
                 gr.Textbox(label="Llama (KV cache)", lines=6)]
    result = gr.Markdown(elem_id="race-counters", label="Race counters")
    stops = RaceStops()

    def run_race(prompt: str, context_tokens: int, max_new_tokens: int, request: gr.Request):
        with stops.running(session_key(request)) as flag:
            for tnl, llama, lines, _ in race(runtime, prompt, context_tokens, max_new_tokens, stop=flag):
                yield tnl, llama, lines

    def arm_stop(request: gr.Request) -> None:
        stops.arm(session_key(request))

    start.click(arm_stop, None, None, queue=False, api_visibility="private")
    start.click(run_race, [prompt, filler, new_tokens], [*boxes, result], api_name="race", api_description=RACE_API,
                concurrency_id="bench", concurrency_limit=1)
    def stop_race(request: gr.Request) -> None:
        stops.stop(session_key(request))

    stop.click(stop_race, None, None, queue=False, api_visibility="private")

