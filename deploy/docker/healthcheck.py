#!/usr/bin/env python3
"""Container health check over the standard gRPC health protocol (grpc.health.v1), like grpc_health_probe.

Docker's HEALTHCHECK runs it inside the container; Kubernetes does not need it (its native `grpc:` probes
speak the same protocol). Exit status 0 when the server answers SERVING, 1 otherwise: NOT_SERVING (still
loading the model, or draining after SIGTERM), an unknown service name, no answer within the timeout.

    python healthcheck.py [--addr HOST:PORT] [--service NAME] [--timeout SECONDS]

The address defaults to the server's own settings: VISIONCHAT_HEALTH_PORT when set (the plaintext
health port of a TLS server), else VISIONCHAT_PORT (50051), on VISIONCHAT_HOST, with a wildcard bind
address (0.0.0.0, ::, empty) replaced by loopback.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_SERVICE = "visionchat.v1.VisionChatService"


def default_address() -> str:
    host = os.environ.get("VISIONCHAT_HOST", "").strip()
    # With TLS on the gRPC port, the plaintext health-only port (VISIONCHAT_HEALTH_PORT) is the one to ask.
    health_port = os.environ.get("VISIONCHAT_HEALTH_PORT", "").strip()
    port = health_port if health_port not in ("", "0") else os.environ.get("VISIONCHAT_PORT", "").strip() or "50051"
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host in ("::", "[::]"):
        host = "[::1]"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def check(address: str, service: str, timeout: float) -> tuple[bool, str]:
    with grpc.insecure_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as error:
            return False, f"{error.code().name}: {error.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", default=default_address(), help="HOST:PORT of the gRPC server")
    parser.add_argument("--service", default=DEFAULT_SERVICE, help='service name to check ("" = whole server)')
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    healthy, status = check(args.addr, args.service, args.timeout)
    print(f"{args.addr} service={args.service!r}: {status}")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
