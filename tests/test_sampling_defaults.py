"""bench/sampling_defaults.py: its metrics on known cases, a --quick run's JSON, and the chat defaults it chose."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from tnllm.engine import BatchSampler
from tnllm.sampling import SamplingParams, penalise_seen
from tnllm.webui.validation import CHAT_DEFAULTS, RANGES

SETTING_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty")
METRIC_KEYS = ("rep3", "rep4", "distinct2", "length", "eos", "gen_ll", "ref_nll")


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sd = _module("sampling_defaults")


def test_repeated_ngram_rate_and_distinct_on_known_tokens():
    loop = [1, 2, 3] * 3  # 3-grams: 7, of which 3 distinct; 4-grams: 6, of which 3 distinct
    assert sd.repeated_ngram_rate(loop, 3) == pytest.approx(4 / 7)
    assert sd.repeated_ngram_rate(loop, 4) == pytest.approx(0.5)
    assert sd.repeated_ngram_rate([5, 6, 7, 8], 3) == 0.0
    assert sd.repeated_ngram_rate([5, 6], 3) == 0.0, "a reply shorter than n has nothing to repeat"
    assert sd.distinct_n([[1, 2, 3], [1, 2, 4]], 2) == pytest.approx(3 / 4)
    assert sd.distinct_n([[1]], 2) == 0.0


def test_seen_mask_grows_with_the_teacher_forced_reply():
    seen = sd.seen_mask([1, 2], [3, 4, 3], vocab=6)
    assert [set(torch.nonzero(row)[:, 0].tolist()) for row in seen] == [{1, 2}, {1, 2, 3}, {1, 2, 3, 4}]


@pytest.mark.parametrize("setting", [
    {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0},
    {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.2},
    {"temperature": 0.5, "top_p": 0.5, "top_k": 5, "repetition_penalty": 1.3},
    {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.3},
])
def test_sampling_logprobs_is_the_distribution_the_engine_draws_from(setting):
    vocab = 64
    logits = torch.randn(vocab) * 3
    seen_ids = torch.tensor([3, 7, 7, 20])
    seen = torch.zeros(vocab, vocab, dtype=torch.bool)
    seen[:, seen_ids] = True
    logp = sd.sampling_logprobs(logits.expand(vocab, vocab), seen, torch.arange(vocab), setting)
    support = logp > torch.tensor(sd.FLOOR).log() + 1e-4
    assert logp[support].exp().sum().item() == pytest.approx(1.0, abs=1e-5)
    params, draws = SamplingParams(**setting), 200
    sampler = BatchSampler(draws + 1, vocab, "cpu")  # slot s draws with seed s; the prompt's ids are the seen ones
    for slot in range(1, draws + 1):
        sampler.configure(slot, params, seed=slot, prompt_ids=seen_ids.tolist())
    slots = list(range(1, draws + 1))
    picks = set(sampler.sample(logits.expand(draws, vocab).clone(), torch.tensor(slots), sampler.plan(slots)).tolist())
    assert picks <= set(torch.nonzero(support)[:, 0].tolist())
    if setting["top_k"] == 0 and setting["top_p"] == 1.0 and setting["temperature"] == 1.0:
        penalty = torch.tensor([setting["repetition_penalty"]])
        expected = torch.log_softmax(penalise_seen(logits[None], seen[:1], penalty)[0], -1)
        assert torch.allclose(logp, expected.clamp_min(torch.tensor(sd.FLOOR).log()), atol=1e-6)


def test_choose_follows_the_rule():
    human = {"rep3": 0.0, "eos": 1.0}
    row = {"rep3": 0.0, "eos": 1.0, "ref_nll": 5.0, "gen_ll": -2.0}
    rows = [{**row, "rep3": 0.2, "gen_ll": -1.0},      # loops
            {**row, "eos": 0.5, "gen_ll": -1.0},       # rambles past the token limit
            {**row, "ref_nll": 6.0, "gen_ll": -1.0},   # fits the references > 5% worse than the best
            {**row, "gen_ll": -2.5}, row]
    assert sd.choose(rows, human) == 4
    with pytest.raises(ValueError):
        sd.choose(rows[:2], human)


def test_held_out_prompts_take_every_dialogue_first():
    exchanges = sd.held_out_prompts(20)
    firsts = [(turns[0]["text"], turns[1]["text"]) for turns in sd.read_dialogues(sd.VAL_SLICE)]
    assert exchanges == firsts
    with pytest.raises(ValueError, match="exchanges"):
        sd.held_out_prompts(10_000)


def test_quick_run_writes_the_grid_rows_and_a_choice(tmp_path):
    out = tmp_path / "sampling.json"
    # 2 prompts and 32 tokens: a seeded quick grid in which the rule finds a setting (with 24 tokens none passes)
    subprocess.run([sys.executable, str(ROOT / "bench" / "sampling_defaults.py"), "--quick", "--prompts", "2",
                    "--new-tokens", "32", "--out", str(out)], check=True, capture_output=True, timeout=120)
    result = json.loads(out.read_text())
    assert result["command"].startswith("python bench/sampling_defaults.py --quick")
    assert result["prompts"] == 2 and result["new_tokens"] == 32 and result["machine"]["torch_threads"] == 1
    settings = sd.grid_settings(sd.QUICK_GRID)
    assert [{k: row[k] for k in SETTING_KEYS} for row in result["rows"]] == settings
    for row in result["rows"]:
        assert set(METRIC_KEYS) <= set(row)
        assert 0 <= row["rep3"] <= 1 and 0 <= row["eos"] <= 1 and 0 < row["length"] <= 32
        assert row["gen_ll"] <= 0 and row["ref_nll"] > 0
    assert result["chosen"] == {k: result["rows"][result["chosen_row"]][k] for k in SETTING_KEYS}
    assert result["rule"] == sd.RULE and len(result["examples"]) == 2
    assert "| references |" in _module("report").render_sampling(result)


def test_chat_defaults_are_the_measured_choice():
    """CHAT_DEFAULTS (the Sampling panel's starting values) cannot drift from the committed measurement."""
    result = json.loads((ROOT / "bench/results/sampling-cpu.json").read_text())
    assert {k: CHAT_DEFAULTS[k] for k in SETTING_KEYS} == result["chosen"]
    assert result["chosen"] == {k: result["rows"][result["chosen_row"]][k] for k in SETTING_KEYS}
    assert sd.choose(result["rows"], result["human"]) == result["chosen_row"] and result["rule"] == sd.RULE
    for name, value in result["chosen"].items():
        low, high = RANGES[name]
        assert low <= value <= high, name
