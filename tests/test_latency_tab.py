"""The Latency vs Transformer tab: the live sweep (rounds, medians, spread, streaming, progress in runs), the
recorded reference results, the race (winner, finish reasons, token-counted limits, time limit) and the
/latency and /race HTTP API (documented types accepted, own descriptions, named outputs).

Model: the tiny preset with random weights and a random Llama matched to it, CPU, tiny contexts.
"""

from __future__ import annotations

import json
import os
import shutil

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import pytest  # noqa: E402

gr = pytest.importorskip("gradio")
pytest.importorskip("transformers")

import torch  # noqa: E402

from tnllm.bench import BenchRow, adapter_for, sweep_rounds  # noqa: E402
from tnllm.engine import Engine, EngineConfig  # noqa: E402
from tnllm.sampling import SamplingParams  # noqa: E402
from tnllm.webui import latency  # noqa: E402
from tnllm.webui.latency import (  # noqa: E402
    RESULTS,
    RaceStops,
    load_recorded,
    race,
    race_ids,
    run_benchmark,
    summary_row,
)
from tnllm.webui.validation import MAX_MESSAGE_CHARS  # noqa: E402


def _row(model: str, context: int, decode_ms: float, ttft_ms: float) -> BenchRow:
    return BenchRow(model, "none", context, ttft_ms, decode_ms, decode_ms, decode_ms, 1e3 / decode_ms, 1024, None,
                    None, 500.0)


class _Progress:
    """A progress callback that keeps what it was told (gr.Progress's call signature)."""

    def __init__(self):
        self.calls = []

    def __call__(self, progress, desc=None, unit="steps"):
        self.calls.append((progress, unit))


# -- the live sweep, in-process -----------------------------------------------------------------------
def test_sweep_rounds_take_turns_over_contexts_and_models(runtime):
    pair = [adapter_for(runtime.model, "TNL"), adapter_for(runtime.baseline, "Llama")]
    order = [(r, i, row.context) for r, i, row in sweep_rounds(pair, [16, 32], 3, repeats=2, warmup=1)]
    # round 0: A B at each context; round 1: B A (neither model always runs right after the other)
    assert order == [(0, 0, 16), (0, 1, 16), (0, 0, 32), (0, 1, 32), (1, 1, 16), (1, 0, 16), (1, 1, 32), (1, 0, 32)]


def test_one_slow_run_is_dropped_by_the_median_and_shows_in_the_spread():
    """A burst of load during one run (20 ms instead of ~7) must not move the reported value."""
    row = summary_row([_row("TNL", 512, 7.1, 30.0), _row("TNL", 512, 20.4, 95.0), _row("TNL", 512, 6.9, 31.0)])
    assert row["decode ms/token"] == 7.1 and row["TTFT ms"] == 31.0 and row["runs"] == 3
    assert row["decode min–max ms"] == "6.90–20.40" and row["TTFT min–max ms"] == "30.0–95.0"


def test_sweep_streams_a_table_after_every_context_and_counts_progress_in_runs(runtime):
    progress = _Progress()
    updates = list(run_benchmark(runtime, [128, 256], 4, 2, progress=progress))
    assert len(updates) == 2 * 2, "one update per (round, context)"
    tables = [u[-1] for u in updates]
    assert [len(t) for t in tables] == [2, 4, 4, 4], "a context's rows appear as its first round ends"
    assert all(set(u[0]["series"]) == set(updates[0][0]["series"]) for u in updates), "same series throughout"
    final = tables[-1]
    assert list(final["runs"]) == [2, 2, 2, 2] and set(zip(final["model"], final["context"], strict=True)) == {
        (m, c) for m in ("TNL", "Llama") for c in (128, 256)}
    assert all("–" in s for s in final["decode min–max ms"]), "the spread is shown"
    assert "decode peak MiB" not in final.columns, "CUDA-only column hidden on the CPU"
    # progress in units of runs, never fractions of a predicted time, ending at total/total
    assert [p for p, _ in progress.calls] == [(k, 8) for k in range(9)] and {u for _, u in progress.calls} == {"runs"}


