"""Incremental detokenization and stop strings, on the real Phi-3.5 tokenizer."""

from __future__ import annotations

import pytest
from harness import TINY_MODEL

from service.api.detokenizer import IncrementalDetokenizer
from service.processor.prompt import PromptBuilder

TEXT = "Hello world! Ünïcödé 日本語 🙂 emoji and  spaces\nnewline. Bye now"


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return PromptBuilder(TINY_MODEL).tokenizer


def stream(tokenizer, text: str, stop=()):  # type: ignore[no-untyped-def]
    ids = tokenizer(text, add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tokenizer, stop)
    pieces, matched = [], None
    for i, tid in enumerate(ids):
        result = detok.add([tid], final=i == len(ids) - 1)
        pieces.append(result.text)
        if result.stop:
            matched = result.stop
            break
    return pieces, matched, ids


def test_token_by_token_equals_whole_decode_and_never_splits_a_character(tokenizer) -> None:  # type: ignore[no-untyped-def]
    pieces, matched, ids = stream(tokenizer, TEXT)
    assert matched is None
    assert "".join(pieces) == tokenizer.decode(ids) == TEXT
    # The emoji is four byte-fallback tokens: no piece may carry half of it.
    assert all("\ufffd" not in p for p in pieces)
    assert any(len(tokenizer.convert_ids_to_tokens([t])[0]) == 6 and tokenizer.convert_ids_to_tokens([t])[0].startswith("<0x") for t in ids)


def test_stop_string_across_tokens_is_cut_and_never_shown(tokenizer) -> None:  # type: ignore[no-untyped-def]
    pieces, matched, _ = stream(tokenizer, TEXT, stop=["newline"])
    assert matched == "newline"
    assert "".join(pieces) == TEXT[: TEXT.index("newline")]


def test_earliest_stop_wins_whatever_the_list_order(tokenizer) -> None:  # type: ignore[no-untyped-def]
    pieces, matched, _ = stream(tokenizer, TEXT, stop=["Bye", "world"])
    assert matched == "world" and "".join(pieces) == "Hello "
    detok = IncrementalDetokenizer(tokenizer, ["lo", "He"])
    result = detok.add(tokenizer("Hello", add_special_tokens=False).input_ids)
    assert result.stop == "He" and result.text == ""


def test_held_back_text_is_released_at_the_end(tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer("The end is ne", add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tokenizer, ["near"])
    shown = "".join(detok.add([t]).text for t in ids)
    assert not shown.endswith("ne")  # could still become "near"
    assert shown + detok.flush() == "The end is ne"
