"""Conversation -> prompt token ids, equal to the original ``Phi3VProcessor``.

Images are referenced in user turns as ``<|image_N|>`` (N = request image index + 1). Image k becomes a run
of ``image_token_counts[k]`` copies of the negative id ``-(k + 1)`` (tests/fixtures/README.md, section 2.2).

Rules beyond the original (it asserts or silently misbehaves; we answer with a :class:`PromptError` that
names the offending field):

* roles are system/user/assistant; system only first; then user and assistant alternate, starting and
  ending with user (the prompt asks for the next assistant turn);
* images attach to user turns only, each image to exactly one turn, every image of the request is used;
* a placeholder may only name an image attached to its own turn, at most once; attached images the text
  does not name are placed at the start of the turn as ``<|image_N|>\\n``, in ``image_indices`` order
  (the model card's layout);
* images appear in the prompt in request order (image 1 first). The model writes image features into the
  negative-id positions in sequence order and takes the images in request order (README 2.3, step 6), so
  any other order would give an image the wrong features.

Videos (ours; the original has none) attach like images (``video_indices``, ``<|video_N|>``, unnamed ones
at the start of the turn after the unnamed images) and follow the same rules among themselves. Before
tokenizing, each video tag becomes its sampled frames' image tags joined by newlines (see
:func:`expand_videos`), and every image slot is numbered in order of appearance, so a video's frames get
exactly the prompt the same frames sent as images would get.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerFast

ROLES = ("system", "user", "assistant")
KINDS = ("image", "video")
# The exact pattern Phi3VProcessor splits on: whatever it would treat as an image tag, we validate.
_PLACEHOLDER = re.compile(r"<\|image_(\d+)\|>")
# Ours: `<|video_N|>` expands to its frames' image tags before the text is split like the original's.
_ANY_PLACEHOLDER = re.compile(r"<\|(image|video)_(\d+)\|>")
# Ours: message text is wrapped in these private-use marks while the template is rendered, so that the
# text's special-token strings can be told from the template's own (see PromptBuilder._encode_chunk).
# The marks are removed from message text first: no caller can use them.
TEXT_OPEN, TEXT_CLOSE = "\ue000", "\ue001"
_TEXT_MARK = re.compile(f"({TEXT_OPEN}|{TEXT_CLOSE})")
_END_OF_TURN = "<|end|>"


@dataclass(frozen=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant"
    text: str
    image_indices: tuple[int, ...] = ()  # 0-based indices into the request's image list (user turns only)
    video_indices: tuple[int, ...] = ()  # 0-based indices into the request's video list (user turns only)

    def attached(self, kind: str) -> tuple[int, ...]:
        return self.image_indices if kind == "image" else self.video_indices


@dataclass(frozen=True)
class VideoFrames:
    """A video as the prompt sees it: its sampled frames' image-token counts and times."""

    frame_tokens: tuple[int, ...]
    seconds: tuple[float, ...]
    timestamps: bool = False  # "<seconds>s: " before each frame's tag


@dataclass(frozen=True)
class EncodedPrompt:
    """Prompt ids, and which request image or video frame each image slot (-(s + 1) ids) holds."""

    ids: list[int]
    slots: list[tuple[str, int, int]]  # (kind, index, frame): ("image", k, 0) or ("video", v, f)


