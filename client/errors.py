"""Readable descriptions of gRPC errors, including google.rpc rich-status details."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2, descriptor_pool, message_factory, text_format
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


@dataclass(frozen=True)
class RpcErrorInfo:
    code: grpc.StatusCode
    details: str
    field_violations: list[FieldViolation] = field(default_factory=list)
    # Other google.rpc detail messages, as one-line "TypeName: text" strings.
    other_details: list[str] = field(default_factory=list)

    @property
    def code_name(self) -> str:
        return self.code.name

    def lines(self) -> list[str]:
        out = [f"error: {self.code_name}: {self.details}"]
        # The server's message already says "field: description" for its one violation: not twice.
        out += [
            f"  {v.field}: {v.description}"
            for v in self.field_violations
            if f"{v.field}: {v.description}" != self.details
        ]
        out += [f"  {d}" for d in self.other_details]
        return out


def _rich_status(error: grpc.RpcError) -> status_pb2.Status | None:
    # from_call works for sync errors and for grpc.aio.AioRpcError alike (both expose
    # code()/details()/trailing_metadata() synchronously once the call has failed).
    try:
        return rpc_status.from_call(error)
    except (ValueError, AttributeError, TypeError):
        # A status proto that contradicts the call's own status is still worth reading; the
        # header of the message comes from the call either way.
        for key, value in getattr(error, "trailing_metadata", lambda: None)() or ():
            if key == rpc_status.GRPC_DETAILS_METADATA_KEY:
                try:
                    return status_pb2.Status.FromString(value)
                except Exception:
                    return None
        return None


def describe_rpc_error(error: grpc.RpcError) -> RpcErrorInfo:
    code_fn = getattr(error, "code", None)
    details_fn = getattr(error, "details", None)
    code = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    details = (details_fn() if callable(details_fn) else None) or str(error)
    violations: list[FieldViolation] = []
    others: list[str] = []
    status = _rich_status(error)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [FieldViolation(v.field, v.description) for v in bad.field_violations]
            continue
        name = detail.TypeName()
        others.append(f"{name.rsplit('.', 1)[-1]}: {_unpack_text(detail)}")
    return RpcErrorInfo(code or grpc.StatusCode.UNKNOWN, details, violations, others)


def _unpack_text(detail: any_pb2.Any) -> str:
    # Importing error_details_pb2 registered the standard google.rpc detail types in the pool.
    try:
        descriptor = descriptor_pool.Default().FindMessageTypeByName(detail.TypeName())
    except KeyError:
        return f"<{len(detail.value)} bytes>"
    msg = message_factory.GetMessageClass(descriptor)()
    detail.Unpack(msg)
    return text_format.MessageToString(msg, as_one_line=True)
