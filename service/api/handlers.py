"""The service's method handlers, with request parsing that cannot fail the RPC as UNKNOWN.

grpcio's generated registration parses request bytes with `FromString`; bytes that are not the
message (corrupt wire format, invalid UTF-8 in a string field) then end the call as UNKNOWN with a
traceback in the log. Here a parse failure becomes a `Malformed` value that the servicer answers
with INVALID_ARGUMENT naming the message type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message
from visionchat.v1 import visionchat_pb2 as pb

SERVICE = "visionchat.v1.VisionChatService"


@dataclass(frozen=True)
class Malformed:
    message_type: str
    error: str

    @property
    def description(self) -> str:
        return f"the request is not a valid {self.message_type}: {self.error}"


def parser(message_type: type[Message]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Message | Malformed:
        try:
            return message_type.FromString(data)
        except (DecodeError, ValueError, RuntimeError) as exc:
            return Malformed(message_type.DESCRIPTOR.full_name, str(exc))

    return parse


def service_handler(servicer: Any) -> grpc.GenericRpcHandler:
    """visionchat.v1.VisionChatService's handlers around `servicer`'s four methods."""
    handlers = {
        "Chat": grpc.stream_stream_rpc_method_handler(
            servicer.Chat,
            request_deserializer=parser(pb.ChatRequest),
            response_serializer=pb.ChatResponse.SerializeToString,
        ),
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate,
            request_deserializer=parser(pb.GenerateRequest),
            response_serializer=pb.GenerateResponse.SerializeToString,
        ),
        "CountTokens": grpc.unary_unary_rpc_method_handler(
            servicer.CountTokens,
            request_deserializer=parser(pb.CountTokensRequest),
            response_serializer=pb.CountTokensResponse.SerializeToString,
        ),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo,
            request_deserializer=parser(pb.GetModelInfoRequest),
            response_serializer=pb.GetModelInfoResponse.SerializeToString,
        ),
    }
    return grpc.method_handlers_generic_handler(SERVICE, handlers)
