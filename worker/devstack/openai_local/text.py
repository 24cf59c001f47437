"""The answer text: a deterministic function of the prompt and the length alone.

Tests compute what a subscriber must end up with by calling `answer_text` with the
same prompt and length the server saw. A "token" here is a piece of at most four
characters (a word with its leading space, cut up; one CJK character or emoji code
point each), so lengths and rates in tokens look like a real model's.
"""

from __future__ import annotations

import hashlib
import random
import re
from functools import lru_cache

DEFAULT_TOKENS = 120
TOKEN_CHARS = 4

# Plain words most of the time, with accents, CJK and emoji mixed in so that
# multi-byte characters reach every layer (and sometimes land mid-delta).
_WORDS = (
    "the a of to and in that it is for on with as this be by at from or an are was "
    "stream message channel worker queue answer token delta history presence client "
    "server request response model latency order retry window connection signal "
    "simple steady reliable careful quick small large local remote live late early "
    "build send read keep hold reach carry render join resume publish append update "
    "every each many some one two three first last next whole partial final clear"
).split()
_RARE_WORDS = (
    "café naïve façade jalapeño Zürich São résumé crème brûlée déjà über fiancée "
    "東京 数据流 こんにちは 안녕하세요 世界 🚀 ✨ 🙂 👍🏽 🇫🇷 🎉"
).split()
_RARE_SHARE = 0.08
_SENTENCE_WORDS = (5, 16)
_DELTA_SIZES = ((0.6, 1), (0.9, 2), (1.0, 3))  # (cumulative share, tokens): mostly one
_SENTENCE_END = (".", "!", "?")
_CORPUS_SENTENCES = 2000
_SIZE_PATTERN_LENGTH = 4099  # prime, so patterns do not line up with sentence lengths
_PIECE = re.compile(r"\s*\S+|\s+$")
_WIDE_FROM = 0x2E80  # CJK and emoji: a token per code point


def answer_text(
    prompt: str, tokens: int = DEFAULT_TOKENS, max_output_tokens: int | None = None
) -> str:
    """The full answer to `prompt`: about `tokens` tokens, cut at `max_output_tokens`.

    The answer ends at the sentence end nearest to `tokens` (within a quarter of it);
    `len(answer_tokens(...))` is its exact length, as usage reports it.
    """
    return "".join(answer_tokens(prompt, tokens, max_output_tokens))


def answer_deltas(
    prompt: str, tokens: int = DEFAULT_TOKENS, max_output_tokens: int | None = None
) -> list[str]:
    """The answer as the server streams it: deltas of 1-3 tokens; they join to answer_text."""
    return ["".join(group) for group in delta_groups(prompt, tokens, max_output_tokens)]


def answer_tokens(
    prompt: str, tokens: int = DEFAULT_TOKENS, max_output_tokens: int | None = None
) -> list[str]:
    """The answer's tokens; a capped answer is a prefix of the natural one."""
    natural = _natural_tokens(prompt, max(0, tokens))
    if max_output_tokens is None:
        return list(natural)
    return list(natural[: max(0, max_output_tokens)])


def delta_groups(
    prompt: str, tokens: int = DEFAULT_TOKENS, max_output_tokens: int | None = None
) -> list[list[str]]:
    """The tokens grouped into deltas, the same grouping whether capped or not."""
    capped = answer_tokens(prompt, tokens, max_output_tokens)
    sizes = _size_pattern()
    at = _seed("deltas", prompt) % len(sizes)
    groups: list[list[str]] = []
    start = 0
    while start < len(capped):
        size = sizes[at]
        at = (at + 1) % len(sizes)
        groups.append(capped[start : start + size])
        start += size
    return groups


def split_tokens(text: str) -> list[str]:
    """Cut text into tokens the way the answers are counted."""
    out: list[str] = []
    for piece in _PIECE.findall(text):
        out.extend(_cut_piece(piece))
    return out


def count_tokens(text: str) -> int:
    return len(split_tokens(text))


@lru_cache(maxsize=4096)
def _natural_tokens(prompt: str, tokens: int) -> tuple[str, ...]:
    """About `tokens` tokens, ending with a whole sentence when one ends close by."""
    slack = tokens // 4
    out = split_tokens(_opening(prompt))
    corpus, starts = _corpus()
    at = starts[_seed("text", prompt) % len(starts)]
    while len(out) < tokens + slack:  # read on from a sentence the prompt picks, wrapping
        take = min(tokens + slack - len(out), len(corpus) - at)
        out.extend(corpus[at : at + take])
        at = (at + take) % len(corpus)
    ends = [i + 1 for i, token in enumerate(out) if token.endswith(_SENTENCE_END)]
    end = min(ends, key=lambda e: abs(e - tokens), default=tokens)
    if abs(end - tokens) > slack:
        end = tokens
    out = out[:end]
    if out and not out[-1].endswith(_SENTENCE_END):
        out[-1] += "."  # only short answers are cut mid-sentence
    return tuple(out)


@lru_cache(maxsize=1)
def _corpus() -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Tokens of many sentences, each with a leading space, and where each starts."""
    rng = random.Random(_seed("corpus", ""))
    tokens: list[str] = []
    starts: list[int] = []
    for _ in range(_CORPUS_SENTENCES):
        starts.append(len(tokens))
        tokens.extend(split_tokens(" " + _sentence(rng)))
    return tuple(tokens), tuple(starts)


@lru_cache(maxsize=1)
def _size_pattern() -> tuple[int, ...]:
    rng = random.Random(_seed("sizes", ""))
    return tuple(_delta_size(rng.random()) for _ in range(_SIZE_PATTERN_LENGTH))


def _opening(prompt: str) -> str:
    words = prompt.split()
    if not words:
        return "Here is an answer."
    excerpt = " ".join(words[:6])
    if len(words) > 6 or len(excerpt) > 60:
        excerpt = excerpt[:60] + "…"
    return f"On “{excerpt}”, here is what I can say."


def _sentence(rng: random.Random) -> str:
    count = rng.randint(*_SENTENCE_WORDS)
    words = [_word(rng) for _ in range(count)]
    if count > 8 and rng.random() < 0.4:
        words[rng.randint(2, count - 3)] += ","
    words[0] = words[0][:1].upper() + words[0][1:]
    return " ".join(words) + rng.choice(".........!?")


def _word(rng: random.Random) -> str:
    if rng.random() < _RARE_SHARE:
        return rng.choice(_RARE_WORDS)
    return rng.choice(_WORDS)


def _delta_size(draw: float) -> int:
    return next(size for share, size in _DELTA_SIZES if draw < share)


def _cut_piece(piece: str) -> list[str]:
    if piece.isascii():
        return [piece[i : i + TOKEN_CHARS] for i in range(0, len(piece), TOKEN_CHARS)]
    out: list[str] = []
    current = ""
    for char in piece:
        if ord(char) >= _WIDE_FROM:
            if current:
                out.append(current)
            out.append(char)
            current = ""
            continue
        current += char
        if len(current) == TOKEN_CHARS:
            out.append(current)
            current = ""
    if current:
        out.append(current)
    return out


def _seed(purpose: str, prompt: str) -> int:
    digest = hashlib.sha256(f"{purpose}\0{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big")
