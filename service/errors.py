"""Request errors shared by the layers below the API; the API turns them into gRPC statuses."""

from __future__ import annotations


class InvalidInput(ValueError):
    """The request itself is wrong; `field` names the request field or server limit at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # raised in pool processes, pickled back
        return (type(self), (self.field, self.message))


class Overloaded(Exception):
    """A bounded queue or budget is full: the request could succeed later."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[type, tuple[str, float]]:
        return (type(self), (str(self), self.retry_after))
