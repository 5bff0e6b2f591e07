"""Soak and concurrency figures for the chat app: a launched app on 127.0.0.1 driven over HTTP.

    python bench/soak.py --minutes 3                       # bundled model, app defaults; writes the JSON
    python bench/soak.py --minutes 1 --model preset:tiny --no-int8
    python bench/soak.py --report                          # README "Reliability" section from the JSON

Three parts, one JSON (bench/results/soak-cpu.json by default; parts not re-run keep their last figures):
* concurrency: for each `concurrency_limit` K in --concurrency-sweep, 8 clients send greedy 48-token replies
  at once, 3 rounds; aggregate tokens/s, time to first streamed update (client side, queue wait included) and
  reply time p50/p95. The app's default K is the one with the highest aggregate tokens/s.
* soak: --clients threads loop for --minutes over mixed traffic (chat 45%, Stop mid-stream 15%, dropped
  connection 10%, invalid input 15%, abuse 15%, a new session 20% of the time); counts requests by outcome,
  unexpected results of well-behaved requests as errors, samples RSS, open fds, and session counts; drift =
  RSS at the end - RSS after minute 1. Abuse is one of: a direct-route call with an event id, a join
  whose result stream is never opened, a cancel of another session's event, an upload, a malformed protocol
  request; each has one right answer (404, queued then abandoned, 404, 413, a 4xx), any other is counted.
  Then a burst of probes (`PROBES` of each abuse kind) measures server RSS before and after them, and the reply
  generators left running (`store.active`) and Gradio iterators left open once idle: both must be 0.
* stop during prefill (--prefill-stop): the longest allowed prompt stopped right after its first prefill chunk;
  time from the cancel request to the server's `finally`, against one chunk's prefill time.

    python bench/soak.py --minutes 0 --concurrency-sweep ''   # only the stop-during-prefill part
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import random
import statistics
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import httpx
import torch

from tnllm.bench import percentile, timed
from tnllm.memory import process_rss_bytes
from tnllm.webui import gradio_internals as gi
from tnllm.webui.http_client import ChatClient
from tnllm.webui.malloc import MALLOC_ARENAS

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "bench" / "results" / "soak-cpu.json"
README = ROOT / "README.md"
START, END = "<!-- reliability:start -->", "<!-- reliability:end -->"
PROMPTS = ["Hi! How was your weekend?", "What is your favourite book, and why?", "Tell me something about the ocean.",
           "Do you like cooking? What do you make?", "ok", "Any plans for the summer? 🌞", "¿Hablas español?"]
BAD = [("   ", None), ("\u200b\u200b", None), ("x" * 9000, None), ("hi", {0: -1.0}), ("hi", {1: 1.5}),
       ("hi", {2: -5}), ("hi", {4: 10**9}), ("hi", {5: 1.5}), ("hi", {0: "hot"}), ("\x00\x01", None)]
ABUSE = ("direct_route", "unlistened_join", "foreign_cancel", "upload", "malformed")
PROBES = {"direct_route": 100, "unlistened_join": 20, "foreign_cancel": 20, "upload": 20, "malformed": 100}
MALFORMED = [{"session_hash": ""}, {"session_hash": "\ud800"}, {"session_hash": "x" * 100}, {"fn_index": 999},
             {"fn_index": "1"}, {"data": "not a list"}, b"{not json", b"[]"]
LONG = (0.0, 1.0, 0, 1.0, 1024, 0)


def rss_mib() -> float:
    """This process's resident memory in MiB (the soak runs the server in-process: it is the server's)."""
    return process_rss_bytes() / 2**20


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def launch(runtime, concurrency: int, queue_size: int):
    from tnllm.webui import launch as app

    demo = app.build_demo(runtime, concurrency_limit=concurrency, max_size=queue_size)
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, **app.launch_kwargs("127.0.0.1", None, runtime))
    return demo, url, ChatClient.find_fn_index(url)


def close(demo) -> None:
    """Stop a launched app and give its chat sessions' state slots back: the next app on the same runtime (the
    next concurrency setting) starts with every slot free, as a freshly started server does."""
    demo.close()
    demo.sessions.close()


class Timed(ChatClient):
    """ChatClient that also records the time to the first streamed update."""

    def chat(self, *args, **kwargs):
        self.first_update = None
        start = time.perf_counter()
        original = self.http.stream

        def stream(*a, **k):
            ctx = original(*a, **k)
            response = ctx.__enter__()
            lines = response.iter_lines

            def iter_lines():
                for line in lines():
                    if self.first_update is None and '"process_generating"' in line:
                        self.first_update = time.perf_counter() - start
                    yield line
            response.iter_lines = iter_lines

            class _Ctx:
                def __enter__(self_inner):
                    return response

                def __exit__(self_inner, *exc):
                    return ctx.__exit__(*exc)
            return _Ctx()

        self.http.stream = stream
        try:
            result = super().chat(*args, **kwargs)
        finally:
            self.http.stream = original
        result.seconds = time.perf_counter() - start
        return result


def measure_concurrency(runtime, ks: list[int], clients: int = 8, rounds: int = 3, tokens: int = 48) -> list[dict]:
    rows = []
    for k in ks:
        demo, url, fn = launch(runtime, k, 64)
        try:
            Timed(url, fn).chat("warm up", (0.0, 1.0, 0, 1.0, 8, 0))
            ttfu, total, new_tokens, errors = [], [], 0, 0
            start = time.perf_counter()
            def one(i: int, url=url, fn=fn):
                c = Timed(url, fn)
                return c.chat(PROMPTS[i % len(PROMPTS)], (0.0, 1.0, 0, 1.0, tokens, 0)), c.first_update

            for _ in range(rounds):
                with ThreadPoolExecutor(clients) as pool:
                    results = list(pool.map(one, range(clients)))
                for res, first in results:
                    if res.outcome != "completed":
                        errors += 1
                        continue
                    ttfu.append(first or res.seconds)
                    total.append(res.seconds)
                    new_tokens += res.info.get("new_tokens", 0)
            wall = time.perf_counter() - start
        finally:
            close(demo)
        rows.append({"concurrency_limit": k, "clients": clients, "requests": clients * rounds, "errors": errors,
                     "aggregate_tokens_per_s": new_tokens / wall, "first_update_p50_s": percentile(ttfu, .5),
                     "first_update_p95_s": percentile(ttfu, .95), "reply_p50_s": percentile(total, .5),
                     "reply_p95_s": percentile(total, .95)})
        print(f"K={k}: {rows[-1]['aggregate_tokens_per_s']:.0f} tok/s aggregate, first update p50 "
              f"{rows[-1]['first_update_p50_s']:.2f}s p95 {rows[-1]['first_update_p95_s']:.2f}s, errors {errors}",
              flush=True)
    return rows


class Abuser:
    """Abusive requests against a launched app, each checked against the one answer it should get."""

    def __init__(self, url: str, fn: int):
        self.api, self.fn = url.rstrip("/") + "/gradio_api/", fn
        self.http = httpx.Client(timeout=60)
        self.event_ids: list[str] = []  # of unlistened joins: what a foreign cancel aims at

    def close(self) -> None:
        self.http.close()

    def body(self, message: str = "hi", controls: tuple = (0.0, 1.0, 0, 1.0, 16, 0)) -> dict:
        return {"data": [message, *controls], "fn_index": self.fn, "session_hash": uuid.uuid4().hex[:12]}

    def send(self, kind: str, rng: random.Random) -> str | None:
        """One request of that kind; None when answered as it should be, else what came back."""
        if kind == "direct_route":
            route = rng.choice(["run/chat", "api/chat", "run/predict"])
            r = self.http.post(self.api + route, json={**self.body(), "event_id": uuid.uuid4().hex})
            ok = r.status_code == 404
        elif kind == "unlistened_join":
            r = self.http.post(self.api + "queue/join", json=self.body(rng.choice(PROMPTS), LONG))
            ok = r.status_code in (200, 503)  # queued (then abandoned), or the queue is full
            if r.status_code == 200:
                self.event_ids = [*self.event_ids[-50:], r.json()["event_id"]]
        elif kind == "foreign_cancel":
            target = rng.choice(self.event_ids) if self.event_ids else uuid.uuid4().hex
            r = self.http.post(self.api + "cancel", json={**self.body(), "event_id": target})
            ok = r.status_code == 404
        elif kind == "upload":
            r = self.http.post(self.api + "upload", files={"files": ("x.bin", os.urandom(100 << 10))})
            ok = r.status_code == 413
        else:
            bad = rng.choice(MALFORMED)
            content = bad if isinstance(bad, bytes) else json.dumps({**self.body(), **bad}).encode()
            r = self.http.post(self.api + "queue/join", content=content, headers={"content-type": "application/json"})
            ok = 400 <= r.status_code < 500
        return None if ok else f"{kind}: HTTP {r.status_code} {r.text[:100]}"


def probe_burst(demo, url: str, fn: int, seed: int = 0) -> dict:
    """`PROBES` abusive requests of each kind, 8 at a time; server RSS before and after (idle, collected)."""
    store, rng = demo.sessions, random.Random(seed)
    abuser = Abuser(url, fn)
    gc.collect()
    before = rss_mib()
    kinds = [k for k, n in PROBES.items() for _ in range(n)]
    rng.shuffle(kinds)
    with ThreadPoolExecutor(8) as pool:
        problems = [p for p in pool.map(lambda k: abuser.send(k, random.Random(rng.random())), kinds) if p]
    abuser.close()
    settle = time.perf_counter()
    while (store.active or gi.queued_events(demo)) and time.perf_counter() - settle < 120:
        time.sleep(0.1)
    settled_s = time.perf_counter() - settle
    check = ChatClient(url, fn).chat("hello again", (0.0, 1.0, 0, 1.0, 16, 0))  # a well-behaved client after it
    gc.collect()
    return {"requests": dict(Counter(kinds)), "unexpected": len(problems), "unexpected_samples": problems[:5],
            "rss_before_mib": before, "rss_after_mib": rss_mib(), "idle_after_s": settled_s,
            "generators_left": store.active, "iterators_left": gi.open_iterators(demo),
            "client_after": check.outcome}


class _Tally:
    """The soak's outcome counts, shared by its client threads, with samples of the unexpected results."""

    def __init__(self):
        self.counts: Counter[str] = Counter()
        self.errors: list[str] = []
        self.abuse_problems: list[str] = []
        self.lock = threading.Lock()

    def note(self, kind: str, problem: str | None = None):
        """Count one well-behaved request of `kind`; a problem is an error of the run."""
        with self.lock:
            self.counts[kind] += 1
            if problem:
                self.counts["errors"] += 1
                self.errors.append(problem[:200])

    def note_abuse(self, problem: str | None):  # kept apart: `errors` counts well-behaved requests only
        """Count one abusive request; a problem is an unexpected answer to it."""
        with self.lock:
            self.counts["abuse"] += 1
            if problem:
                self.counts["abuse_unexpected"] += 1
                self.abuse_problems.append(problem[:200])


