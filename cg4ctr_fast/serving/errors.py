"""The serving errors, each with the HTTP status `cg4ctr serve` answers it with.

Importable with no heavy dependency, so the HTTP layer and embedders can catch them without loading models.
`InputError` (cg4ctr_fast.errors) stays the bad-input error: HTTP 400 with its one line.
"""
from __future__ import annotations

from cg4ctr_fast.errors import InputError

__all__ = ["QueueFull", "DeadlineExceeded", "RuntimeClosed", "NotFound", "InputError"]


class QueueFull(RuntimeError):
    """The bounded request queue is full; retry later (HTTP 503 with Retry-After)."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(TimeoutError):
    """The request's deadline passed before its work started; it was never run (HTTP 504)."""


class RuntimeClosed(RuntimeError):
    """The runtime is draining or closed and takes no new work (HTTP 503)."""


class NotFound(InputError):
    """An unknown product id or creative id (HTTP 404)."""