def test_the_tabs_status_line_counts_runs_not_seconds(runtime):
    updates = list(latency.run_benchmark_in_tab(runtime, [128, 256], 4, 2))
    statuses = [u[-1] for u in updates]
    assert len(updates) == 2 * 2 * 2 + 1, "a status after every run, and one at the start"
    assert statuses[0].startswith("⏳ 0 of 8 runs") and statuses[-1] == "✅ Done: 8 of 8 runs measured."
    assert [int(s.split(" of ")[0].split()[-1]) for s in statuses[:-1]] == list(range(8))
    frames = [u[:4] for u in updates if not isinstance(u[0], type(gr.skip()))]
    assert len(frames) == 4 and len(frames[-1][3]) == 4, "plots and table after every context of every round"


def test_sweep_rejects_bad_requests_by_name(runtime):
    with pytest.raises(gr.Error, match="contexts: '100'"):
        next(run_benchmark(runtime, ["100"], 4, 1, progress=None))
    with pytest.raises(gr.Error, match="contexts: 8192"):  # above this server's max_context (4096)
        next(run_benchmark(runtime, [8192], 4, 1, progress=None))
    with pytest.raises(gr.Error, match="at least one"):
        next(run_benchmark(runtime, [], 4, 1, progress=None))
    with pytest.raises(gr.Error, match="n_tokens must be between 4 and 64"):
        next(run_benchmark(runtime, [128], 1000, 1, progress=None))
    with pytest.raises(gr.Error, match="repeats must be a whole number"):
        next(run_benchmark(runtime, [128], 4, 1.5, progress=None))


# -- recorded reference results -------------------------------------------------------------------
def test_recorded_results_are_labelled_and_plotted_beside_the_live_run(runtime):
    recorded = load_recorded("cpu")
    meta = json.loads((RESULTS / "decode-cpu.json").read_text())
    assert recorded is not None and recorded.path.name == "decode-cpu.json"
    assert recorded.label == f"recorded ({meta['host']}, {meta['date']})"
    assert meta["date"] in recorded.note() and meta["host"] in recorded.note()
    *plots, table = next(run_benchmark(runtime, [128], 4, 1, progress=None, recorded=recorded))
    series = set(plots[0]["series"])
    assert {"TNL (live)", f"TNL {recorded.label}", f"Llama {recorded.label}"} <= series
    recorded_contexts = {r["context"] for r in meta["rows"]}
    assert set(plots[0]["context"]) >= {latency.context_label(c) for c in recorded_contexts}
    assert list(zip(table["model"], table["context"], strict=True)) == [("TNL", 128), ("Llama", 128)], \
        "the live table holds live rows only"


def test_recorded_results_follow_the_device(tmp_path):
    shutil.copy(RESULTS / "decode-cpu.json", tmp_path / "decode-cpu.json")
    cuda = json.loads((RESULTS / "decode-cpu.json").read_text())
    cuda.update(host="gpu-box", device="NVIDIA H200", date="2026-12-01",
                command="python bench/decode.py --device cuda --out bench/results/decode-h200.json")
    (tmp_path / "decode-h200.json").write_text(json.dumps(cuda))
    (tmp_path / "decode-broken.json").write_text("{")  # a half-written file is skipped, not fatal
    assert load_recorded("cuda", tmp_path).path.name == "decode-h200.json"
    assert load_recorded("cpu", tmp_path).path.name == "decode-cpu.json"
    assert load_recorded("cuda", RESULTS) is None or load_recorded("cuda", RESULTS).on_cuda


def test_plot_axis_is_log2_spaced(runtime):
    """Categories at every power of two between the extremes (equal steps = equal factors), in order."""
    recorded = load_recorded("cpu")
    *plots, _ = next(run_benchmark(runtime, [128], 4, 1, progress=None, recorded=recorded))
    top = max(r["context"] for r in recorded.rows)
    powers = [128 * 2**k for k in range(20) if 128 * 2**k <= top]
    assert set(plots[0]["context"]) == {latency.context_label(c) for c in powers}
    order = latency.plot_contexts(runtime, recorded)
    assert order == sorted(order) and set(powers) <= set(order)


