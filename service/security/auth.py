"""Authentication and per-RPC permission, enforced by a server interceptor before any handler runs.

A caller is identified by a bearer token (`authorization: Bearer <token>` metadata, checked against
the token file) or, with `--tls-client-auth require` and `--auth-client-cert-tenant`, by its client
certificate (the tenant is the certificate's first DNS SAN, else its subject common name). No
identity: UNAUTHENTICATED; a tenant whose token line does not list the RPC: PERMISSION_DENIED.
Health checks stay open (probes carry no credentials); reflection needs an identity unless
`--auth-open-reflection`. The tenant of the call is then `current_tenant()` for the servicer (logs,
metrics, per-tenant limits): a context variable, i.e. per request task, not global.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc

from .tokens import Tenant, TokenTable

SERVICE_PREFIX = "/visionchat.v1.VisionChatService/"
REFLECTION_PREFIXES = ("/grpc.reflection.v1.ServerReflection/", "/grpc.reflection.v1alpha.ServerReflection/")
ANONYMOUS = "anonymous"  # the tenant of every call when authentication is off

_tenant: ContextVar[str] = ContextVar("visionchat_tenant", default=ANONYMOUS)


def current_tenant() -> str:
    return _tenant.get()


def rpc_of(method: str) -> str | None:
    """The permission name of a full method name; None for what stays open (health)."""
    if method.startswith(SERVICE_PREFIX):
        return method.removeprefix(SERVICE_PREFIX)
    if method.startswith(REFLECTION_PREFIXES):
        return "Reflection"
    return None


@dataclass(frozen=True)
class Refusal:
    code: grpc.StatusCode
    message: str


class Authenticator:
    def __init__(self, tokens: TokenTable | None, cert_tenants: bool, open_reflection: bool) -> None:
        self.tokens = tokens
        self.cert_tenants = cert_tenants
        self.open_reflection = open_reflection

    def identify(self, rpc: str, metadata: dict[str, str], auth_context: dict[str, list[bytes]]) -> Tenant | Refusal:
        tenant = self._tenant(metadata, auth_context)
        if isinstance(tenant, Refusal):
            if rpc == "Reflection" and self.open_reflection:
                return Tenant(ANONYMOUS, None)
            return tenant
        if not tenant.may_call(rpc):
            return Refusal(grpc.StatusCode.PERMISSION_DENIED, f"tenant {tenant.name!r} may not call {rpc}")
        return tenant

    def _tenant(self, metadata: dict[str, str], auth_context: dict[str, list[bytes]]) -> Tenant | Refusal:
        header = metadata.get("authorization", "")
        if header:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return Refusal(grpc.StatusCode.UNAUTHENTICATED, "the authorization metadata must be 'Bearer <token>'")
            if self.tokens is not None:
                found = self.tokens.tenant(token.strip())
                if found is None:
                    return Refusal(grpc.StatusCode.UNAUTHENTICATED, "the bearer token is not valid")
                return found
        if self.cert_tenants:
            names = auth_context.get("x509_subject_alternative_name") or auth_context.get("x509_common_name") or []
            if names:
                return Tenant(names[0].decode("utf-8", "replace"), None)
        return Refusal(grpc.StatusCode.UNAUTHENTICATED, "no credentials: send 'authorization: Bearer <token>' metadata")


Behavior = Callable[..., Any]


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Wraps each protected method's handler so that it identifies the caller first."""

    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        rpc = rpc_of(handler_call_details.method)
        if handler is None or rpc is None:
            return handler
        return _guarded(handler, lambda context: self._admit(rpc, context))

    def _admit(self, rpc: str, context: grpc.aio.ServicerContext) -> Refusal | None:
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        found = self.authenticator.identify(rpc, metadata, dict(context.auth_context() or {}))
        if isinstance(found, Refusal):
            return found
        _tenant.set(found.name)
        return None


def _guarded(handler: grpc.RpcMethodHandler, admit: Callable[[Any], Refusal | None]) -> grpc.RpcMethodHandler:
    """The same handler, with `admit` run in the call's task before the method."""

    def wrap_unary(behavior: Behavior) -> Behavior:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            refusal = admit(context)
            if refusal is not None:
                await context.abort(refusal.code, refusal.message)
            return await behavior(request, context)

        return call

    def wrap_stream(behavior: Behavior) -> Behavior:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            refusal = admit(context)
            if refusal is not None:
                await context.abort(refusal.code, refusal.message)
            async for item in behavior(request, context):
                yield item

        return call

    kinds: dict[tuple[bool, bool], tuple[str, Callable[..., grpc.RpcMethodHandler], Callable[[Behavior], Behavior]]] = {
        (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler, wrap_unary),
        (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler, wrap_stream),
        (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler, wrap_unary),
        (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler, wrap_stream),
    }
    name, make, wrap = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(
        wrap(getattr(handler, name)),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
