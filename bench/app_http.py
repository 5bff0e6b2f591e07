"""The app as users get it: a chat reply's streamed tokens per second over HTTP, against the engine alone.

    python bench/app_http.py --device cuda --model preset:tnl-7b,assets/tnl --out bench/results/app-h200.json
    python bench/app_http.py --device cpu --model preset:tiny --tokens 24 --runs 1 --out /tmp/app.json  # smoke

Per --model, with chat's default sampling (seeded, so both paths sample the same tokens) and float weights:
* "engine": in this process, `load_runtime` (what app.py loads) and one session of its engine per run, the
  reply read through `Reply.updates()` as the chat handler reads it;
* "app-http": `python app.py` in a subprocess on the same device, one new client session per run, the reply
  streamed over Gradio's queue (SSE) as a browser gets it.
tok_s = (tokens - 1) / (time the reply's text was complete - time of the first update carrying text): the decode
rate a user watches, prefill excluded. Over HTTP the final result (Gradio's completion message, which ends the
spinner) follows the message that completed the text by a fixed millisecond or two: `tok_s_to_completion` counts
up to it. Each row is the median over --runs runs after one untimed run; `ratio` is app-http / engine (tok_s).
--switch-interval-ms 5,0.5: one app-http row per value of the app's interpreter switch interval (an A/B of how soon
the engine thread gets the interpreter lock back from Gradio's work); every app-http row names the interval it ran at.
Every row is written to --out as soon as it exists.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from tnllm.sampling import SamplingParams
from tnllm.webui.http_client import ChatClient
from tnllm.webui.launch import SWITCH_INTERVAL_MS
from tnllm.webui.runtime import load_runtime
from tnllm.webui.validation import CHAT_DEFAULTS

ROOT = Path(__file__).resolve().parents[1]

MESSAGE = "Tell me a long story about a lighthouse keeper and the sea."


def decode_rate(tokens: int, first_text_at: float | None, end_at: float | None) -> float | None:
    """Tokens per second after the first one; None when the reply had fewer than two tokens."""
    if tokens < 2 or first_text_at is None or end_at is None or end_at <= first_text_at:
        return None
    return (tokens - 1) / (end_at - first_text_at)


def engine_run(runtime, params: SamplingParams) -> tuple[int, float | None, float | None]:
    """(tokens, tok/s, tok/s to completion) of one reply in a fresh session of the app's engine: its last update
    is its completion."""
    session = runtime.engine.open()
    try:
        reply = session.send(MESSAGE, params)
        first = None
        for update in reply.updates():
            if first is None and update.text:
                first = time.perf_counter()
        rate = decode_rate(reply.stats.new_tokens, first, time.perf_counter())
        return reply.stats.new_tokens, rate, rate
    finally:
        session.close()


def http_run(url: str, fn_index: int, controls: tuple) -> tuple[int, float | None, float | None]:
    """(tokens, tok/s, tok/s to completion) of one reply streamed over HTTP in a new client session."""
    client = ChatClient(url, fn_index, timeout=600)
    try:
        result = client.chat(MESSAGE, controls)
    finally:
        client.close()
    if result.outcome != "completed":
        raise RuntimeError(f"chat over HTTP failed: {result.outcome} {result.error}")
    tokens = int(result.info["new_tokens"])
    return (tokens, decode_rate(tokens, result.first_text_at, result.last_text_at),
            decode_rate(tokens, result.first_text_at, result.done_at))


def timed_runs(run, n: int) -> dict:
    """One untimed run, then n: the median rates and the token counts."""
    run()
    results = [run() for _ in range(n)]
    rates = [r for _, r, _ in results if r is not None]
    to_completion = [r for _, _, r in results if r is not None]
    return {"tokens": [t for t, _, _ in results], "tok_s": statistics.median(rates) if rates else None,
            "tok_s_runs": rates, "tok_s_to_completion": statistics.median(to_completion) if to_completion else None}


class App:
    """`python app.py` in a subprocess (own process group), up when its /config answers."""

    def __init__(self, args, model: str, port: int, switch_interval_ms: float | None = None):
        command = [sys.executable, "app.py", "--device", args.device, "--model", model, "--baseline", "none",
                   "--no-int8", "--port", str(port), "--max-reply-seconds", "600"]
        if switch_interval_ms is not None:
            command += ["--switch-interval-ms", str(switch_interval_ms)]
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile("w", prefix="app-http-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + args.startup_s
        while True:
            try:
                self.fn_index = ChatClient.find_fn_index(self.url)
                return
            except (httpx.HTTPError, LookupError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"app did not start: see {self.log.name}") from None
                time.sleep(1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)
        self.log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="preset:tnl-7b,assets/tnl", help="comma-separated app --model values")
    parser.add_argument("--tokens", type=int, default=256, help="max_new_tokens of each reply")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--port", type=int, default=7931)
    parser.add_argument("--startup-s", type=float, default=300)
    parser.add_argument("--switch-interval-ms", default="",
                        help="comma-separated app --switch-interval-ms values, one app-http row each (default: one "
                             "row at the app's default)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    params = SamplingParams(**{**CHAT_DEFAULTS, "max_new_tokens": args.tokens, "seed": 0})
    controls = (params.temperature, params.top_p, params.top_k, params.repetition_penalty, args.tokens, 0)
    device = torch.device(args.device)
    results = {"bench": "app-http", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
               "torch": torch.__version__, "command": "python " + " ".join(sys.argv), "message": MESSAGE,
               "sampling": {**CHAT_DEFAULTS, "max_new_tokens": args.tokens, "seed": 0}, "rows": []}

    def save(row: dict) -> None:
        results["rows"].append(row)
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(json.dumps(row), flush=True)

    for model in args.model.split(","):
        runtime = load_runtime(model, "none", int8=False, device=args.device)
        engine = timed_runs(lambda rt=runtime: engine_run(rt, params), args.runs)
        save({"model": model, "path": "engine", **engine})
        runtime.engine.shutdown()
        del runtime
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        for interval in [float(v) for v in args.switch_interval_ms.split(",") if v] or [None]:
            app = App(args, model, args.port, interval)
            try:
                http = timed_runs(lambda a=app: http_run(a.url, a.fn_index, controls), args.runs)
            finally:
                app.stop()
            ratio = http["tok_s"] / engine["tok_s"] if http["tok_s"] and engine["tok_s"] else None
            ran_at = SWITCH_INTERVAL_MS if interval is None else interval
            save({"model": model, "path": "app-http", "switch_interval_ms": ran_at, **http, "ratio_to_engine": ratio})


if __name__ == "__main__":
    main()
