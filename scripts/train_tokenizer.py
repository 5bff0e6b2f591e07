"""Train the bundled SentencePiece tokenizer on data/train.jsonl; choose its size by measurement.

Layout matches the official Baichuan/TransNormerLLM tokenizer (docs/model.md#tokenizer-and-chat-format):
<unk>=0, <s>=1, </s>=2, no pad piece, byte fallback, split digits, no dummy prefix, whitespace kept as is.
Also: identity normalisation (so decode(encode(x)) == x for any valid Unicode) and no user-defined symbols:
control pieces are never produced from text, so user text "</s>" cannot become the eos id. "\\n" is not a
piece (training sentences are lines) and always encodes as the byte piece <0x0A>.

The script trains every (model type, vocab size) of the sweep on the TRAIN split, measures tokens per
character on the VALIDATION split (dialogues rendered with ``tnllm.data.encode_dialogue``, eos included),
writes the table to assets/tokenizer_report.md, and copies the chosen model to assets/tokenizer.model.
The chosen model is trained twice and must come out byte-identical.

Usage: python scripts/prepare_data.py && python scripts/train_tokenizer.py [--model-type bpe --vocab-size 8000]
"""

from __future__ import annotations

import argparse
import io
import json
import time
from collections import Counter
from pathlib import Path

import sentencepiece as spm

from tnllm.data import ASSISTANT, encode_dialogue, render_dialogue, segments_to_text

ROOT = Path(__file__).resolve().parents[1]

SEED = 0
WIDTH = 512  # model width used to price the embedding table
RARE = 10  # a piece seen fewer times than this in the train split is counted as rare (under-trained row)
RULE = (
    "Rule: BPE unless unigram is clearly better (it is not: within 1 % at every size, ~10x slower to train, and its "
    "pieces change with the thread count); then the smallest size beyond which a doubling saves < 5 % of the "
    "validation tokens while adding thousands of rare pieces. Embedding rows cost width x vocab parameters "
    "that a small model trained on ~3.4 M tokens cannot fill."
)


