"""Incremental detokenization with stop strings.

Text is released only when it is final: never half of a multi-byte character (the tokenizer shows an
unfinished byte sequence as U+FFFD) and never a tail that could still grow into a stop string. A stop
string that spans several tokens is found in the accumulated text and cut off, so the caller never
sees any of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase


@dataclass
class DetokenizeResult:
    text: str  # newly released text
    stop: str | None = None  # the stop string that matched (generation must end)


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        # Decode window [prefix, end): it starts one released step back, so that SentencePiece's
        # leading-space rule treats the old and the new decode alike, without decoding everything.
        self._prefix = 0
        self._read = 0
        self._pending = ""  # decoded, not yet released: could be the start of a stop string
        self.text = ""  # everything released so far

    def _decode(self, ids: list[int]) -> str:
        # The Rust tokenizer itself: what transformers' decode calls, without its per-call Python work.
        return str(self.tokenizer.backend_tokenizer.decode(ids, skip_special_tokens=True))

    def add(self, token_ids: Sequence[int], final: bool = False) -> DetokenizeResult:
        self.ids.extend(token_ids)
        new = ""
        if self._read < len(self.ids):
            before = self._decode(self.ids[self._prefix : self._read])
            after = self._decode(self.ids[self._prefix :])
            # U+FFFD at the end: a multi-byte character whose remaining bytes are in the next token.
            if len(after) > len(before) and (final or not after.endswith("\ufffd")):
                new = after[len(before) :]
                self._prefix, self._read = self._read, len(self.ids)
        return self._release(new, final)

    def _release(self, new: str, final: bool) -> DetokenizeResult:
        self._pending += new
        # The earliest match wins (the longer stop string on a tie): nothing after it is ever shown.
        matches = [(at, -len(stop), stop) for stop in self.stop if (at := self._pending.find(stop)) >= 0]
        if matches:
            at, _, stop = min(matches)
            out = self._pending[:at]
            self.text += out
            self._pending = ""
            return DetokenizeResult(out, stop)
        cut = len(self._pending) if final else max(0, len(self._pending) - self._hold)
        out, self._pending = self._pending[:cut], self._pending[cut:]
        self.text += out
        return DetokenizeResult(out)

    def flush(self) -> str:
        """Release whatever is held back (generation ended for another reason)."""
        return self.add([], final=True).text