def _random_controls(rng: random.Random) -> tuple:
    """The chat's six sampling controls, drawn at random (always in the same order of draws)."""
    return (round(rng.uniform(0, 1.2), 2), round(rng.uniform(0.5, 1), 2), rng.choice([0, 20, 50]),
            round(rng.uniform(1, 1.3), 2), rng.randint(8, 64), rng.randint(-1, 10**6))


class _SoakWorker:
    """One looping client of the soak: mixed traffic until the deadline, every outcome noted in a `_Tally`."""

    def __init__(self, url: str, fn: int, rng: random.Random, tally: _Tally):
        self.url, self.fn, self.rng, self.tally = url, fn, rng, tally
        self.client = ChatClient(url, fn)
        self.abuser = Abuser(url, fn)

    def new_client(self):
        """Close the client and start another (a new session)."""
        self.client.close()
        self.client = ChatClient(self.url, self.fn)

    def run(self, deadline: float):
        """Send requests until `deadline` (perf_counter); a client-side failure is counted, not raised."""
        rng = self.rng
        while time.perf_counter() < deadline:
            if rng.random() < 0.2:
                self.new_client()
            controls = _random_controls(rng)
            action = rng.random()
            try:
                self.request(action, controls)
            except Exception as exc:  # noqa: BLE001 (a client-side failure is an error of the run, not a crash)
                self.tally.note("client_exception", f"{type(exc).__name__}: {exc}")
                self.new_client()
        self.client.close()
        self.abuser.close()

    def request(self, action: float, controls: tuple):
        """One request, its kind picked by `action` in [0, 1): invalid 15%, abuse 15%, Stop 15%, dropped 10%,
        chat 45%."""
        if action < 0.15:
            self.invalid(controls)
        elif action < 0.30:
            self.tally.note_abuse(self.abuser.send(self.rng.choice(ABUSE), self.rng))
        elif action < 0.45:
            self.stopped(controls)
        elif action < 0.55:
            self.dropped(controls)
        else:
            self.chat(controls)

    def invalid(self, controls: tuple):
        """Invalid input (a bad message or control): must be answered 422."""
        rng = self.rng
        text, changes = rng.choice(BAD)
        bad = list(controls)
        for i, v in (changes or {}).items():
            bad[i] = v
        r = self.client.chat(text, tuple(bad))
        self.tally.note("invalid", None if r.status == 422 else f"invalid input answered {r.status} {r.outcome}")

    def stopped(self, controls: tuple):
        """A long reply Stopped after a few streamed updates."""
        rng = self.rng
        r = self.client.chat(rng.choice(PROMPTS), (*controls[:4], 1024, controls[5]), cancel_after=rng.randint(1, 6))
        self.tally.note("busy" if r.status == 503 else "cancelled",
                        None if r.outcome in ("cancelled", "completed", "busy") else f"cancel: {r.outcome} {r.error}")

    def dropped(self, controls: tuple):
        """A long reply whose connection is dropped after a few streamed updates (then a new client)."""
        rng = self.rng
        r = self.client.chat(rng.choice(PROMPTS), (*controls[:4], 1024, controls[5]),
                             disconnect_after=rng.randint(1, 6))
        self.new_client()
        self.tally.note("busy" if r.status == 503 else "disconnected",
                        None if r.outcome in ("disconnected", "completed", "busy") else f"disconnect: {r.outcome}")

    def chat(self, controls: tuple):
        """An ordinary reply, read to the end."""
        r = self.client.chat(self.rng.choice(PROMPTS), controls)
        self.tally.note("busy" if r.status == 503 else "chat",
                        None if r.outcome in ("completed", "busy") else f"chat: {r.outcome} {r.error}")


