"""Pure builders of VisionChat request messages: no I/O besides reading image files, no gRPC.

Both clients and the tests build every request through these functions, so what a prompt, a
conversation or a set of keyword arguments turns into is defined once.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visionchat.v1 import visionchat_pb2 as pb

from .types import ImageSource, Video, VideoLike

# 1 MiB keeps every message far below gRPC's default 4 MiB limit while costing few messages.
DEFAULT_CHUNK_SIZE = 1 << 20

# One conversation turn as a caller writes it: {"role": "user", "text": "...", "images": [...]}.
# "images" items are image sources (path/bytes), appended to the request's image list, or ints,
# indices into it; "image_indices" is accepted for ints only, mirroring the proto field.
MessageLike = Mapping[str, Any] | pb.Message
PromptOrMessages = str | Sequence[MessageLike]

_ROLES: dict[str, Any] = {  # visionchat.v1.Role values
    "system": pb.ROLE_SYSTEM,
    "user": pb.ROLE_USER,
    "assistant": pb.ROLE_ASSISTANT,
}
_MESSAGE_KEYS = frozenset({"role", "text", "images", "image_indices"})
# The prompt placeholder of Phi-3.5-vision; N is 1-based. VisionChat's video placeholder likewise.
_IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")
_VIDEO_TAG = re.compile(r"<\|video_(\d+)\|>")


def _checked(source: Any) -> ImageSource:
    if not isinstance(source, (bytes, bytearray, memoryview, str, os.PathLike)):
        raise TypeError(f"image must be a path or bytes, not {source!r}")
    return source if not isinstance(source, (bytearray, memoryview)) else bytes(source)


def read_image(source: ImageSource, what: str = "image") -> bytes:
    """Bytes are taken as an encoded image (or clip); anything else as a path to one."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"{what} must be a path or bytes, not {source!r}")
    return Path(source).read_bytes()


def video_message(video: VideoLike) -> pb.Video:
    """A clip read and its sampling options; unset options are left to the server."""
    v = video if isinstance(video, Video) else Video(video)
    options = pb.VideoOptions(timestamps_in_prompt=v.timestamps_in_prompt)
    if v.num_frames is not None:
        options.num_frames = v.num_frames
    if v.frames_per_second is not None:
        options.frames_per_second = v.frames_per_second
    if v.start_seconds is not None:
        options.start_seconds = v.start_seconds
    if v.end_seconds is not None:
        options.end_seconds = v.end_seconds
    if v.num_crops is not None:
        options.num_crops = v.num_crops
    return pb.Video(data=read_image(v.source, "video"), options=options)


def attach_videos(messages: list[pb.Message], count: int) -> None:
    """Each of `count` videos goes to the user turn whose text names it (``<|video_N|>``), the others
    to the first user turn (the server puts unnamed ones at the turn's start)."""
    attached = {i for m in messages for i in m.video_indices}
    users = [m for m in messages if m.role == pb.ROLE_USER]
    for msg in users:
        for match in _VIDEO_TAG.finditer(msg.text):
            idx = int(match.group(1)) - 1
            if 0 <= idx < count and idx not in attached:
                msg.video_indices.append(idx)
                attached.add(idx)
    rest = [i for i in range(count) if i not in attached]
    if rest:
        if not users:
            raise ValueError("videos were given but the conversation has no user turn to attach them to")
        users[0].video_indices.extend(rest)


def _as_list(images: Any) -> list[Any]:
    # A lone path, bytes object or Video is one item, not a sequence of characters or byte values.
    if isinstance(images, (str, bytes, bytearray, memoryview, os.PathLike, Video)):
        return [images]
    return list(images)


