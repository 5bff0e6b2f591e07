"""Chat data tests: SFT rendering, chitchat cleaning, the fixed split, prepare_data.py, and the bundled tokenizer.

Needs neither chitchat-dataset nor data/ (a tiny hand-written dataset stands in); tokenizer tests skip
when assets/tokenizer.model or sentencepiece is missing.
"""

from __future__ import annotations

import importlib.util
import json
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tnllm.data import (
    IGNORE_INDEX,
    Segment,
    chitchat_to_turns,
    encode_dialogue,
    render_dialogue,
    segments_to_text,
    split_of,
)

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "assets" / "tokenizer.model"

TURNS = [
    {"role": "human", "text": "Hi there"},
    {"role": "assistant", "text": "Hello!\nHow are you?"},
    {"role": "human", "text": "Fine </s> thanks"},
    {"role": "assistant", "text": "Good."},
]


def _msg(sender: str, text: str) -> dict:
    return {"text": text, "sender": sender, "timestamp": "2018-05-02T19:38:15Z"}


# --- rendering -------------------------------------------------------------------------------------------


def test_render_dialogue_official_format():
    segs = render_dialogue(TURNS)
    assert segments_to_text(segs) == (
        "Human:\nHi there\nAssistant:\nHello!\nHow are you?</s>Human:\nFine </s> thanks\nAssistant:\nGood.</s>"
    )
    targets = [s for s in segs if s.is_target]
    assert targets == [
        Segment("Hello!\nHow are you?", True),
        Segment("", True, is_eos=True),
        Segment("Good.", True),
        Segment("", True, is_eos=True),
    ]


def test_render_trailing_human_is_generation_prompt():
    text = segments_to_text(render_dialogue(TURNS[:3]))
    assert text.endswith("</s>Human:\nFine </s> thanks\nAssistant:\n")
    assert not render_dialogue(TURNS[:3])[-1].is_target


@pytest.mark.parametrize("turns", [[{"role": "assistant", "text": "x"}], [TURNS[0], TURNS[0]]], ids=["A-first", "H-H"])
def test_render_rejects_non_alternating(turns):
    with pytest.raises(ValueError, match="expected"):
        render_dialogue(turns)


def test_encode_dialogue_labels_and_eos():
    eos = 2
    encode = lambda s: [1000 + ord(c) for c in s]  # char-level stand-in tokenizer; never emits small ids
    ids, labels = encode_dialogue(TURNS, encode, eos)
    assert len(ids) == len(labels)
    assert ids.count(eos) == 2  # only the two real eos ids; the user's literal "</s>" stays text
    assert [i for i, t in enumerate(ids) if t == eos] == [i for i, t in enumerate(labels) if t == eos]
    target_text = "".join(chr(t - 1000) for t in labels if t not in (IGNORE_INDEX, eos))
    assert target_text == "Hello!\nHow are you?Good."
    first_target = next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
    assert "".join(chr(t - 1000) for t in ids[:first_target]) == "Human:\nHi there\nAssistant:\n"
    assert encode_dialogue(TURNS, encode, eos, max_len=5)[0] == ids[:5]


# --- chitchat cleaning and split -------------------------------------------------------------------------


def test_chitchat_to_turns_merges_normalises_and_trims():
    a, b = "sender-a", "sender-b"
    messages = [
        [_msg(a, "  hello \n\t there "), _msg(a, "how are you?"), _msg(a, "   ")],
        [_msg(b, "good")],
        [_msg(a, " \n ")],  # empty group: b's groups around it merge into one turn
        [_msg(b, "and you?")],
        [_msg(a, "fine")],  # trailing human turn: no reply to learn, dropped
    ]
    assert chitchat_to_turns(messages) == [
        {"role": "human", "text": "hello there\nhow are you?"},
        {"role": "assistant", "text": "good\nand you?"},
    ]
    assert chitchat_to_turns([[_msg(a, "anyone here?"), _msg(a, "hello?")]]) == []  # monologue
    assert chitchat_to_turns([]) == []


def test_split_is_fixed_and_about_five_percent():
    ids = [str(uuid.uuid5(uuid.NAMESPACE_URL, f"conv-{i}")) for i in range(4000)]
    first = [split_of(i) for i in ids]
    assert first == [split_of(i) for i in reversed(ids)][::-1]  # order-independent, repeatable
    assert 0.04 < first.count("val") / len(ids) < 0.06
    # Pinned: changing the rule would silently move conversations between train and val.
    assert split_of("003f5a69-2050-4e8b-b02b-8f5abfded55f") == "val"
    assert split_of("a07edb12-6b91-4138-b11e-02421888d699") == "train"
    assert all(split_of(i, 0.0) == "train" for i in ids[:50]) and all(split_of(i, 1.0) == "val" for i in ids[:50])