# -- the race, in-process --------------------------------------------------------------------------
def test_race_ends_naming_the_winner_and_finish_reasons(runtime):
    *_, (tnl, llama, counters, summaries) = race(runtime, "Hi there", 0, 6)
    assert [s["finish"] for s in summaries] in ([f, g] for f in ("eos", "length") for g in ("eos", "length"))
    assert counters.count("finished: **") == 2 and counters.count("tok/s") >= 4
    assert "🏁" in counters and ("wins" in counters or "Tie" in counters)


def test_race_sides_are_each_models_greedy_reply(runtime):
    """TNL's side is a chat reply through the engine, Llama's its own greedy decode with a KV cache."""
    *_, (tnl, llama, _, summaries) = race(runtime, "Hi there", 128, 10)
    ids = race_ids(runtime, "Hi there", 128, 10)[0]
    engine = Engine(runtime.model, runtime.tokenizer, EngineConfig(max_sessions=1, threaded=False))
    assert tnl == engine.open().feed_ids(ids, SamplingParams(temperature=0, max_new_tokens=10)).wait().text
    with torch.inference_mode():
        out = runtime.baseline.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                                        eos_token_id=runtime.tokenizer.eos_id, pad_token_id=0)
    new = out[0, len(ids):].tolist()
    assert summaries[1]["tokens"] == len(new)
    assert llama == runtime.tokenizer.decode([t for t in new if t != runtime.tokenizer.eos_id])


def test_stop_marks_unfinished_sides_stopped_and_names_the_winner(runtime):
    stops = RaceStops()
    with stops.running("me") as flag:
        gen = race(runtime, "Tell me a long story", 0, 200, stop=flag)
        updates = [next(gen) for _ in range(5)]
        assert "🏁" not in updates[-1][2], "no winner while running"
        stops.stop("someone else")  # another session's Stop leaves this race alone
        assert not flag.is_set()
        stops.stop("me")
        *_, (_, _, final, summaries) = gen
    assert [s["finish"] for s in summaries] == ["stopped", "stopped"] and all(s["tokens"] < 200 for s in summaries)
    assert "stopped" in final and "🏁" in final and "tok/s" in final


def test_stop_sent_before_the_race_starts_ends_it_at_once(runtime):
    stops = RaceStops()
    stops.arm("me")  # Start clicked: the race waits in the queue
    stops.stop("me")
    with stops.running("me") as flag:
        *_, (_, _, _, summaries) = race(runtime, "Tell me a long story", 0, 200, stop=flag)
    assert [(s["finish"], s["tokens"]) for s in summaries] == [("stopped", 0), ("stopped", 0)]
    with stops.running("me") as flag:
        assert not flag.is_set(), "the next race starts with a fresh flag"
        stops.arm("me")  # Start's arm arriving after its race began keeps the flag that race holds
        stops.stop("me")
        assert flag.is_set()


def test_race_time_limit_stops_both_sides(runtime):
    *_, (_, _, counters, summaries) = race(runtime, "Tell me a long story", 0, 200, time_limit_s=0.0)
    assert [s["finish"] for s in summaries] == ["time limit", "time limit"] and "🏁" in counters


def test_race_counts_tokens_not_characters(runtime):
    """4,200 emoji are 4,200 characters (under the limit) but ~16,800 tokens: refused before any model work."""
    with pytest.raises(gr.Error, match=r"Too long: 0 filler \+ 16,8\d\d prompt"):
        next(race(runtime, "🙂" * 4200, 0, 8))
    with pytest.raises(gr.Error, match="above this server's limit of 4,096"):
        next(race(runtime, "hello", 4096, 8))
    with pytest.raises(gr.Error, match="characters"):
        next(race(runtime, "x" * (MAX_MESSAGE_CHARS + 1), 0, 8))


