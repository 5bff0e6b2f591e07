"""`app.py --tp 2` under torchrun (2 gloo ranks on the CPU): rank 0 serves the chat, replies equal 1 process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from tests.conftest import free_port  # noqa: E402
from tnllm import TNLConfig, TransNormerLLM, load_model, load_tokenizer, save_model  # noqa: E402
from tnllm.engine import Engine, EngineConfig  # noqa: E402
from tnllm.sampling import SamplingParams  # noqa: E402
from tnllm.webui.validation import message_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GREEDY = (0.0, 1.0, 0, 1.0, 12, 0)  # temperature, top-p, top-k, repetition penalty, max new tokens, seed



@pytest.fixture(scope="module")
def tp_server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tp-model")
    torch.manual_seed(0)
    save_model(TransNormerLLM(TNLConfig.from_name("tiny", vocab_size=8192, tie_word_embeddings=False)), directory)
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "TNLLM_MODEL": ""}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "app.py",
         "--tp", "2", "--model", str(directory), "--baseline", "matched", "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    try:
        while True:
            try:
                client = gradio_client.Client(url, verbose=False)
                break
            except Exception:  # noqa: BLE001 (not up yet)
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"app --tp 2 did not start:\n{proc.stdout.read()[-3000:]}")
                time.sleep(1)
        yield client, directory
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_tp_app_chat_equals_single_process(tp_server):
    client, directory = tp_server
    reply, _, info = client.predict("hello there", *GREEDY, api_name="/chat")
    second, _, info2 = client.predict("and how are you?", *GREEDY, api_name="/chat")
    engine = Engine(load_model(directory), load_tokenizer(ROOT / "assets" / "tokenizer.model"),
                    EngineConfig(max_sessions=1, threaded=False))
    session, params = engine.open(), SamplingParams(temperature=0, max_new_tokens=12)
    assert message_text(reply) == session.send("hello there", params).wait().text
    assert message_text(second) == session.send("and how are you?", params).wait().text
    assert info2["prompt_tokens"] < 20 and info2["state_bytes"] == info["state_bytes"]
    # each rank holds half of the heads: half of the single-process state (plus the positions)
    assert info["state_bytes"] < engine.pool.slot_bytes