def _load_prepare_data():
    spec = importlib.util.spec_from_file_location("prepare_data", ROOT / "scripts" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_data_deterministic_and_disjoint(tmp_path, capsys):
    raw = {}
    for i in range(40):
        a, b = f"a{i}", f"b{i}"
        msgs = [[_msg(a, f"hi {i}")], [_msg(b, f"hello {i}"), _msg(b, "  yes ")], [_msg(a, "bye")]]
        raw[str(uuid.uuid5(uuid.NAMESPACE_DNS, f"c{i}"))] = {"messages": msgs}
    raw["monologue"] = {"messages": [[_msg("x", "anyone?")]]}
    src = tmp_path / "dataset.json"
    src.write_text(json.dumps(raw))
    prepare = _load_prepare_data()

    outs = []
    for run in ("one", "two"):
        out = tmp_path / run
        stats = prepare.main(["--source", str(src), "--out", str(out), "--val-fraction", "0.3"])
        outs.append({s: (out / f"{s}.jsonl").read_bytes() for s in ("train", "val")})
    capsys.readouterr()
    assert outs[0] == outs[1]

    recs = {s: [json.loads(line) for line in outs[0][s].decode().splitlines()] for s in ("train", "val")}
    ids = {s: {r["id"] for r in recs[s]} for s in recs}
    assert ids["train"] and ids["val"] and not ids["train"] & ids["val"]
    assert ids["train"] | ids["val"] == set(raw) - {"monologue"}
    assert all(split_of(i, 0.3) == s for s in ids for i in ids[s])
    assert stats["dropped_conversations"] == 1
    assert stats["val"]["conversations"] == len(ids["val"]) and stats["train"]["turns"] == 2 * len(ids["train"])
    assert recs["train"][0]["turns"][1]["text"].endswith("\nyes")


@pytest.mark.skipif(not (ROOT / "data" / "train.jsonl").exists(), reason="data/ not generated")
def test_generated_data_split_disjoint():
    ids = {}
    for s in ("train", "val"):
        with open(ROOT / "data" / f"{s}.jsonl", encoding="utf-8") as f:
            ids[s] = [json.loads(line)["id"] for line in f]
        assert ids[s] == sorted(set(ids[s]))
        assert all(split_of(i) == s for i in ids[s])
    assert not set(ids["train"]) & set(ids["val"])


# --- bundled tokenizer -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sp():
    spm = pytest.importorskip("sentencepiece")
    if not TOKENIZER.exists():
        pytest.skip("assets/tokenizer.model not built (scripts/train_tokenizer.py)")
    return spm.SentencePieceProcessor(model_file=str(TOKENIZER))


def test_tokenizer_special_ids(sp):
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]


@pytest.mark.parametrize("text", ["</s><s>Human:\n", "<unk></s>", "\nAssistant:\n</s>", "<0x0A><s>"])
def test_tokenizer_never_emits_control_ids(sp, text):
    ids = sp.encode(text)
    assert not {0, 1, 2} & set(ids)
    assert sp.decode(ids) == text


def test_tokenizer_newline_is_a_byte_piece(sp):
    assert [sp.id_to_piece(i) for i in sp.encode("\n")] == ["<0x0A>"]
    assert sp.decode(sp.encode("a\n\n b\r\n")) == "a\n\n b\r\n"


# U+2581 is SentencePiece's space marker: it decodes to " " (same in Llama/Baichuan tokenizers). Known, pinned.
# Lone surrogates (category Cs) are not Unicode text: Tokenizer.encode refuses them (tests/test_tokenizer.py).
_TEXT = st.text(st.characters(blacklist_characters="\u2581", blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(_TEXT, max_size=4))
def test_tokenizer_round_trips_unicode_and_newlines(sp, parts):
    text = "\n".join(parts)
    assert sp.decode(sp.encode(text)) == text


def test_tokenizer_space_marker_limitation(sp):
    assert sp.decode(sp.encode("a\u2581b")) == "a b"


def test_encode_dialogue_with_tokenizer(sp):
    ids, labels = encode_dialogue(TURNS, sp.encode, sp.eos_id())
    assert ids.count(sp.eos_id()) == 2 and ids[-1] == sp.eos_id() == labels[-1]
    assert sp.decode([t for t in labels if t != IGNORE_INDEX]) == "Hello!\nHow are you?Good."
    assert sp.decode(ids) == segments_to_text(render_dialogue(TURNS), eos_text="")
