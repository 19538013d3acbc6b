"""The time and the cancellation of one request, checked by the gateway's own loops and steps.

Backend calls get :meth:`Budget.left` (onnxruntime runs are terminated, Triton gets it as a client
timeout); the gateway's own work (decoding, mask projection, every edit of an Intervene) calls
:meth:`Budget.check` between steps and inside loops, so a request whose deadline passed, or whose
client went away, stops within one step instead of running to the end.
"""
from __future__ import annotations

import heapq
import logging
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


class Alarm:
    """``callback()`` once ``seconds`` from now, unless :meth:`cancel` is called first (see :class:`Alarms`)."""

    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback) -> None:
        self.when, self.callback, self.cancelled = when, callback, False

    def cancel(self) -> None:
        self.cancelled = True

    def __lt__(self, other: "Alarm") -> bool:
        return self.when < other.when


class Alarms:
    """One daemon thread that runs the callbacks of all armed :class:`Alarm` s at their time.

    For the deadlines of onnxruntime runs: a ``threading.Timer`` per run started and joined a thread
    each time (0.12 ms a request, measured, and a wake-up of another thread on two cores); here arming
    is a heap push, and the thread is woken only when the new alarm is the earliest. Cancelled alarms
    stay in the heap until their time (lazy deletion), or until they are more than half of it."""

    def __init__(self, clock=time.monotonic) -> None:
        self._clock = clock
        self._heap: list[Alarm] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def arm(self, seconds: float, callback) -> Alarm:
        alarm = Alarm(self._clock() + max(0.0, float(seconds)), callback)
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="salf-alarms", daemon=True)
                self._thread.start()
            earliest = not self._heap or alarm.when < self._heap[0].when
            heapq.heappush(self._heap, alarm)
            if len(self._heap) > 64 and sum(a.cancelled for a in self._heap) > len(self._heap) // 2:
                self._heap = [a for a in self._heap if not a.cancelled]
                heapq.heapify(self._heap)
            if earliest:
                self._cond.notify()
        return alarm

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0].when > self._clock():
                    self._cond.wait(None if not self._heap else self._heap[0].when - self._clock())
                due = heapq.heappop(self._heap)
            if not due.cancelled:
                try:
                    due.callback()
                except Exception:  # a failing callback must not stop every other deadline
                    logging.getLogger(__name__).exception("alarm callback failed")


ALARMS = Alarms()
