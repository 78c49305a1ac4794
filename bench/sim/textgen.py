"""Token counting and deterministic fake text, shared by the simulator and the load driver.

The simulator has no tokenizer. Its rule, which the benchmark driver relies on when it builds
a prompt of an intended length, is: **one token per whitespace-separated word**, summed over
the text parts of a request (chat: every message's text content; no template tokens), at
least 1. A completion prompt given as a list of token ids counts one token per id.

Generated text is a sequence of words from :data:`WORDS`, each with a leading space, so the
text of ``n`` generated tokens again counts as ``n`` tokens under the same rule.

Embeddings carry lexical meaning, so that retrieval examples work against the simulator: a
text's vector is a **hashed bag of words**, normalised (:func:`bag_of_words`): each lowercase
word (a run of letters and digits) adds ±1 to the dimension its CRC-32 picks (the sign from
another bit of it), and the vector is scaled to length 1. Texts that share words have a
positive cosine similarity; texts without a common word are near orthogonal (up to hash
collisions). A list of token ids is a bag of its ids.

Without ``ignore_eos`` a simulated model "stops at EOS": the natural length of an answer is
drawn from an exponential distribution with mean ``eos_mean_tokens``, seeded by a hash of the
prompt (same prompt, same length), and the output is ``min(max_tokens, natural)``.
"""

from __future__ import annotations

import hashlib
import math
import re
import zlib

import msgspec

WORDS: tuple[str, ...] = (
    "the", "model", "answers", "with", "simulated", "tokens", "from", "a", "small", "fixed",
    "vocabulary", "so", "that", "every", "run", "is", "reproducible", "and", "cheap", "to",
    "stream", "over", "many", "concurrent", "connections", "while", "batching", "steps",
    "advance", "in", "modelled", "time",
)
# Each generated token as text (leading space) and as a JSON string literal, built once.
TOKEN_TEXT: tuple[str, ...] = tuple(" " + w for w in WORDS)
TOKEN_JSON: tuple[bytes, ...] = tuple(msgspec.json.encode(t) for t in TOKEN_TEXT)


def count_tokens(text: str) -> int:
    """Tokens of one text part: its whitespace-separated words."""
    return len(text.split())


def prompt_seed(text: str) -> int:
    """A stable 64-bit seed from prompt text (not Python's randomized ``hash``)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def token_index(seed: int, i: int) -> int:
    """Index into :data:`WORDS` of the ``i``-th generated token of a sequence."""
    return (seed + 7 * i) % len(WORDS)


def generated_text(seed: int, n: int) -> str:
    return "".join(TOKEN_TEXT[token_index(seed, i)] for i in range(n))


def natural_length(seed: int, eos_mean_tokens: float) -> int:
    """Where a model would emit EOS for this prompt: exponential with the given mean, >= 1."""
    u = ((seed >> 11) + 0.5) / float(1 << 53)  # uniform in (0, 1) from the seed's high bits
    return max(1, math.ceil(-math.log(u) * eos_mean_tokens))


def output_length(seed: int, max_tokens: int, ignore_eos: bool, eos_mean_tokens: float) -> int:
    if ignore_eos:
        return max_tokens
    return min(max_tokens, natural_length(seed, eos_mean_tokens))


def make_prompt(n_tokens: int, offset: int = 0) -> str:
    """A prompt that counts as exactly ``n_tokens`` (>= 1) under :func:`count_tokens`.

    ``offset`` shifts the word sequence so different requests do not share text (like vLLM's
    BurstGPT prompts, built from token ids ``(i + j) mod V``).
    """
    n = max(1, n_tokens)
    words = [f"req{offset}"]  # a unique first word: distinct prompts, distinct EOS draws
    words += [WORDS[(offset + j) % len(WORDS)] for j in range(n - 1)]
    return " ".join(words)


_WORD = re.compile(r"[0-9a-z]+")


def bag_of_words(item: str | list[int], dim: int) -> list[float]:
    """A normalised hashed bag-of-words vector of ``dim`` dimensions (unit length; a text
    without words gets the first unit vector)."""
    words = [str(t).encode() for t in item] if isinstance(item, list) else [
        w.encode() for w in _WORD.findall(item.lower())]
    vec = [0.0] * dim
    for w in words:
        h = zlib.crc32(w)
        vec[h % dim] += 1.0 if (h >> 31) & 1 else -1.0
    norm = math.sqrt(sum(v * v for v in vec))
    if norm == 0.0:
        vec[0] = 1.0
        return vec
    return [v / norm for v in vec]
