"""Channel settings shared by the sync and asyncio clients."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

# Images travel inline in Generate and CountTokens requests, so the defaults (4 MiB) are too small.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# round_robin makes `dns:///host:port` spread calls over every address the name resolves to
# (one per pod behind a headless service) instead of pinning the channel to the first one.
_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})

ChannelOptions = Mapping[str, Any] | Iterable[tuple[str, Any]] | None
Metadata = Sequence[tuple[str, str]]


def tls_credentials(
    ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None
) -> grpc.ChannelCredentials:
    """TLS to the server: trust `ca_file` (default: the system roots); with cert and key, present a
    client certificate (mutual TLS)."""
    if bool(cert_file) != bool(key_file):
        raise ValueError("a client certificate needs both its certificate and its key file")
    read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
    return grpc.ssl_channel_credentials(read(ca_file), read(key_file), read(cert_file))


def with_token(metadata: Metadata | None, token: str | None) -> Metadata | None:
    """The call's metadata with `authorization: Bearer <token>` added (when a token is set)."""
    if not token:
        return metadata
    return (*(metadata or ()), ("authorization", f"Bearer {token}"))


def channel_options(overrides: ChannelOptions = None) -> list[tuple[str, Any]]:
    """Defaults first, caller's options replacing defaults of the same name."""
    merged: dict[str, Any] = {
        "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
        "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
        "grpc.service_config": _SERVICE_CONFIG,
    }
    if overrides is not None:
        merged.update(overrides.items() if isinstance(overrides, Mapping) else overrides)
    return list(merged.items())
