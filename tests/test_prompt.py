"""Prompt building: chat template, Phi3VProcessor tokenization parity (golden ids) and validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from service.processor import ChatMessage, PromptBuilder, PromptError

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "golden"
INDEX = json.loads((GOLDEN / "index.json").read_text())
BOS, END, ASSISTANT, USER, SYSTEM = 1, 32007, 32001, 32010, 32006
# Golden image-token counts (nc4): A 757, B 601.
A, B = 757, 601


@pytest.fixture(scope="module")
def builder() -> PromptBuilder:
    return PromptBuilder(FIXTURES / "tiny-phi35v")


@pytest.fixture(scope="module")
def golden_ids() -> dict[str, list[int]]:
    with np.load(GOLDEN / "prompts.npz") as z:
        return {key.removesuffix(".input_ids"): z[key][0].tolist() for key in z.files}


def _golden_case(case: str) -> tuple[list[ChatMessage], list[int]]:
    spec = INDEX["prompts"][case]
    images = spec["images"]
    messages = [
        ChatMessage(m["role"], m["content"], tuple(range(len(images))) if m["role"] == "user" else ())
        for m in spec["messages"]
    ]
    counts = [INDEX["processor"][f"nc{spec['num_crops']}.{name}"]["num_img_tokens"] for name in images]
    return messages, counts


@pytest.mark.parametrize("case", list(INDEX["prompts"]))
def test_golden_prompt_ids(builder: PromptBuilder, golden_ids, case: str) -> None:
    messages, counts = _golden_case(case)
    assert builder.render(messages, len(counts)) == INDEX["prompts"][case]["prompt_text"]
    ids = builder.encode(messages, counts)
    assert ids == golden_ids[case]
    assert [i for i, t in enumerate(ids) if t == BOS] == INDEX["prompts"][case]["bos_positions"]


def test_prompt_ends_with_assistant_tag(builder: PromptBuilder) -> None:
    # <|assistant|> has rstrip, so the template's final "\n" disappears into it.
    ids = builder.encode([ChatMessage("user", "hi")], [])
    assert ids[-4:] == [END, 29871, 13, ASSISTANT]


def test_template_with_system_and_history(builder: PromptBuilder) -> None:
    messages = [
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "Hi"),
        ChatMessage("assistant", "Hello."),
        ChatMessage("user", "Bye"),
    ]
    assert builder.render(messages) == (
        "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello.<|end|>\n<|user|>\nBye<|end|>\n"
        "<|assistant|>\n"
    )
    ids = builder.encode(messages, [])
    assert ids[:2] == [BOS, SYSTEM] and ids.count(BOS) == 1  # text-only: one piece, one BOS
    assert ids.count(USER) == 2 and ids.count(ASSISTANT) == 2 and ids.count(END) == 4


def test_images_without_placeholders_are_prepended(builder: PromptBuilder, golden_ids) -> None:
    one = [ChatMessage("user", "Describe this image in detail.", (0,))]
    assert builder.encode(one, [A]) == golden_ids["nc4_one_A_640x480"]
    two = [ChatMessage("user", "What is different between these two images?", (0, 1))]
    assert builder.encode(two, [A, B]) == golden_ids["nc4_two_A_B"]


def test_unnamed_images_of_a_turn_go_first(builder: PromptBuilder) -> None:
    text = builder.render([ChatMessage("user", "and <|image_2|>?", (0, 1))])
    assert text == "<|user|>\n<|image_1|>\nand <|image_2|>?<|end|>\n<|assistant|>\n"


def test_images_in_several_turns(builder: PromptBuilder) -> None:
    messages = [
        ChatMessage("system", "You see images."),
        ChatMessage("user", "Look.", (0,)),
        ChatMessage("assistant", "OK."),
        ChatMessage("user", "Compare with <|image_2|>.", (1,)),
    ]
    ids = builder.encode(messages, [5, 3])
    first, second = ids.index(-1), ids.index(-2)
    assert ids[first : first + 5] == [-1] * 5 and ids[first + 5] == BOS  # a BOS follows every image run
    assert ids[second : second + 3] == [-2] * 3 and ids[second + 3] == BOS
    assert first < second and ids.count(-1) == 5 and ids.count(-2) == 3
    assert ids.count(BOS) == 3


def test_adjacent_placeholders_give_a_bos_between_runs(builder: PromptBuilder) -> None:
    # Phi3VProcessor tokenizes the empty chunk between two tags as [BOS].
    ids = builder.encode([ChatMessage("user", "<|image_1|><|image_2|>x", (0, 1))], [2, 2])
    assert ids[4:9] == [-1, -1, BOS, -2, -2]


def test_eos_token_ids(builder: PromptBuilder) -> None:
    # <|end|> closes chat turns, </s> comes from generation_config.json, <|endoftext|> is the tokenizer's EOS.
    assert set(builder.eos_token_ids) == {32007, 2, 32000}
    assert builder.tokenizer.convert_ids_to_tokens(32007) == "<|end|>"


def _u(text: str, images: tuple[int, ...] = ()) -> ChatMessage:
    return ChatMessage("user", text, images)


def _a(text: str = "ok", images: tuple[int, ...] = ()) -> ChatMessage:
    return ChatMessage("assistant", text, images)


ERRORS = {
    "empty": ([], 0, "messages"),
    "unknown-role": ([ChatMessage("bot", "x")], 0, "messages[0].role"),
    "late-system": ([_u("x"), ChatMessage("system", "s"), _u("y")], 0, "messages[1].role"),
    "starts-with-assistant": ([_a(), _u("x")], 0, "messages[0].role"),
    "two-users": ([_u("x"), _u("y")], 0, "messages[1].role"),
    "ends-with-assistant": ([_u("x"), _a()], 0, "messages[1].role"),
    "image-on-assistant": ([_u("x"), _a("ok", (0,)), _u("y")], 1, "messages[1].image_indices"),
    "image-on-system": ([ChatMessage("system", "s", (0,)), _u("x")], 1, "messages[0].image_indices"),
    "index-out-of-range": ([_u("x", (0, 2))], 2, "messages[0].image_indices"),
    "attached-twice": ([_u("x", (0,)), _a(), _u("y", (0,))], 1, "messages[2].image_indices"),
    "duplicate-in-turn": ([_u("x", (0, 0))], 1, "messages[0].image_indices"),
    "placeholder-not-attached": ([_u("a", (0,)), _a(), _u("<|image_1|>", (1,))], 2, "messages[2].text"),
    "placeholder-missing-image": ([_u("<|image_3|>", (0,))], 1, "messages[0].text"),
    "placeholder-zero": ([_u("<|image_0|>", (0,))], 1, "messages[0].text"),
    "placeholder-twice": ([_u("<|image_1|> <|image_1|>", (0,))], 1, "messages[0].text"),
    "placeholder-in-assistant": ([_u("x", (0,)), _a("<|image_1|>"), _u("y")], 1, "messages[1].text"),
    "unused-image": ([_u("x", (0,))], 2, "images[1]"),
    "placeholders-out-of-order": ([_u("<|image_2|> <|image_1|>", (0, 1))], 2, "messages[0].text"),
    "turns-out-of-order": ([_u("x", (1,)), _a(), _u("y", (0,))], 2, "messages[0].image_indices"),
}


@pytest.mark.parametrize(("messages", "num_images", "field"), list(ERRORS.values()), ids=list(ERRORS))
def test_validation_errors_name_the_field(builder: PromptBuilder, messages, num_images: int, field: str) -> None:
    with pytest.raises(PromptError) as info:
        builder.encode(messages, [10] * num_images)
    assert info.value.field == field
    assert isinstance(info.value, ValueError) and str(info.value).startswith(field + ": ")
    with pytest.raises(PromptError):
        builder.render(messages, num_images)


def test_unused_image_error_names_the_image(builder: PromptBuilder) -> None:
    with pytest.raises(PromptError, match="image 1 is not attached"):
        builder.encode([_u("x", (0,))], [10, 10])


def test_render_infers_image_count_from_attachments(builder: PromptBuilder) -> None:
    assert builder.render([_u("x", (0, 1))]).count("<|image_") == 2
    with pytest.raises(PromptError) as info:
        builder.render([_u("x", (1,))])  # image 0 exists (index 1 does) but is never attached
    assert info.value.field == "images[0]"


@pytest.mark.parametrize("counts", [[0], [-3], [2.0]])
def test_bad_image_token_counts(builder: PromptBuilder, counts) -> None:
    with pytest.raises(ValueError, match="image_token_counts"):
        builder.encode([_u("x", (0,))], counts)