def _wait_idle(store) -> int:
    """Wait (up to 10 s) for the replies still streaming to finish, collect garbage; the replies left."""
    idle_wait = time.perf_counter()
    while store.active and time.perf_counter() - idle_wait < 10:
        time.sleep(0.05)
    gc.collect()
    return store.active


def _soak_figures(tally: _Tally, samples: list, end: tuple, active_at_end: int, server_counts: dict,
                  probes: dict, demo, store) -> dict:
    """The soak's figures from its counts and its (time, RSS MiB, fds, app sessions, Gradio sessions) samples."""
    counts = tally.counts
    after_warmup = next((s for s in samples if s[0] >= 60), samples[0])
    served = sum(counts[k] for k in ("chat", "cancelled", "disconnected"))
    by_kind = {k: v for k, v in counts.items() if k not in ("errors", "abuse_unexpected")}
    return {"requests": sum(by_kind.values()), "served": served, "by_kind": by_kind, "errors": counts["errors"],
            "error_samples": tally.errors[:10], "abuse_unexpected": counts["abuse_unexpected"],
            "abuse_samples": tally.abuse_problems[:10], "server_outcomes": server_counts,
            "active_at_end": active_at_end, "probes": probes,
            "rss_start_mib": samples[0][1], "rss_after_1min_mib": after_warmup[1], "rss_end_mib": end[1],
            "rss_drift_after_1min_mib": end[1] - after_warmup[1], "rss_max_mib": max(s[1] for s in samples),
            "fds_start": samples[0][2], "fds_end": end[2], "chat_sessions_end": end[3],
            "gradio_session_capacity": demo.state_session_capacity, "app_session_capacity": store.max_sessions,
            "gradio_sessions_end": end[4], "samples": samples}


