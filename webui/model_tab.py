"""The Model tab: what the app serves, as tables."""

from __future__ import annotations

import gradio as gr

from tnllm.linear import packed_linears
from tnllm.webui.runtime import Runtime


def _table(rows: dict[str, str]) -> list[str]:
    """A two-column Markdown table with a real header row (an empty one renders as a blank bar)."""
    return ["| Setting | Value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows.items())]


def model_card(runtime: Runtime) -> str:
    """Markdown tables of what is loaded: the chat model and the Transformer baseline."""
    state_mib = runtime.model.allocate_state(1).nbytes / 2**20
    chat = {**runtime.info, "max context": f"{runtime.max_context:,} tokens",
            "recurrent state": f"{state_mib:.2f} MiB, whatever the context"}
    packed = packed_linears(runtime.model)
    if packed:
        chat["CPU matmuls"] = f"oneDNN on weights laid out once: {packed} fp32 Linears (tnllm/linear.py)"
    return "\n".join(["### TransNormerLLM (chat model)", *_table(chat),
                      "", "### Transformer baseline (latency tab)", *_table(runtime.baseline_info)])


def model_tab(runtime: Runtime) -> None:
    """The Model tab's content (inside an open gr.Tab)."""
    gr.Markdown(model_card(runtime))
