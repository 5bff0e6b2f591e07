"""Gradio components whose values reach the server's own checks unchanged.

Gradio's Slider and Number check or round a value before the handler sees it: an API caller sending 5.0 for a
0-2 slider gets an unnamed "Value 5.0 is greater than maximum value 2.0." (HTTP 400), and a seed of 1.5 is
silently rounded. These pass the raw value on, so webui.validation can name the parameter and refuse it (HTTP
422 from the validator, next to the field in the browser). The frontend and the API docs see the usual names.
"""

from __future__ import annotations

import gradio as gr


class ServerCheckedSlider(gr.Slider):
    """A Slider whose value reaches the handler unchanged (the server checks its range)."""

    def get_block_name(self) -> str:  # the frontend's Slider
        return "slider"

    def get_block_class(self) -> str:  # what the API docs call it
        return "slider"

    def preprocess(self, payload):
        return payload


class ServerCheckedNumber(gr.Number):
    """A Number passed through unrounded, so that a non-integer seed is refused (by name) rather than rounded."""

    def get_block_name(self) -> str:
        return "number"

    def get_block_class(self) -> str:
        return "number"

    def preprocess(self, payload):
        return payload
