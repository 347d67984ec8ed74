"""Errors that concern one request inside a worker."""

from __future__ import annotations


class RequestRefused(ValueError):
    """The request can never run on this worker; the message names the limit and the numbers."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit


class RequestFailed(RuntimeError):
    """Something about one request broke its step (e.g. an image the worker cannot decode)."""

    def __init__(self, request_id: str, message: str) -> None:
        super().__init__(message)
        self.request_id = request_id
