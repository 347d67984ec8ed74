"""`sampling.response_format` of a request: checked for size and shape here; whether the grammar itself
is usable is known only once llguidance has read it (the preprocessing pool does, see Preparer)."""

from __future__ import annotations

import json

from visionchat.v1 import visionchat_pb2 as pb

from ..structured import ResponseFormat, choice_format
from .errors import invalid_argument

FIELD = "sampling.response_format"
MAX_SPEC_BYTES = 64 * 1024  # a schema or grammar larger than this is not a response format but an attack
MAX_CHOICES = 1024


def response_format(sampling: pb.SamplingParams) -> ResponseFormat | None:
    if not sampling.HasField("response_format"):
        return None
    fmt = sampling.response_format
    kind = fmt.WhichOneof("format")
    if kind is None:
        raise invalid_argument(FIELD, "set one of json_schema, json_object, regex, choice or lark_grammar")
    field = f"{FIELD}.{kind}"
    if kind == "json_object":
        return ResponseFormat("json_object", "")
    if kind == "choice":
        options = list(fmt.choice.options)
        if not options:
            raise invalid_argument(field, "give at least one option")
        if len(options) > MAX_CHOICES:
            raise invalid_argument(field, f"{len(options)} options exceed the limit of {MAX_CHOICES}")
        result = choice_format(options)
    else:
        spec = getattr(fmt, kind)
        if not spec:
            raise invalid_argument(field, "is empty")
        if kind == "json_schema":
            try:
                json.loads(spec)
            except ValueError as exc:
                raise invalid_argument(field, f"is not JSON: {exc}") from exc
        result = ResponseFormat("lark" if kind == "lark_grammar" else kind, spec)
    size = len(result.spec.encode("utf-8"))
    if size > MAX_SPEC_BYTES:
        raise invalid_argument(field, f"{size} bytes exceed the limit of {MAX_SPEC_BYTES} bytes")
    return result
