"""Server-side checks of a chat request, run before any model work
(docs/reliability.md#input-validation).

Browsers respect the sliders and the textbox; API callers do not, so every value is checked here, once, by
`check_request`, which both the Gradio `validator=` hook (runs before the event is queued: a rejected
request answers HTTP 422 and never takes a queue slot) and the chat handler itself (defence in depth)
call. Each problem gives one readable sentence naming the value and its limit.

Text policy (decided: clean, don't reject): lone surrogates (JSON can carry "\\ud800") become U+FFFD,
text is NFC-normalised, "\\r\\n"/"\\r" become "\\n", C0/C1 control characters other than "\\n" and "\\t" and
the bidi override/isolate controls (U+202A-202E, U+2066-2069, "Trojan source") are dropped. A message
that is empty after that, or only whitespace and invisible format characters (zero-width space, BOM...),
is rejected. Text spelling special tokens or chat markers ("</s>", "Human:") stays plain text:
`Tokenizer.encode` never yields a control id and the chat format inserts eos as an id.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass

from tnllm.sampling import MAX_NEW_TOKENS_LIMIT, SamplingParams

MAX_MESSAGE_CHARS = 8000     # rejected before normalising or tokenising (a 1 MB body costs ~nothing)
MAX_INPUT_TOKENS = 4096      # one message, after tokenising (capped at half the context)
MAX_REPLY_SECONDS = 120.0    # one reply's wall clock, prefill included: a concurrency slot is never held longer
# Chat replies streamed at once (Gradio's concurrency_limit): the limit with the highest aggregate tokens/s in
# bench/soak.py's concurrency sweep (bench/results/soak-cpu.json: 8 clients on 2 cores; the engine batches the
# replies that stream together, so 4 beat 2 by 1.5x there).
CHAT_CONCURRENCY = 4
SHOWN_CHARS = 40             # a refused value is quoted in its error message up to this many characters
# The server accepts any reply length SamplingParams does (1 to MAX_NEW_TOKENS_LIMIT, bounded further by the context
# budget and the reply time). The Max new tokens slider stops at an eighth of that: chat replies are a few dozen to
# a few hundred tokens, and a slider reaching the limit would leave those lengths a few pixels wide. API callers
# may ask for up to the limit.
MAX_NEW_TOKENS_SLIDER = MAX_NEW_TOKENS_LIMIT // 8

# Server-side ranges = the UI controls' ranges (webui/chat_tab.py builds its sliders from these), except that
# the Max new tokens slider stops at MAX_NEW_TOKENS_SLIDER.
RANGES = {
    "temperature": (0.0, 2.0),
    "top_p": (0.05, 1.0),
    "top_k": (0, 200),
    "repetition_penalty": (1.0, 2.0),
    "max_new_tokens": (1, MAX_NEW_TOKENS_LIMIT),
}
# The Sampling panel's starting values: chosen on held-out prompts by bench/sampling_defaults.py (repetition,
# end-of-reply rate, fit to human replies; table in BENCHMARKS.md). tests/test_sampling_defaults.py keeps them equal.
CHAT_DEFAULTS = {"temperature": 0.7, "top_p": 1.0, "top_k": 40, "repetition_penalty": 1.1, "max_new_tokens": 128}
INTEGER = {"top_k", "max_new_tokens"}
FIELDS = ("message", "temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens", "seed")
_DROP = {c for c in range(0x20) if chr(c) not in "\n\t"} | {0x7F} | set(range(0x80, 0xA0)) \
    | set(range(0x202A, 0x202F)) | set(range(0x2066, 0x206A))
_DROP_TABLE = dict.fromkeys(_DROP)
_SURROGATE = re.compile("[\ud800-\udfff]")


class InputError(ValueError):
    """A request rejected before any model work; the message is meant for the user. `fields`: the input
    name -> its problem (the validator shows each next to its control)."""

    def __init__(self, message: str, fields: dict[str, str] | None = None):
        super().__init__(message)
        self.fields = fields or {"message": message}


# Context tokens a conversation may hold before the server refuses a turn (`--max-context` overrides), per
# device: the recurrent state does not grow, so the limit is about the time to read a prompt, which a GPU does
# far faster.
DEFAULT_MAX_CONTEXT = {"cuda": 131072, "cpu": 16384}


def default_max_context(device_type: str) -> int:
    """The context limit of a server on a device of this type ("cuda", "cpu", ...; others take the CPU's)."""
    return DEFAULT_MAX_CONTEXT.get(device_type, DEFAULT_MAX_CONTEXT["cpu"])


@dataclass(frozen=True)
class Limits:
    """What one chat turn may use: message size, context, and the reply's wall-clock time (prefill included;
    the reply then ends as if Stop was clicked, with finish reason "time_limit")."""

    max_chars: int = MAX_MESSAGE_CHARS
    max_input_tokens: int = MAX_INPUT_TOKENS
    max_context: int = DEFAULT_MAX_CONTEXT["cpu"]
    max_reply_s: float = MAX_REPLY_SECONDS

    @classmethod
    def for_context(cls, max_context: int, max_reply_s: float = MAX_REPLY_SECONDS) -> "Limits":
        if not max_reply_s > 0:
            raise ValueError(f"max_reply_s must be > 0, got {max_reply_s}")
        return cls(max_input_tokens=min(MAX_INPUT_TOKENS, max_context // 2), max_context=max_context,
                   max_reply_s=max_reply_s)


@dataclass(frozen=True)
class ChatRequest:
    """A checked request: cleaned text, its token count, the prompt size with history, sampling params."""

    text: str
    message_tokens: int
    context_tokens: int
    params: SamplingParams


def clean_text(text: str) -> str:
    """The text policy of the module docstring (no length check: callers bound the length first)."""
    text = _SURROGATE.sub("\ufffd", text) if _has_surrogate(text) else text
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    return text.translate(_DROP_TABLE)


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def is_blank(text: str) -> bool:
    """Only whitespace and invisible format characters (Cf: zero-width space/joiners, BOM, ...)."""
    return all(ch.isspace() or unicodedata.category(ch) == "Cf" for ch in text)


def check_text(text, limits: Limits) -> str:
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise InputError(f"The message must be text, got {type(text).__name__}.")
    if len(text) > limits.max_chars:
        raise InputError(f"Message too long: {len(text):,} characters (limit {limits.max_chars:,}).")
    text = clean_text(text)
    if is_blank(text):
        raise InputError("Type a message first (an empty or whitespace-only message has nothing to answer).")
    return text


def shown(value, limit: int = SHOWN_CHARS) -> str:
    """`repr(value)` for an error message, cut to `limit` characters: a message never echoes unbounded input
    (a 2 MB value would otherwise come back in a 2 MB answer)."""
    text = repr(value) if not isinstance(value, str) or len(value) <= limit else repr(value[:limit])
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _number(name: str, value, errors: dict[str, str]):
    low, high = RANGES[name]
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            errors[name] = f"{name} must be a number, got {shown(value)}."
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        errors[name] = f"{name} must be a finite number, got {shown(value)}."
        return None
    if name in INTEGER:
        if value != int(value):
            errors[name] = f"{name} must be a whole number, got {shown(value)}."
            return None
        value = int(value)
    if not low <= value <= high:
        errors[name] = f"{name} must be between {low} and {high}, got {shown(value)}."
        return None
    return value


def parse_seed(seed, errors: dict[str, str]) -> int | None:
    """None, "" or a negative integer -> random; a whole number -> that seed; anything else an error."""
    if seed is None or (isinstance(seed, str) and not seed.strip()):
        return None
    value = seed
    if isinstance(seed, str):
        try:
            value = float(seed.strip())
        except ValueError:
            value = None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value) or abs(value) >= 2**63:
        errors["seed"] = f"seed must be a whole number (-1 = random), got {shown(seed)}."
        return None
    return None if value < 0 else int(value)


def check_sampling(temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed) -> SamplingParams:
    """SamplingParams from raw control values; InputError listing every bad value."""
    errors: dict[str, str] = {}
    values = {name: _number(name, value, errors) for name, value in (
        ("temperature", temperature), ("top_p", top_p), ("top_k", top_k),
        ("repetition_penalty", repetition_penalty), ("max_new_tokens", max_new_tokens))}
    values["seed"] = parse_seed(seed, errors)
    if errors:
        raise InputError(" ".join(errors.values()), errors)
    return SamplingParams(**values)


STATS_ID = "tnllm-reply-stats"  # metadata id of the per-reply stats messages (webui.chat.stats_message)


def is_stats_message(message) -> bool:
    """True for the app's own per-reply stats message, which is display only, never conversation text."""
    return isinstance(message, dict) and (message.get("metadata") or {}).get("id") == STATS_ID


def message_text(content) -> str:
    """Text of a message's content: a string, or (Gradio 6) a list of {"type": "text", "text": ...} parts;
    also of a whole message dict or a list of messages (the /chat API's final value), stats messages skipped."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        if "content" in content:
            return "" if is_stats_message(content) else message_text(content["content"])
        return str(content.get("text") or "")
    if isinstance(content, (list, tuple)):
        return "".join(message_text(part) for part in content)
    return ""


def check_request(tokenizer, limits: Limits, message, temperature, top_p, top_k, repetition_penalty,
                  max_new_tokens, seed, *, context_tokens: int) -> ChatRequest:
    """Every check of a chat turn; raises InputError with all problems found (text first).

    `context_tokens`: tokens the session's state already holds (the budget counts them).
    """
    errors: dict[str, str] = {}
    text = ""
    try:
        text = check_text(message_text(message) if isinstance(message, (dict, list, tuple)) else message, limits)
    except InputError as exc:
        errors.update(exc.fields)
    try:
        params = check_sampling(temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed)
    except InputError as exc:
        errors.update(exc.fields)
    if errors:
        raise InputError(" ".join(errors.values()), errors)
    n_message = len(tokenizer.encode(text))
    if n_message > limits.max_input_tokens:
        raise InputError(f"Message too long: {n_message:,} tokens (limit {limits.max_input_tokens:,} per message).")
    prompt = len(tokenizer.chat_ids([("human", text)]))
    total = context_tokens + prompt + params.max_new_tokens
    if total > limits.max_context:
        why = (f"Context budget exceeded: {context_tokens:,} tokens of conversation + {prompt:,} for this message + "
               f"up to {params.max_new_tokens:,} new tokens = {total:,} > {limits.max_context:,}. Clear the chat "
               f"or lower max new tokens.")
        raise InputError(why, {"message": why})
    return ChatRequest(text, n_message, context_tokens, params)
