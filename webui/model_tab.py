"""The Model tab: what the app serves, as tables."""

from __future__ import annotations

import gradio as gr

from webui.runtime import Runtime


def model_card(runtime: Runtime) -> str:
    """Markdown tables of what is loaded: the chat model and the Transformer baseline."""
    lines = ["### TransNormerLLM (chat model)", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in runtime.info.items()]
    lines += [f"| max context | {runtime.max_context:,} tokens |",
              f"| recurrent state | {runtime.model.allocate_state(1).nbytes / 2**20:.2f} MiB, whatever the context |",
              "", "### Transformer baseline (latency tab)", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in runtime.baseline_info.items()]
    return "\n".join(lines)


def model_tab(runtime: Runtime) -> None:
    """The Model tab's content (inside an open gr.Tab)."""
    gr.Markdown(model_card(runtime))