class PromptError(ValueError):
    """Invalid conversation; ``field`` names the offending request field, e.g. ``messages[2].role``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _placeholder(index: int, kind: str = "image") -> str:
    return f"<|{kind}_{index + 1}|>"


def _check_structure(messages: Sequence[ChatMessage]) -> None:
    if not messages:
        raise PromptError("messages", "the conversation is empty")
    offset = 1 if messages[0].role == "system" else 0
    for i, msg in enumerate(messages):
        field = f"messages[{i}]"
        if msg.role not in ROLES:
            raise PromptError(f"{field}.role", f"unknown role {msg.role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(msg.text, str):
            raise PromptError(f"{field}.text", "text must be a string")
        if msg.role == "system" and i > 0:
            raise PromptError(f"{field}.role", "a system message is only allowed as the first message")
        if i >= offset:
            expected = "user" if (i - offset) % 2 == 0 else "assistant"
            if msg.role != expected:
                raise PromptError(
                    f"{field}.role",
                    f"expected {'an' if expected == 'assistant' else 'a'} {expected} message: after an optional "
                    f"system message, turns alternate"
                    " user/assistant starting with user",
                )
    if messages[-1].role != "user":
        last = f"messages[{len(messages) - 1}].role"
        raise PromptError(last, "the last message must be a user message (the prompt asks for a reply)")


def _attach(messages: Sequence[ChatMessage], kind: str, count: int) -> None:
    """Each image (or video) index in range, on a user turn, attached once; every one attached somewhere."""
    owner: dict[int, int] = {}
    for i, msg in enumerate(messages):
        field = f"messages[{i}].{kind}_indices"
        if msg.attached(kind) and msg.role != "user":
            raise PromptError(field, f"{kind}s can only be attached to user messages, not {msg.role}")
        for k in msg.attached(kind):
            if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < count:
                raise PromptError(field, f"{kind} index {k!r} is out of range: the request has {count} {kind}(s)")
            if k in owner:
                where = "this message" if owner[k] == i else f"messages[{owner[k]}]"
                raise PromptError(field, f"{kind} {k} is attached more than once (also to {where})")
            owner[k] = i
    for k in range(count):
        if k not in owner:
            raise PromptError(
                f"{kind}s[{k}]", f"{kind} {k} is not attached to any message; every {kind} of the request must be used"
            )


def _turn_text(
    msg: ChatMessage, i: int, counts: dict[str, int], mark_text: bool = False
) -> tuple[str, list[tuple[str, int, str]]]:
    """The turn's final text and its image/video references in text order, each with the field that placed it."""
    field = f"messages[{i}].text"
    named: list[tuple[str, int]] = []
    for match in _ANY_PLACEHOLDER.finditer(msg.text):
        tag, kind, k = match.group(0), match.group(1), int(match.group(2)) - 1
        if msg.role != "user":
            raise PromptError(field, f"{tag}: {kind} placeholders are only allowed in user messages")
        if not 0 <= k < counts[kind]:
            raise PromptError(field, f"{tag} refers to a missing {kind}: the request has {counts[kind]} {kind}(s)")
        if k not in msg.attached(kind):
            raise PromptError(field, f"{tag} refers to {kind} {k}, which is not attached to this message")
        if (kind, k) in named:
            raise PromptError(field, f"{tag} appears more than once")
        named.append((kind, k))
    unnamed = [(kind, k) for kind in KINDS for k in msg.attached(kind) if (kind, k) not in named]
    prefix = "".join(f"{_placeholder(k, kind)}\n" for kind, k in unnamed)
    refs = [(kind, k, f"messages[{i}].{kind}_indices") for kind, k in unnamed]
    refs += [(kind, k, field) for kind, k in named]
    if mark_text:
        return prefix + TEXT_OPEN + _TEXT_MARK.sub("", msg.text) + TEXT_CLOSE, refs
    return prefix + msg.text, refs


def validated_turns(
    messages: Sequence[ChatMessage], num_images: int, num_videos: int = 0, mark_text: bool = False
) -> list[dict[str, str]]:
    """Validate the conversation; return chat-template messages with every placeholder in place (and,
    with `mark_text`, each message's own text between TEXT_OPEN and TEXT_CLOSE)."""
    _check_structure(messages)
    counts = {"image": num_images, "video": num_videos}
    for kind in KINDS:
        _attach(messages, kind, counts[kind])
    turns: list[dict[str, str]] = []
    order: list[tuple[str, int, str]] = []
    for i, msg in enumerate(messages):
        text, refs = _turn_text(msg, i, counts, mark_text)
        turns.append({"role": msg.role, "content": text})
        order.extend(refs)
    for kind in KINDS:
        seen = [(k, field) for ref_kind, k, field in order if ref_kind == kind]
        for position, (k, field) in enumerate(seen):
            if k != position:
                raise PromptError(
                    field,
                    f"{_placeholder(k, kind)} comes before {_placeholder(position, kind)}: {kind}s must appear in the "
                    f"conversation in request order",
                )
    return turns


