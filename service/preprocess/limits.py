"""Cheap checks that run before any expensive step: bounds computable from sizes alone."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from transformers import PreTrainedTokenizerBase

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def max_bytes_per_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """The most bytes of input text one token of this vocabulary can stand for.

    SentencePiece tokens spell a space as U+2581 ("▁", 3 bytes) for 1 byte of input; byte-fallback
    tokens (<0x41>) stand for 1 byte; added tokens for their literal text. A text of B bytes is then
    at least ceil(B / this) tokens, whatever the tokenizer does with it."""
    longest = 1
    for token in tokenizer.get_vocab():
        n = 1 if _BYTE_TOKEN.fullmatch(token) else len(token.replace("\u2581", " ").encode("utf-8"))
        longest = max(longest, n)
    for added in tokenizer.added_tokens_decoder.values():
        longest = max(longest, len(str(added.content).encode("utf-8")))
    return longest


def min_text_tokens(texts: Iterable[str], bytes_per_token: int) -> int:
    """A lower bound on the tokens of these texts, without tokenizing them."""
    return sum(math.ceil(len(t.encode("utf-8")) / bytes_per_token) for t in texts)