def soak(runtime, minutes: float, n_clients: int, concurrency: int, queue_size: int, seed: int = 0) -> dict:
    """--clients `_SoakWorker`s for --minutes against a launched app, server samples every 5 s, then a
    `probe_burst`; the figures of the "soak" part of the JSON."""
    demo, url, fn = launch(runtime, concurrency, queue_size)
    store = demo.sessions
    tally = _Tally()
    deadline = time.perf_counter() + minutes * 60
    samples: list[tuple[float, float, int, int, int]] = []
    t0 = time.perf_counter()

    def sample() -> tuple[float, float, int, int, int]:
        return (time.perf_counter() - t0, rss_mib(), open_fds(), len(store), gi.gradio_sessions(demo))

    def sampler():
        while time.perf_counter() < deadline:
            samples.append(sample())
            time.sleep(5)

    def worker(index: int):
        _SoakWorker(url, fn, random.Random(seed * 1000 + index), tally).run(deadline)

    threading.Thread(target=sampler, daemon=True).start()
    with ThreadPoolExecutor(n_clients) as pool:
        list(pool.map(worker, range(n_clients)))
    active_at_end = _wait_idle(store)
    end = sample()
    samples.append(end)
    server_counts = dict(store.counts)
    probes = probe_burst(demo, url, fn, seed)
    close(demo)
    return {"minutes": minutes, "clients": n_clients, "concurrency_limit": concurrency, "queue_size": queue_size,
            **_soak_figures(tally, samples, end, active_at_end, server_counts, probes, demo, store)}


