"""gRPC errors with google.rpc details, so clients can tell which field or limit was at fault."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from ..errors import InvalidInput, Overloaded


class ApiError(Exception):
    """Raised inside the API layer; converted to a gRPC status at the edge of each RPC."""

    def __init__(self, status: grpc.Status) -> None:
        super().__init__(status.details)
        self.status = status

    @property
    def code(self) -> grpc.StatusCode:
        return self.status.code


def _status(code: int, message: str, *details: Message) -> grpc.Status:
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=packed))


def invalid_argument(field: str, description: str) -> ApiError:
    detail = error_details_pb2.BadRequest(
        field_violations=[error_details_pb2.BadRequest.FieldViolation(field=field, description=description)]
    )
    return ApiError(_status(code_pb2.INVALID_ARGUMENT, f"{field}: {description}", detail))


def resource_exhausted(message: str, retry_after_seconds: float) -> ApiError:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(retry_after_seconds * 1e9))
    return ApiError(_status(code_pb2.RESOURCE_EXHAUSTED, message, error_details_pb2.RetryInfo(retry_delay=delay)))


def unavailable(message: str) -> ApiError:
    return ApiError(_status(code_pb2.UNAVAILABLE, message))


def deadline_exceeded(message: str) -> ApiError:
    return ApiError(_status(code_pb2.DEADLINE_EXCEEDED, message))


def from_request_error(exc: InvalidInput | Overloaded) -> ApiError:
    """The gRPC status of an error raised below the API layer."""
    if isinstance(exc, InvalidInput):
        return invalid_argument(exc.field, exc.message)
    return resource_exhausted(str(exc), exc.retry_after)
