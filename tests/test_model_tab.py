"""The Model tab: tables with real headers, and no server path in what the app makes public.

Gradio's /config endpoint hands every visitor the Model tab's Markdown, so the tab must name models by their
repo-relative path or their name, never by where they sit on the server.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("gradio")
pytest.importorskip("transformers")

import httpx  # noqa: E402

from tests.conftest import ROOT  # noqa: E402

SERVER_PATHS = [str(ROOT), os.getcwd(), "/work", "/root", "/home", "/tmp"]


def leaked_paths(text: str) -> list[str]:
    return [p for p in SERVER_PATHS if p in text]


@pytest.fixture(scope="module")
def bundled():
    """The default runtime: assets/tnl with assets/tokenizer.model, assets/llama as baseline (float weights)."""
    from tnllm.webui.runtime import load_runtime

    return load_runtime(None, None, int8=False, device="cpu")


def test_tables_have_headers_and_name_the_bundled_files_relative_to_the_repo(bundled):
    from tnllm.webui.model_tab import model_card

    card = model_card(bundled)
    rows = [line for line in card.splitlines() if line.startswith("|")]
    assert not [r for r in rows if re.fullmatch(r"\|(\s*\|)+", r)], f"an empty header row:\n{card}"
    assert card.count("| Setting | Value |") == 2
    assert "| model | assets/tnl |" in card and "| model | assets/llama |" in card
    assert "| tokenizer | assets/tokenizer.model (8192 pieces) |" in card
    assert not leaked_paths(card), card


def test_a_checkpoint_outside_the_repo_shows_its_name_and_stays_blocked_from_file_serving(runtime, tmp_path):
    from tnllm import save_model
    from tnllm.webui import launch as app
    from tnllm.webui.model_tab import model_card
    from tnllm.webui.runtime import load_runtime

    checkpoint = tmp_path / "my-chat-model"
    save_model(runtime.model, checkpoint)
    shutil.copy(runtime.tokenizer.path, checkpoint)
    (checkpoint / "README.md").write_text("model card\n")
    outside = load_runtime(str(checkpoint), "matched", int8=False, device="cpu")
    card = model_card(outside)
    assert "| model | my-chat-model |" in card and "| tokenizer | tokenizer.model (" in card
    assert "see the model card README.md" in card and not leaked_paths(card), card
    assert str(checkpoint) in app.launch_kwargs(None, None, outside)["blocked_paths"]


def test_served_config_holds_no_server_path(bundled):
    """What any visitor can fetch: GET /config of the launched app (bundled model, its defaults)."""
    from tnllm.webui import launch as app

    demo = app.build_demo(bundled)
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, **app.launch_kwargs("127.0.0.1", None, bundled))
    try:
        config = httpx.get(url.rstrip("/") + "/config", timeout=30)
    finally:
        demo.close()
    assert config.status_code == 200 and "assets/tnl" in config.text, "the Model tab is in the config"
    assert not leaked_paths(config.text), [config.text[max(0, config.text.find(p) - 200):][:400]
                                           for p in leaked_paths(config.text)]


def test_shown_path_of_a_hub_id_is_the_id():
    from tnllm.webui.runtime import shown_path

    assert shown_path("OpenNLPLab/TransNormerLLM-385M") == "OpenNLPLab/TransNormerLLM-385M"
    assert shown_path(Path(ROOT, "assets", "tnl")) == "assets/tnl"


def test_model_tab_says_which_cpu_matmuls_run(bundled):
    """The engine lays every fp32 Linear out for oneDNN on the CPU; the tab counts them (6 layers x 5, and the
    head)."""
    from tnllm.webui.model_tab import model_card

    card = model_card(bundled)
    assert "| CPU matmuls | oneDNN on weights laid out once: 31 fp32 Linears (tnllm/linear.py) |" in card


def test_model_tab_names_the_8bit_method_and_why():
    from tnllm import quant
    from tnllm.webui.runtime import load_runtime

    runtime = load_runtime("preset:tiny", "none", int8=True, device="cpu")
    try:
        assert runtime.info["8-bit"] == f"int8: {quant.why_method('cpu')}"
        assert runtime.baseline is None and runtime.baseline_info == {"model": "none"}
    finally:
        runtime.engine.shutdown()
