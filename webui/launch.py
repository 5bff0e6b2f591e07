"""TransNormerLLM chat demo: streaming chat with constant-memory decoding, a latency race against a
Transformer, and what is loaded.

Examples:
    python app.py                                   # bundled model (or tiny demo weights), CPU or GPU, 127.0.0.1
    tnllm-chat                                      # the same, from an installed package (pip install .)
    python app.py --model OpenNLPLab/TransNormerLLM-385M --no-int8 --device cuda
    torchrun --standalone --nproc-per-node 2 app.py --tp 2 --model DIR   # tensor parallel; rank 0 serves the UI

Every flag has an environment variable (TNLLM_MODEL, TNLLM_BASELINE, TNLLM_INT8, TNLLM_DEVICE, TNLLM_DTYPE,
TNLLM_MAX_CONTEXT, TNLLM_HOST, TNLLM_PORT, TNLLM_CONCURRENCY, TNLLM_QUEUE_SIZE, TNLLM_MAX_REPLY_SECONDS, TNLLM_TP,
TNLLM_SWITCH_INTERVAL_MS).
Without --host, Gradio's own GRADIO_SERVER_NAME applies (a Space sets it), else loopback. Launch settings
(docs/reliability.md#safe-launch-settings): share off, no SSR, no monitoring/MCP/run-history endpoints, 1 MB
uploads, model directories blocked from file serving. A checkpoint or tokenizer that fails its checks stops the
start-up with exit code 2 and one line naming the file and the mismatch, before Gradio is even imported (so
within seconds, and nothing is ever served).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from tnllm.webui.guard import middleware as guard_middleware  # noqa: E402 (Starlette only)
from tnllm.webui.runtime import (  # noqa: E402 (no Gradio yet)
    BUNDLED_LLAMA,
    BUNDLED_TNL,
    Runtime,
    StartupError,
    load_runtime,
    load_tp_runtime,
)
from tnllm.webui.validation import CHAT_CONCURRENCY, MAX_REPLY_SECONDS  # noqa: E402

log = logging.getLogger("tnllm.app")
EXIT_BAD_MODEL = 2
# Gradio keeps each session's state (chat history, component copies: 0.1-0.7 MB measured by bench/soak.py) for an
# hour, up to 10,000 sessions by default; API clients never close theirs. Least recently used beyond this go.
MAX_GRADIO_SESSIONS = 200
# The engine thread needs the interpreter lock back after every PyTorch op; while Gradio's event loop runs Python
# (sending an update), CPython makes it wait up to the switch interval, 5 ms by default: as long as a whole short
# reply of the bundled model on a GPU. Streamed over HTTP, that model's replies reached 0.41-0.83 of the engine's
# rate at 5 ms and 0.88-1.36 at 0.5-1 ms (H200 and CPU), while the 7B shape did not change (docs/engine.md).
SWITCH_INTERVAL_MS = 0.5


def build_demo(runtime: Runtime, *, concurrency_limit: int = CHAT_CONCURRENCY, max_size: int = 16,
               max_reply_s: float = MAX_REPLY_SECONDS):
    """The Gradio app (tnllm.webui.ui.build_demo); Gradio is imported only once the model has loaded."""
    from tnllm.webui.ui import build_demo as build

    return build(runtime, concurrency_limit=concurrency_limit, max_size=max_size, max_reply_s=max_reply_s)


def launch_kwargs(host: str | None, port: int | None, runtime: Runtime | None = None) -> dict:
    """Safe launch settings (docs/reliability.md#safe-launch-settings) and the protocol guard (tnllm.webui.guard);
    host/port None leave Gradio's env vars in charge."""
    blocked = [str(BUNDLED_TNL), str(BUNDLED_LLAMA)]
    if runtime and os.path.isdir(runtime.model_path):
        blocked.append(os.path.abspath(runtime.model_path))
    return dict(server_name=host, server_port=port, share=False, ssr_mode=False, show_error=False,
                max_file_size="1mb", enable_monitoring=False, mcp_server=False, run_history=False,
                strict_cors=True, allowed_paths=[], blocked_paths=blocked,
                state_session_capacity=MAX_GRADIO_SESSIONS, app_kwargs={"middleware": guard_middleware()})


def launch(demo, host: str | None, port: int | None, runtime: Runtime) -> None:
    """Serve `demo` until interrupted, printing the URL it serves on.

    quiet=True is Gradio's only switch for its "To create a public link, set `share=True`" hint, which would
    invite the one setting this app keeps off; quiet also hides Gradio's "Running on local URL" line, so the
    URL is printed here.
    """
    demo.launch(prevent_thread_lock=True, quiet=True, **launch_kwargs(host, port, runtime))
    print(f"* Running on local URL:  {demo.local_url}", flush=True)
    demo.block_thread()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; every flag defaults to its TNLLM_* environment variable (see the module docstring)."""
    env = os.environ.get
    description, _, epilog = __doc__.partition("\n\n")  # the first paragraph, then the examples and settings
    p = argparse.ArgumentParser(description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=env("TNLLM_MODEL"),
                   help="local checkpoint dir or Hub repo id (default: assets/tnl/, else tiny demo weights)")
    p.add_argument("--baseline", default=env("TNLLM_BASELINE"),
                   help="local Llama dir, 'matched' (random, sized like the model) or 'none' (default: assets/llama/, "
                        "else matched)")
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
    p.add_argument("--concurrency", type=int, default=int(env("TNLLM_CONCURRENCY", str(CHAT_CONCURRENCY))),
                   help="chat replies streamed at once (the benchmark runs one at a time)")
    p.add_argument("--queue-size", type=int, default=int(env("TNLLM_QUEUE_SIZE", "16")),
                   help="requests waiting beyond that; more get a 'Queue is full' (HTTP 503) answer")
    p.add_argument("--max-reply-seconds", type=float,
                   default=float(env("TNLLM_MAX_REPLY_SECONDS", str(MAX_REPLY_SECONDS))),
                   help=f"a reply's wall-clock limit, prefill included; it then ends as if stopped "
                        f"(default {MAX_REPLY_SECONDS:g})")
    p.add_argument("--tp", type=int, default=int(env("TNLLM_TP", "1")),
                   help="tensor-parallel ranks; launch with torchrun --nproc-per-node N (float weights)")
    p.add_argument("--switch-interval-ms", type=float,
                   default=float(env("TNLLM_SWITCH_INTERVAL_MS", str(SWITCH_INTERVAL_MS))),
                   help=f"how long a thread may keep the interpreter lock while another waits for it (default "
                        f"{SWITCH_INTERVAL_MS:g}; Python's own is 5): shorter hands it back sooner from the web "
                        f"server's work to the engine thread")
    args = p.parse_args(argv)
    if not args.max_reply_seconds > 0:
        p.error(f"--max-reply-seconds must be > 0, got {args.max_reply_seconds}")
    if not args.switch_interval_ms > 0:
        p.error(f"--switch-interval-ms must be > 0, got {args.switch_interval_ms}")
    return args


def serve_tensor_parallel(args: argparse.Namespace) -> None:
    """Every torchrun rank loads its shard; rank 0 builds the runtime and serves the UI, the others follow."""
    from tnllm.tp.comm import init_tp
    from tnllm.tp.serve import serve, shutdown

    tp = init_tp()
    if tp.size != args.tp:
        raise SystemExit(f"error: --tp {args.tp} needs torchrun --nproc-per-node {args.tp} (got {tp.size} ranks)")
    source = args.model or str(BUNDLED_TNL)

    def ui(model) -> None:
        runtime = load_tp_runtime(model, source, args.baseline, max_context=args.max_context)
        demo = build_demo(runtime, concurrency_limit=args.concurrency, max_size=args.queue_size,
                          max_reply_s=args.max_reply_seconds)
        launch(demo, args.host, args.port, runtime)

    try:
        serve(source, ui, dtype=args.dtype, tp=tp)
    except StartupError as exc:
        print(f"error: cannot serve this model: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_MODEL) from None
    finally:
        shutdown()


def main(argv: list[str] | None = None) -> None:
    """Load the model (or fail with exit code 2), then serve the app: `python app.py` and `tnllm-chat`."""
    args = parse_args(argv)
    sys.setswitchinterval(args.switch_interval_ms / 1e3)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("tnllm").setLevel(logging.INFO)  # startup progress; Gradio/httpx stay quiet
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if args.tp > 1:
        return serve_tensor_parallel(args)
    try:
        runtime = load_runtime(args.model, args.baseline, int8=args.int8, device=args.device, dtype=args.dtype,
                               max_context=args.max_context)
    except StartupError as exc:
        print(f"error: cannot serve this model: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_MODEL) from None
    demo = build_demo(runtime, concurrency_limit=args.concurrency, max_size=args.queue_size,
                      max_reply_s=args.max_reply_seconds)
    launch(demo, args.host, args.port, runtime)