def stop_during_prefill(runtime, repeats: int = 5) -> dict:
    """The longest prompt a message may be (MAX_MESSAGE_CHARS), Stop as soon as its first prefill chunk is
    reported; the time from the cancel request to the reply's `finally` on the server, against one prefill
    chunk's time (docs/reliability.md#stop-during-prefill)."""
    from tnllm.engine.engine import prefill_budgets
    from tnllm.webui.validation import MAX_MESSAGE_CHARS

    chunk = prefill_budgets("cpu")[1]  # a prompt read alone on the CPU: its engine step's chunk

    tokenizer = runtime.tokenizer
    sentence = "Tell me everything about the long history of the old harbour town and its people. "
    text = sentence * (MAX_MESSAGE_CHARS // len(sentence))
    prompt_ids = tokenizer.encode(text)
    ids = torch.tensor([prompt_ids[:chunk]])  # [1, one chunk]
    with torch.inference_mode():
        chunk_s = statistics.median(timed(lambda: runtime.model(ids, runtime.model.allocate_state(1), logits_to_keep=1),
                                          torch.device("cpu"))[1] for _ in range(5))
    demo, url, fn = launch(runtime, 1, 4)
    store, waits, fed = demo.sessions, [], []
    try:
        for _ in range(repeats):
            client = ChatClient(url, fn)
            result = client.chat(text, (0.0, 1.0, 0, 1.0, 16, 0), cancel_after=1)
            if result.cancelled_at is None:
                raise RuntimeError(f"no streamed update to cancel after: {result.outcome} {result.error}")
            while store.active:
                time.sleep(0.001)
            waits.append(store.last_finished - result.cancelled_at)
            fed.append(store._sessions[client.session_hash].context_tokens)
            client.close()
    finally:
        close(demo)
    return {"prompt_tokens": len(prompt_ids), "chunk_tokens": chunk, "chunk_ms": chunk_s * 1e3,
            "stop_to_finally_ms": [w * 1e3 for w in waits], "tokens_fed_when_stopped": fed}


def render(data: dict) -> str:
    env, lines = data["environment"], []
    model = env["model"].removeprefix(str(ROOT) + os.sep)  # the bundled checkpoint as a repo path
    lines.append(f"Date: {env.get('date') or 'not recorded'}. Measured by `python bench/soak.py` on {env['cpu']} "
                 f"({env['cores']} cores), model `{model}` ({env['precision']}, 8-bit: {env['int8']}), torch "
                 f"{env['torch']}, gradio {env['gradio']}.")
    if data.get("concurrency"):
        lines += ["", "Concurrency limit (8 clients at once, greedy 48-token replies, 3 rounds; first update = "
                  "client-side time to the first streamed piece, queue wait included):", "",
                  "| concurrency_limit | aggregate tok/s | first update p50 / p95 | reply p50 / p95 | errors |",
                  "|---|---|---|---|---|"]
        for r in data["concurrency"]:
            lines.append(f"| {r['concurrency_limit']} | {r['aggregate_tokens_per_s']:.0f} | "
                         f"{r['first_update_p50_s']:.2f} s / {r['first_update_p95_s']:.2f} s | "
                         f"{r['reply_p50_s']:.2f} s / {r['reply_p95_s']:.2f} s | {r['errors']} |")
        lines += ["", f"Chosen default: `--concurrency {data['chosen_concurrency']}` (the limit with the "
                  "highest aggregate throughput; more parallel replies only share the same cores, fewer let one long "
                  "reply hold everyone up)."]
    s = data.get("soak")
    if s:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(s["by_kind"].items()))
        lines += ["", f"Soak: {s['minutes']:g} min, {s['clients']} looping clients, concurrency_limit "
                  f"{s['concurrency_limit']}, queue {s['queue_size']}:", "",
                  "| requests | served (chat / Stop / dropped) | invalid → 422 | errors | RSS start → after 1 min → "
                  "end | drift after 1 min | open fds start → end | sessions at end (app / Gradio) |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| {s['requests']:,} | {s['served']:,} ({s['by_kind'].get('chat', 0):,} / "
                  f"{s['by_kind'].get('cancelled', 0):,} / {s['by_kind'].get('disconnected', 0):,}) | "
                  f"{s['by_kind'].get('invalid', 0):,} | {s['errors']} | {s['rss_start_mib']:.0f} → "
                  f"{s['rss_after_1min_mib']:.0f} → {s['rss_end_mib']:.0f} MiB | "
                  f"{s['rss_drift_after_1min_mib']:+.1f} MiB | {s['fds_start']} → {s['fds_end']} | "
                  f"{s['chat_sessions_end']} / {s['gradio_sessions_end']} |", "",
                  f"Memory: RSS grows while Gradio accumulates per-session state (history and component copies) up to "
                  f"its cap of {s.get('gradio_session_capacity', '?')} sessions (`MAX_GRADIO_SESSIONS` in "
                  "webui/launch.py); "
                  + _after_cap(s) + " The app's own session store keeps at most "
                  f"{s.get('app_session_capacity', 'a fixed number of')} recurrent states. The server shares "
                  f"{env.get('malloc_arenas', MALLOC_ARENAS)} glibc heaps between its threads and returns freed pages "
                  "after every reply (`tnllm.webui.malloc`, `tnllm.memory`; the drift without them is in "
                  "docs/reliability.md#host-memory).",
                  "",
                  f"Request kinds: {kinds}. Replies still streaming at the end: {s['active_at_end']}. Server-side "
                  f"outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(s["server_outcomes"].items())) + "."]
        if s.get("probes"):
            lines += ["", _abuse(s)]
    if data.get("stop_during_prefill"):
        x = data["stop_during_prefill"]
        waits = x["stop_to_finally_ms"]
        lines += ["", f"Stop during a long prefill ({x['prompt_tokens']:,}-token prompt, Stop sent as soon as the "
                  f"first {x['chunk_tokens']}-token chunk is reported, {len(waits)} runs): the reply's `finally` ran "
                  f"{statistics.median(waits):.0f} ms (median; max {max(waits):.0f} ms) after the cancel request; "
                  f"one prefill chunk takes {x['chunk_ms']:.0f} ms. Tokens read when stopped: "
                  + ", ".join(f"{n:,}" for n in x["tokens_fed_when_stopped"]) + "."]
    return "\n".join(lines)


def _abuse(s: dict) -> str:
    """The abuse part of the soak: abuse mixed into the traffic, then the burst of probes
    (docs/reliability.md#the-gradio-attack-surface)."""
    p = s["probes"]
    burst = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in p["requests"].items())
    return (f"Abuse: {s['by_kind'].get('abuse', 0):,} abusive requests mixed into the traffic (direct-route "
            f"calls, joins never listened to, cross-session cancels, uploads, malformed requests), "
            f"{s['abuse_unexpected']} answered otherwise than intended; errors for well-behaved clients: "
            f"{s['errors']}. Then a burst of probes, 8 at a time ({burst}): {p['unexpected']} unexpected answers; "
            f"server RSS {p['rss_before_mib']:.0f} MiB before, {p['rss_after_mib']:.0f} MiB after "
            f"({p['rss_after_mib'] - p['rss_before_mib']:+.1f} MiB), idle again {p['idle_after_s']:.1f} s after the "
            f"burst; reply generators left running: {p['generators_left']}, Gradio iterators left open: "
            f"{p['iterators_left']}; a well-behaved client right after: {p['client_after']}.")