@pytest.mark.parametrize(("filler", "new", "match"), [
    (-128, 8, "context_tokens must be between 0"), (128.5, 8, "context_tokens must be a whole number"),
    (0, 0, "max_new_tokens must be between 1 and 256"), (0, 1000, "max_new_tokens must be between"),
    (0, "many", "max_new_tokens must be a number"), (0, True, "max_new_tokens must be a number"),
    (0, float("nan"), "max_new_tokens must be a number")])
def test_race_rejects_bad_numbers_by_name(runtime, filler, new, match):
    with pytest.raises(gr.Error, match=match):
        next(race(runtime, "hello", filler, new))
    with pytest.raises(gr.Error, match="Type a message"):
        next(race(runtime, "   ", 0, 8))


# -- over HTTP --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(runtime):
    from tnllm.webui import launch as app

    demo = app.build_demo(runtime)
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, **app.launch_kwargs("127.0.0.1", None))
    yield url, demo
    demo.close()
    demo.sessions.close()  # the module's runtime outlives this server: free its state slots


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server[0], verbose=False)


def test_http_api_documents_each_endpoint(client):
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    for name in ("/latency", "/race"):
        assert not api[name]["description"].startswith("partial("), "its own description"
        assert all(not r["label"].startswith("value_") for r in api[name]["returns"]), "named outputs"
        assert all(not p["component"].startswith("_") for p in api[name]["parameters"]), "public component names"
    assert "winner" in api["/race"]["description"] and "time limit" in api["/race"]["description"]
    assert api["/latency"]["parameters"][0]["python_type"]["type"] == "list[int]"
    assert set(api) == {"/chat", "/latency", "/race"}, "the tab's own button and Stop stay private"


@pytest.mark.parametrize("contexts", [[128], ["128"]], ids=["ints", "strings"])
def test_http_latency_accepts_ints_and_their_strings(client, contexts):
    *_, table = client.predict(contexts, 4, 1, api_name="/latency")
    assert [(r[0], r[1]) for r in table["data"]] == [("TNL", 128), ("Llama", 128)]


def test_http_latency_streams_partial_tables(client):
    job = client.submit([128, 256], 4, 1, api_name="/latency")
    job.result()
    sizes = [len(out[-1]["data"]) for out in job.outputs()]
    assert sizes == [2, 4], f"a table after every context: {sizes}"


def test_http_errors_name_the_parameter(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="contexts: '100'"):
        client.predict(["100"], 4, 1, api_name="/latency")
    with pytest.raises(AppError, match="context_tokens must be between 0"):
        client.predict("hello", -128, 8, api_name="/race")
    with pytest.raises(AppError, match="Too long"):
        client.predict("🙂" * 4200, 0, 8, api_name="/race")


def test_the_tab_explains_memory_and_hides_the_cuda_column(server):
    _, demo = server
    frames = [b for b in demo.blocks.values() if isinstance(b, gr.Dataframe)]
    live = [f for f in frames if f.label and f.label.startswith("Measurements")]
    assert len(live) == 1 and "decode peak MiB" not in live[0].value["headers"]
    assert "memory MiB" in live[0].value["headers"]
    notes = " ".join(b.value for b in demo.blocks.values() if isinstance(b, gr.Markdown) and b.value)
    assert "**memory MiB**" in notes and "RSS" in notes
    recorded = load_recorded("cpu")
    assert any(f.label == f"Reference: {recorded.label}" for f in frames), "recorded table beside the live one"


def test_errors_quote_at_most_a_short_piece_of_a_bad_value(runtime):
    with pytest.raises(gr.Error) as err:
        next(race(runtime, "hi", "9" * 2_000_000 + "x", 8))
    assert len(err.value.message) < 200
    with pytest.raises(gr.Error) as err:
        latency.check_contexts(runtime, ["1" * 2_000_000])
    assert len(err.value.message) < 300