def expand_videos(text: str, videos: Sequence[VideoFrames]) -> tuple[str, list[tuple[str, int, int]]]:
    """Number every image tag and video frame in order of appearance: the text with image tags only,
    and what each slot holds. A video becomes its frames' tags joined by newlines, each frame preceded
    by "<seconds>s: " when asked (e.g. "0.50s: <|image_1|>\n1.50s: <|image_2|>")."""
    slots: list[tuple[str, int, int]] = []

    def tag() -> str:
        return f"<|image_{len(slots)}|>"

    def replace(match: re.Match[str]) -> str:
        kind, k = match.group(1), int(match.group(2)) - 1
        if kind == "image":
            slots.append(("image", k, 0))
            return tag()
        video = videos[k]
        parts = []
        for f, seconds in enumerate(video.seconds):
            slots.append(("video", k, f))
            parts.append((f"{seconds:.2f}s: " if video.timestamps else "") + tag())
        return "\n".join(parts)

    return _ANY_PLACEHOLDER.sub(replace, text), slots


class PromptBuilder:
    """Chat template + Phi3VProcessor tokenization for one checkpoint's tokenizer."""

    def __init__(self, tokenizer_dir: str | os.PathLike) -> None:
        path = Path(tokenizer_dir)
        # PreTrainedTokenizerFast, not the LlamaTokenizer that tokenizer_config.json names: under
        # transformers 5 LlamaTokenizer rebuilds the pipeline (no normalizer, Metaspace prepend_scheme
        # "first"), so a "\n" after a special token loses its "▁" (29871) and "<|end|>\n<|assistant|>"
        # encodes as 32007, 13, 32001 instead of the original 32007, 29871, 13, 32001.
        # PreTrainedTokenizerFast runs tokenizer.json as written (Prepend("▁") normalizer applied to
        # every text segment between special tokens), as tokenizers 0.19 did for the original.
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if not (path / name).is_file():
                raise ValueError(f"{path / name}: missing (the model folder must carry the Phi-3.5 tokenizer)")
        self._tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
        if not self._tokenizer.chat_template:
            raise ValueError(f"{path}: the tokenizer has no chat template (tokenizer_config.json chat_template)")
        bos = self._tokenizer.bos_token_id
        if bos is None:
            raise ValueError(f"{path}: the tokenizer defines no BOS token")
        self._bos_id: int = bos
        self._eos_token_ids = self._read_eos_ids(path)
        decoder = self._tokenizer.added_tokens_decoder
        added = {t.content: i for i, t in decoder.items()}
        self._special_ids = added
        # Added tokens that swallow the whitespace beside them, as the tokenizer applies them.
        self._lstrip = {t.content for t in decoder.values() if t.lstrip}
        self._rstrip = {t.content for t in decoder.values() if t.rstrip}
        self._special = re.compile("|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)))

    def _read_eos_ids(self, path: Path) -> tuple[int, ...]:
        ids: list[int] = []
        end_id = self._tokenizer.convert_tokens_to_ids(_END_OF_TURN)
        if isinstance(end_id, int) and end_id != self._tokenizer.unk_token_id:
            ids.append(end_id)  # the chat template closes every turn with <|end|>
        gen_config = path / "generation_config.json"
        if gen_config.is_file():
            eos = json.loads(gen_config.read_text(encoding="utf-8")).get("eos_token_id")
            ids.extend([eos] if isinstance(eos, int) else list(eos or []))
        if self._tokenizer.eos_token_id is not None:
            ids.append(self._tokenizer.eos_token_id)
        return tuple(dict.fromkeys(ids))

    def _encode_chunk(self, chunk: str, inside_text: bool, ids: list[int]) -> bool:
        """Append the ids of one marked chunk: special-token strings outside message text are control
        tokens, and they alone split the chunk into segments, each tokenized as plain text (the
        original splits at every special token, so text free of them gives the same ids). Returns
        whether the chunk ends inside a message's text."""
        segment: list[str] = []
        strip_next = False  # after a token that strips whitespace on its right (<|assistant|> does)

        def add(text: str) -> None:
            nonlocal strip_next
            if strip_next:
                text = text.lstrip()
                strip_next = not text
            segment.append(text)

        def flush(before: str = "") -> None:
            text = "".join(segment)
            if before in self._lstrip:
                text = text.rstrip()
            if text:
                ids.extend(self._plain_ids(text))
            segment.clear()

        for piece in _TEXT_MARK.split(chunk):
            if piece in (TEXT_OPEN, TEXT_CLOSE):
                inside_text = piece == TEXT_OPEN
            elif inside_text:
                add(piece)
            else:
                start = 0
                for match in self._special.finditer(piece):
                    add(piece[start : match.start()])
                    token = match.group(0)
                    flush(before=token)
                    ids.append(self._special_ids[token])
                    strip_next = token in self._rstrip
                    start = match.end()
                add(piece[start:])
        flush()
        return inside_text

    def _plain_ids(self, text: str) -> list[int]:
        """Ids of text in which no added token is recognised (normalizer + model, the tokenizer's own
        steps for a segment between special tokens)."""
        backend = self._tokenizer.backend_tokenizer
        if backend.pre_tokenizer is not None or backend.normalizer is None:
            return list(self._tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))
        return [token.id for token in backend.model.tokenize(backend.normalizer.normalize_str(text))]

    @property
    def tokenizer(self) -> PreTrainedTokenizerFast:
        return self._tokenizer

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos_token_ids

    def render(
        self,
        messages: Sequence[ChatMessage],
        num_images: int | None = None,
        num_videos: int = 0,
        mark_text: bool = False,
    ) -> str:
        """Templated prompt text with ``<|image_N|>`` and ``<|video_N|>`` placeholders, ending with the
        assistant tag. ``num_images`` is the request's image count; by default, one more than the largest
        attached index."""
        if num_images is None:
            num_images = 1 + max((k for m in messages for k in m.image_indices if isinstance(k, int)), default=-1)
        turns = validated_turns(messages, num_images, num_videos, mark_text)
        return self._tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)

    def encode(
        self,
        messages: Sequence[ChatMessage],
        image_token_counts: Sequence[int],
        allow_special_tokens_in_text: bool = False,
    ) -> list[int]:
        """Prompt ids; image k appears as ``image_token_counts[k]`` copies of ``-(k + 1)``."""
        return self.encode_prompt(messages, image_token_counts, (), allow_special_tokens_in_text).ids

    def encode_prompt(
        self,
        messages: Sequence[ChatMessage],
        image_token_counts: Sequence[int],
        videos: Sequence[VideoFrames] = (),
        allow_special_tokens_in_text: bool = False,
    ) -> EncodedPrompt:
        """Prompt ids with every image and video frame in its slot: slot s (in order of appearance)
        appears as its token count of ``-(s + 1)``. Without videos slot k is image k.

        Special-token strings inside message text ("<|end|>", "<|assistant|>", ...) are tokenized as
        plain text, so no caller can close its turn or open another; the template's own markers stay
        control tokens. `allow_special_tokens_in_text` restores the original processor's behaviour
        (every such string is a control token wherever it comes from). Text without such strings
        tokenizes identically either way."""
        for k, count in enumerate(image_token_counts):
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"image_token_counts[{k}] must be a positive int, got {count!r}")
        marked = not allow_special_tokens_in_text
        text, slots = expand_videos(self.render(messages, len(image_token_counts), len(videos), marked), videos)
        counts = [image_token_counts[k] if kind == "image" else videos[k].frame_tokens[f] for kind, k, f in slots]
        # As Phi3VProcessor: split at every image tag and tokenize each text chunk on its own, each with a
        # BOS, so a <s> also follows every image run. The BOS is added here rather than by the tokenizer's
        # post-processor: transformers 5 reports add_bos_token=False for this tokenizer_config (which says
        # true) and only tokenizer.json's template adds it, so being explicit keeps both versions equal.
        parts = _PLACEHOLDER.split(text)  # [chunk, N, chunk, N, ..., chunk]
        ids: list[int] = []
        inside_text = False  # a message's text may span an image tag, hence across chunks
        for j, part in enumerate(parts):
            if j % 2 == 0:
                ids.append(self._bos_id)
                if marked:
                    inside_text = self._encode_chunk(part, inside_text, ids)
                else:
                    ids.extend(self._tokenizer.encode(part, add_special_tokens=False))
            else:
                n = int(part)
                ids.extend([-n] * counts[n - 1])
        return EncodedPrompt(ids, slots)