def _after_cap(s: dict) -> str:
    cap = s.get("gradio_session_capacity")
    at_cap = [x for x in s["samples"] if x[4] >= (cap or 10**9)]
    if len(at_cap) < 2:
        return "the cap was not reached in this run."
    last_min = [x for x in at_cap if x[0] >= at_cap[-1][0] - 30]
    return (f"after it was reached (t = {at_cap[0][0]:.0f} s) RSS changed by {at_cap[-1][1] - at_cap[0][1]:+.1f} MiB "
            f"over {at_cap[-1][0] - at_cap[0][0]:.0f} s, {last_min[-1][1] - last_min[0][1]:+.1f} MiB in the last 30 s.")


def write_readme(data: dict) -> None:
    text = README.read_text(encoding="utf-8")
    if START not in text or END not in text:
        raise SystemExit(f"{README} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{START}\n{render(data)}\n{END}{tail}", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--model", default=None, help="as app.py --model (default: the bundled checkpoint)")
    p.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--concurrency", type=int, default=None, help="limit for the soak (default: the measured choice)")
    p.add_argument("--concurrency-sweep", default="1,2,4", help="limits to measure ('' to skip)")
    p.add_argument("--queue-size", type=int, default=16)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--prefill-stop", action=argparse.BooleanOptionalAction, default=True,
                   help="time Stop during the longest allowed prompt's prefill "
                        "(docs/reliability.md#stop-during-prefill)")
    p.add_argument("--report", action="store_true", help="only render the README section from --out")
    args = p.parse_args(argv)
    if args.report:
        write_readme(json.loads(args.out.read_text()))
        print(render(json.loads(args.out.read_text())))
        return

    import gradio

    from tnllm.webui.runtime import load_runtime

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    runtime = load_runtime(args.model, "matched", int8=args.int8, device="cpu")
    env = {"date": datetime.date.today().isoformat(), "cpu": platform.processor() or platform.machine(),
           "cores": os.cpu_count(), "model": runtime.info["model"], "precision": runtime.info["precision"],
           "int8": getattr(runtime.model, "quant_method", "none"), "malloc_arenas": MALLOC_ARENAS,
           "torch": torch.__version__, "gradio": gradio.__version__, "python": platform.python_version()}
    data: dict = json.loads(args.out.read_text()) if args.out.is_file() else {}  # parts not re-measured stay
    data["environment"] = env
    ks = [int(k) for k in args.concurrency_sweep.split(",") if k.strip()]
    if ks:
        data["concurrency"] = measure_concurrency(runtime, ks)
        data["chosen_concurrency"] = max(data["concurrency"], key=lambda r: r["aggregate_tokens_per_s"])[
            "concurrency_limit"]
    concurrency = args.concurrency or data.get("chosen_concurrency", 2)
    if args.minutes > 0:
        data["soak"] = soak(runtime, args.minutes, args.clients, concurrency, args.queue_size)
    if args.prefill_stop:
        data["stop_during_prefill"] = stop_during_prefill(runtime)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    print(render(data))
    print(json.dumps({k: v for k, v in data.get("soak", {}).items() if k != "samples"}))


if __name__ == "__main__":
    main()