def _role(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return _ROLES[value.lower()]
        except KeyError:
            raise ValueError(f"unknown role {value!r}; expected one of {sorted(_ROLES)}") from None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise TypeError(f"role must be a string or a visionchat.v1.Role value, not {value!r}")


def _index(value: Any, image_count: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"image index must be an int, not {value!r}")
    if not 0 <= value < image_count:
        raise ValueError(f"image index {value} out of range for {image_count} image(s)")
    return value


def build_messages(
    prompt_or_messages: PromptOrMessages,
    images: Sequence[ImageSource] = (),
    *,
    system: str | None = None,
) -> tuple[list[pb.Message], list[ImageSource]]:
    """Messages and the request's full image list (sources, not yet read), in index order.

    A prompt string becomes one user turn carrying all `images`. For a list of turns, images are
    attached where the turns say (ints in "images"/"image_indices", inline sources, or a
    `<|image_N|>` tag in a user turn's text); any of `images` still unattached then goes to the
    first user turn, which is where a single-image conversation puts it. proto Message objects
    pass through unchanged and unchecked, so tests can send what this helper would refuse.
    """
    images = _as_list(images)
    all_images: list[ImageSource] = [_checked(s) for s in images]
    messages: list[pb.Message] = []
    if system is not None:
        messages.append(pb.Message(role=pb.ROLE_SYSTEM, text=system))

    if isinstance(prompt_or_messages, str):
        messages.append(pb.Message(role=pb.ROLE_USER, text=prompt_or_messages, image_indices=range(len(images))))
        return messages, all_images

    if isinstance(prompt_or_messages, Mapping):
        raise TypeError("pass a list of messages, not a single message mapping")

    # First pass: explicit attachments; inline sources extend the image list, so ints can only be
    # range-checked once every turn has been seen.
    pending_ints: list[tuple[pb.Message, list[Any]]] = []
    for item in prompt_or_messages:
        if isinstance(item, pb.Message):
            msg = pb.Message()
            msg.CopyFrom(item)
            messages.append(msg)
            continue
        if not isinstance(item, Mapping):
            raise TypeError(f"message must be a mapping or visionchat.v1.Message, not {item!r}")
        unknown = set(item) - _MESSAGE_KEYS
        if unknown:
            raise ValueError(f"unknown message key(s) {sorted(unknown)}; allowed: {sorted(_MESSAGE_KEYS)}")
        msg = pb.Message(role=_role(item.get("role", "user")), text=item.get("text", ""))
        ints: list[Any] = list(item.get("image_indices", ()))
        for image in _as_list(item.get("images", ())):
            if isinstance(image, int) and not isinstance(image, bool):
                ints.append(image)
            else:
                ints.append(len(all_images))
                all_images.append(_checked(image))
        pending_ints.append((msg, ints))
        messages.append(msg)

    for msg, ints in pending_ints:
        msg.image_indices.extend(_index(i, len(all_images)) for i in ints)

    attached = {i for m in messages for i in m.image_indices}
    user_turns = [m for m, _ in pending_ints if m.role == pb.ROLE_USER]
    for msg in user_turns:
        for match in _IMAGE_TAG.finditer(msg.text):
            idx = int(match.group(1)) - 1
            if 0 <= idx < len(all_images) and idx not in attached:
                msg.image_indices.append(idx)
                attached.add(idx)

    rest = [i for i in range(len(all_images)) if i not in attached]
    if rest:
        first_user = next((m for m in messages if m.role == pb.ROLE_USER), None)
        if first_user is None:
            raise ValueError("images were given but the conversation has no user turn to attach them to")
        first_user.image_indices.extend(rest)
    return messages, all_images


def sampling_params(
    *,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop: str | Iterable[str] | None = None,
    stop_token_ids: Iterable[int] | None = None,
    ignore_eos: bool | None = None,
    logprobs: int | None = None,
    response_format: ResponseFormatLike | None = None,
) -> pb.SamplingParams:
    """None leaves a field unset, i.e. the server default (0 means "default/disabled" in the proto).
    `response_format`: see `response_format_message`."""
    params = pb.SamplingParams()
    if max_new_tokens is not None:
        params.max_new_tokens = max_new_tokens
    if temperature is not None:
        params.temperature = temperature
    if top_p is not None:
        params.top_p = top_p
    if top_k is not None:
        params.top_k = top_k
    if repetition_penalty is not None:
        params.repetition_penalty = repetition_penalty
    if seed is not None:
        params.seed = seed
    if stop is not None:
        # A bare string is one stop string, not a list of one-character stops.
        params.stop.extend([stop] if isinstance(stop, str) else stop)
    if stop_token_ids is not None:
        params.stop_token_ids.extend(stop_token_ids)
    if ignore_eos is not None:
        params.ignore_eos = ignore_eos
    if logprobs is not None:
        params.logprobs = logprobs
    if response_format is not None:
        params.response_format.CopyFrom(response_format_message(response_format))
    return params


# {"json_schema": dict or JSON text} | {"json_object": True} | {"regex": str} | {"choice": [str, ...]}
# | {"lark_grammar": str}, or the proto message itself.
ResponseFormatLike = Mapping[str, Any] | pb.ResponseFormat


def response_format_message(fmt: ResponseFormatLike) -> pb.ResponseFormat:
    """The proto of a response format given as a one-key mapping (or the message itself)."""
    if isinstance(fmt, pb.ResponseFormat):
        return fmt
    if not isinstance(fmt, Mapping) or len(fmt) != 1:
        raise TypeError(f"response_format must be a one-key mapping or visionchat.v1.ResponseFormat, not {fmt!r}")
    ((kind, value),) = fmt.items()
    if kind == "json_schema":
        return pb.ResponseFormat(json_schema=value if isinstance(value, str) else json.dumps(value))
    if kind == "json_object":
        return pb.ResponseFormat(json_object=pb.JsonObject())
    if kind == "choice":
        if isinstance(value, str):
            raise TypeError("choice takes a list of strings, not one string")
        return pb.ResponseFormat(choice=pb.Choice(options=list(value)))
    if kind == "regex":
        return pb.ResponseFormat(regex=str(value))
    if kind == "lark_grammar":
        return pb.ResponseFormat(lark_grammar=str(value))
    kinds = "json_schema, json_object, regex, choice or lark_grammar"
    raise ValueError(f"unknown response_format kind {kind!r}; expected {kinds}")


def image_options(num_crops: int | None = None) -> pb.ImageOptions:
    options = pb.ImageOptions()
    if num_crops is not None:
        options.num_crops = num_crops
    return options


def _chunks(data: bytes, chunk_size: int) -> Iterator[bytes]:
    view = memoryview(data)
    for offset in range(0, max(len(view), 1), chunk_size):
        yield bytes(view[offset : offset + chunk_size])


def chat_request_stream(
    start: pb.ChatStart,
    images: Sequence[bytes],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    videos: Sequence[bytes] = (),
) -> Iterator[pb.ChatRequest]:
    """start, then every image in chunk_size pieces (image by image), then every video's, then
    end_of_input.

    `start.image_count` is sent as given, even if it disagrees with `images`, so that tests can
    exercise the server's checks. An empty image or video still gets one (empty) chunk, so the server
    sees every announced index.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, not {chunk_size!r}")
    yield pb.ChatRequest(start=start)
    for index, data in enumerate(images):
        for chunk in _chunks(data, chunk_size):
            yield pb.ChatRequest(image_chunk=pb.ImageChunk(image_index=index, data=chunk))
    for index, data in enumerate(videos):
        for chunk in _chunks(data, chunk_size):
            yield pb.ChatRequest(video_chunk=pb.VideoChunk(video_index=index, data=chunk))
    yield pb.ChatRequest(end_of_input=pb.EndOfInput())


@dataclass(frozen=True)
class PreparedRequest:
    """One logical request, ready to be sent through any of the RPCs."""

    messages: list[pb.Message]
    images: list[bytes]
    sampling: pb.SamplingParams = field(default_factory=pb.SamplingParams)
    image_options: pb.ImageOptions = field(default_factory=pb.ImageOptions)
    request_id: str = ""
    videos: list[pb.Video] = field(default_factory=list)

    @property
    def wants_logprobs(self) -> bool:
        return self.sampling.logprobs > 0

    def chat_start(self) -> pb.ChatStart:
        return pb.ChatStart(
            messages=self.messages,
            sampling=self.sampling,
            image_count=len(self.images),
            image_options=self.image_options,
            request_id=self.request_id,
            videos=[v.options for v in self.videos],
        )

    def chat_requests(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[pb.ChatRequest]:
        return chat_request_stream(self.chat_start(), self.images, chunk_size, [v.data for v in self.videos])

    def generate_request(self) -> pb.GenerateRequest:
        return pb.GenerateRequest(
            messages=self.messages,
            sampling=self.sampling,
            images=self.images,
            image_options=self.image_options,
            request_id=self.request_id,
            videos=self.videos,
        )

    def count_tokens_request(self) -> pb.CountTokensRequest:
        return pb.CountTokensRequest(
            messages=self.messages, images=self.images, image_options=self.image_options, videos=self.videos
        )


def prepare_request(
    prompt_or_messages: PromptOrMessages,
    images: Sequence[ImageSource] = (),
    *,
    system: str | None = None,
    num_crops: int | None = None,
    request_id: str | None = None,
    videos: Sequence[VideoLike] = (),
    **sampling: Any,
) -> PreparedRequest:
    """Everything a client method needs; `sampling` takes the keywords of sampling_params()."""
    messages, sources = build_messages(prompt_or_messages, images, system=system)
    videos = _as_list(videos)
    attach_videos(messages, len(videos))
    return PreparedRequest(
        messages=messages,
        images=[read_image(s) for s in sources],
        sampling=sampling_params(**sampling),
        image_options=image_options(num_crops),
        request_id=request_id or "",
        videos=[video_message(v) for v in videos],
    )
