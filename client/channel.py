"""Channel settings shared by the sync and asyncio clients."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

# Images travel inline in Generate and CountTokens requests, so the defaults (4 MiB) are too small.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# round_robin makes `dns:///host:port` spread calls over every address the name resolves to
# (one per pod behind a headless service) instead of pinning the channel to the first one.
_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})

ChannelOptions = Mapping[str, Any] | Iterable[tuple[str, Any]] | None


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
