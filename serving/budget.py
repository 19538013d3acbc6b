"""The time and the cancellation of one request, checked by the gateway's own loops and steps.

Backend calls get :meth:`Budget.left` (onnxruntime runs are terminated, Triton gets it as a client
timeout); the gateway's own work (decoding, mask projection, every edit of an Intervene) calls
:meth:`Budget.check` between steps and inside loops, so a request whose deadline passed, or whose
client went away, stops within one step instead of running to the end.
"""
from __future__ import annotations

import threading
import time

from .errors import Cancelled, DeadlineExceeded


class Budget:
    """``timeout_s`` seconds from now (None: no deadline) and a cancellation flag."""

    def __init__(self, timeout_s: float | None = None) -> None:
        self.deadline = None if timeout_s is None else time.monotonic() + float(timeout_s)
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def check(self, step: str = "the request") -> None:
        """Raise :class:`Cancelled` or :class:`DeadlineExceeded` when the request must stop now."""
        if self._cancelled.is_set():
            raise Cancelled(f"{step} stopped: the call was cancelled")
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise DeadlineExceeded(f"{step} stopped: the request's deadline passed")

    def left(self, step: str = "the request") -> float | None:
        """Seconds left for a backend call (None: no deadline), after :meth:`check`."""
        self.check(step)
        return None if self.deadline is None else self.deadline - time.monotonic()


def as_budget(timeout_s: "float | Budget | None") -> Budget:
    return timeout_s if isinstance(timeout_s, Budget) else Budget(timeout_s)
