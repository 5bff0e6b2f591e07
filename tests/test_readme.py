"""The README's gradio_client example runs as written against a launched app (tiny preset, CPU)."""

from __future__ import annotations

import contextlib
import io
import os
import re

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import pytest  # noqa: E402

pytest.importorskip("gradio")
pytest.importorskip("transformers")

from tests.conftest import ROOT  # noqa: E402


def readme_block(heading: str) -> str:
    """The first ```python block after `heading` in README.md."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_http_api_example_runs_as_written(runtime):
    from tnllm.webui import launch as app

    demo = app.build_demo(runtime)
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, **app.launch_kwargs("127.0.0.1", None))
    try:
        code = readme_block("## HTTP API (gradio_client)").replace("http://127.0.0.1:7860/", url)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md", "exec"), {})  # noqa: S102 (our own README)
    finally:
        demo.close()
    printed = out.getvalue()
    assert "tok/s" in printed and "recurrent state" in printed and "rows so far" in printed and "🏁" in printed
