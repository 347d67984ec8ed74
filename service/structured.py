"""Structured outputs: a response format as a grammar, enforced token by token with llguidance.

llguidance (chosen over xgrammar by measurement on the 2-core CPU machine, see README "Structured
outputs") turns a JSON Schema, a regex, a choice or a Lark grammar into a matcher that, at each step,
yields the set of tokens that keep the output inside the language, and consumes the token sampled.
It has no per-grammar precompute (a matcher costs about a millisecond), bounds the work a hostile
grammar can cause (`LIMITS`), and never lets special tokens such as `<|user|>` into the text.

The frontend validates a format (in the preprocessing pool, cached); a worker keeps one pristine
matcher per format and hands each request a copy; the sampler masks constrained rows only.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

KINDS = ("json_schema", "json_object", "regex", "choice", "lark")
# JSON without free whitespace: with random or weak weights "any whitespace" lets a model loop on
# newlines forever; compact JSON parses the same.
JSON_OPTIONS: Any = {"whitespace_flexible": False}  # llguidance JsonCompileOptions
CACHE_SIZE = 256  # pristine matchers (or validation results) kept per process


@dataclass(frozen=True)
class ResponseFormat:
    """What the output must be. `spec`: the JSON Schema text, the regex, the JSON list of choices or
    the Lark grammar ("" for json_object)."""

    kind: str
    spec: str

    @property
    def field(self) -> str:
        """The request field it came from, for error messages."""
        return "sampling.response_format." + ("lark_grammar" if self.kind == "lark" else self.kind)

    def grammar(self) -> str:
        """llguidance's grammar for this format (raises ValueError on text that is not even JSON)."""
        import llguidance as llg

        if self.kind == "json_schema":
            return str(llg.LLMatcher.grammar_from_json_schema(self.spec, defaults=JSON_OPTIONS))
        if self.kind == "json_object":
            return str(llg.LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=JSON_OPTIONS))
        if self.kind == "regex":
            return str(llg.LLMatcher.grammar_from_regex(self.spec))
        if self.kind == "choice":
            return str(llg.grammar_from("choice", self.spec))
        if self.kind == "lark":
            return str(llg.LLMatcher.grammar_from_lark(self.spec))
        raise ValueError(f"unknown response format kind {self.kind!r}")


def choice_format(options: Sequence[str]) -> ResponseFormat:
    return ResponseFormat("choice", json.dumps(list(options)))


def _limits() -> Any:
    import llguidance as llg

    # llguidance's defaults, written out: each bounds one kind of work a grammar can demand (building
    # the lexer, each mask step, grammar size), in milliseconds rather than seconds.
    return llg.LLParserLimits(
        initial_lexer_fuel=1_000_000,  # ~20 ms building a grammar's regexes
        step_lexer_fuel=200_000,  # ~14 ms per token mask
        step_max_items=50_000,
        max_lexer_states=250_000,
        max_grammar_size=500_000,
    )


class Grammars:
    """One tokenizer's view of response formats: validation and matchers, cached by format."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        import llguidance.hf

        self.vocab_size = vocab_size
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=list(eos_token_ids))
        self._limits = _limits()
        self._pristine = FormatCache()
        self._problems = FormatCache()  # "" = usable

    def problem(self, fmt: ResponseFormat) -> str:
        """Why this format cannot be used ("" when it can)."""
        import llguidance as llg

        cached = self._problems.get(fmt)
        if cached is not None:
            return str(cached)
        try:
            grammar = fmt.grammar()
            problem = llg.LLMatcher.validate_grammar(grammar, self._tokenizer, limits=self._limits)
        except ValueError as exc:
            problem = str(exc)
        self._problems.put(fmt, problem)
        return str(problem)

    def matcher(self, fmt: ResponseFormat) -> Any:
        """A fresh matcher at the start of the format's language (a copy of a cached pristine one)."""
        import llguidance as llg

        pristine = self._pristine.get(fmt)
        if pristine is None:
            pristine = llg.LLMatcher(self._tokenizer, fmt.grammar(), log_level=0, limits=self._limits)
            if pristine.is_error():
                raise ValueError(pristine.get_error())
            self._pristine.put(fmt, pristine)
        return pristine.deep_copy()


class FormatCache:
    """What is known about the most recently used response formats (least recently used dropped first)."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self.size = size
        self._items: OrderedDict[ResponseFormat, Any] = OrderedDict()

    def get(self, fmt: ResponseFormat) -> Any:
        """The value kept for `fmt`, or None."""
        value = self._items.get(fmt)
        if value is not None:
            self._items.move_to_end(fmt)
        return value

    def put(self, fmt: ResponseFormat, value: Any) -> None:
        self._items[fmt] = value
        if len(self._items) > self.size:
            self._items.popitem(last=False)


def mask_logits(logits: torch.Tensor, rows: Sequence[int], matchers: Sequence[Any]) -> None:
    """Set to -inf, in place, every logit of `rows` whose token the row's matcher does not allow now."""
    vocab = logits.shape[1]
    words = (vocab + 31) // 32
    bitmask = np.empty((len(rows), words), dtype=np.int32)
    for j, matcher in enumerate(matchers):
        matcher.unsafe_compute_mask_ptr(bitmask[j].ctypes.data, words * 4)
    # Bit i of the little-endian words allows token i.
    forbidden = ~np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :vocab].view(bool)
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous():
        view = logits.numpy()  # numpy's masked copy is ~4x faster than torch's masked_fill on one core
        for j, row in enumerate(rows):
            np.copyto(view[row], -np.inf, where=forbidden[j])
        return
    index = torch.tensor(list(rows), dtype=torch.long, device=logits.device)
    mask = torch.from_numpy(forbidden).to(logits.device)
    logits.index_copy_(0, index, logits.index_select(0, index).masked_fill_(mask, float("-inf")))