def load_jsonl(path: Path) -> list[dict]:
    """Records of a split file written by prepare_data.py."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def training_sentences(records: list[dict]):
    """One sentence per line of the rendered dialogues: the role marker, then each line of the turn text."""
    for rec in records:
        for turn in rec["turns"]:
            yield "Assistant:" if turn["role"] == ASSISTANT else "Human:"
            yield from turn["text"].split("\n")


def train(records: list[dict], model_type: str, vocab_size: int, threads: int) -> tuple[bytes, float]:
    """Train one model; returns (serialized model, training seconds).

    Written through ``model_writer`` so no file path ends up in the model's trainer spec. The spec does record
    ``num_threads``: BPE pieces are identical for any thread count, unigram pieces are not.
    """
    spm.set_random_generator_seed(SEED)
    t0 = time.perf_counter()
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=training_sentences(records),
        model_writer=writer,
        model_type=model_type,
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        input_sentence_size=0,  # all ~355k lines: small enough, and no sampling keeps it deterministic
        num_threads=threads,
        minloglevel=2,
    )
    return writer.getvalue(), time.perf_counter() - t0


def measure(model: bytes, train_recs: list[dict], val_recs: list[dict]) -> dict:
    """Tokens/char on val, train token count and rare learned-piece count for one model."""
    sp = spm.SentencePieceProcessor(model_proto=model)
    eos = sp.eos_id()

    def count(recs: list[dict]) -> tuple[int, int, Counter]:
        n_tok = n_chr = 0
        freq: Counter = Counter()
        for rec in recs:
            ids, _ = encode_dialogue(rec["turns"], sp.encode, eos)
            n_tok += len(ids)
            n_chr += len(segments_to_text(render_dialogue(rec["turns"]), eos_text=""))
            freq.update(ids)
        return n_tok, n_chr, freq

    val_tok, val_chr, _ = count(val_recs)
    train_tok, _, freq = count(train_recs)
    vocab = sp.get_piece_size()
    return {
        "vocab": vocab,
        "val_tokens_per_char": val_tok / val_chr,
        "val_tokens": val_tok,
        "train_tokens": train_tok,
        "rare_pieces": sum(
            1 for i in range(vocab) if freq[i] < RARE and sp.is_unknown(i) + sp.is_control(i) + sp.is_byte(i) == 0
        ),
        "embed_params": vocab * WIDTH,
    }


def write_report(path: Path, rows: list[dict], chosen: tuple[str, int], deterministic: bool, data_dir: Path) -> None:
    """Markdown table of the sweep plus the choice."""
    stats = json.loads((data_dir / "stats.json").read_text()) if (data_dir / "stats.json").exists() else {}
    lines = [
        "# Tokenizer measurements",
        "",
        "Generated by `scripts/train_tokenizer.py` (SentencePiece "
        f"{spm.__version__}, seed {SEED}). Trained on the train split, measured on the validation split "
        f"({stats.get('val', {}).get('conversations', '?')} conversations) rendered in the SFT format with eos.",
        f"Embedding cost at width {WIDTH} (tied input/output embedding, docs/model.md#embedding-scale-and-tied-head; "
        "untied doubles it).",
        f"Rare pieces: learned pieces (not bytes/controls) seen < {RARE} times in the encoded train split "
        "(under-trained embedding rows).",
        "",
        "| type | vocab | val tokens/char | val chars/token | saving vs previous size | train tokens | rare pieces "
        "| embed params | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    prev: dict[str, float] = {}
    for r in rows:
        mark = " **(chosen)**" if (r["type"], r["vocab"]) == chosen else ""
        tpc = r["val_tokens_per_char"]
        saving = f"{100 * (1 - tpc / prev[r['type']]):.1f} %" if r["type"] in prev else "–"
        prev[r["type"]] = tpc
        lines.append(
            f"| {r['type']}{mark} | {r['vocab']} | {tpc:.4f} | {1 / tpc:.2f} | {saving} | {r['train_tokens']:,} "
            f"| {r['rare_pieces']:,} | {r['embed_params'] / 1e6:.2f} M | {r['seconds']:.1f} |"
        )
    lines += [
        "",
        RULE,
        "",
        f"Chosen: `{chosen[0]}` with vocab {chosen[1]}. Retrained with the same seed: "
        f"{'byte-identical' if deterministic else 'NOT byte-identical'} model file.",
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT / "data")
    ap.add_argument("--out", type=Path, default=ROOT / "assets")
    ap.add_argument("--sweep-sizes", default="2048,4096,8192,16384", help="comma list; empty = no sweep")
    ap.add_argument("--sweep-types", default="bpe,unigram")
    ap.add_argument("--model-type", default="bpe", help="chosen type (see assets/tokenizer_report.md)")
    ap.add_argument("--vocab-size", type=int, default=8192, help="chosen size (see assets/tokenizer_report.md)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    train_recs, val_recs = load_jsonl(args.data / "train.jsonl"), load_jsonl(args.data / "val.jsonl")
    chosen = (args.model_type, args.vocab_size)
    configs = [(t, int(v)) for t in args.sweep_types.split(",") for v in args.sweep_sizes.split(",") if v]
    if chosen not in configs:
        configs.append(chosen)
    args.out.mkdir(parents=True, exist_ok=True)
    rows, models = [], {}
    for model_type, vocab in configs:
        models[model_type, vocab], seconds = train(train_recs, model_type, vocab, args.threads)
        row = {"type": model_type, "seconds": seconds, **measure(models[model_type, vocab], train_recs, val_recs)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    deterministic = models[chosen] == train(train_recs, *chosen, args.threads)[0]
    (args.out / "tokenizer.model").write_bytes(models[chosen])
    write_report(args.out / "tokenizer_report.md", rows, chosen, deterministic, args.data)
    print(f"wrote {args.out / 'tokenizer.model'} ({chosen[0]}, {chosen[1]}); deterministic={deterministic}")


if __name__ == "__main__":
    main()
