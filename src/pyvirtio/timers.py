"""Timers on a clock of the caller's: what :meth:`DeviceHost.call_later` returns.

The runtime runs them on ``time.monotonic()``; the in-process test harness on a
clock the test advances (:class:`pyvirtio.testing.InMemoryHost`).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

__all__ = ["ScheduledCall", "TimerHeap"]


class ScheduledCall:
    """A callback due at :attr:`when`; :meth:`cancel` keeps it from running."""

    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def __lt__(self, other: ScheduledCall) -> bool:
        return self.when < other.when

    def cancel(self) -> None:
        """Do not call it (nothing if it already ran)."""
        self.cancelled = True


class TimerHeap:
    """Scheduled calls, soonest first."""

    def __init__(self) -> None:
        self._heap: list[ScheduledCall] = []

    def schedule(self, when: float, callback: Callable[[], None]) -> ScheduledCall:
        """Call ``callback`` once the clock reaches ``when``."""
        call = ScheduledCall(when, callback)
        heapq.heappush(self._heap, call)
        return call

    def next_due(self) -> float | None:
        """When the soonest call is due, or ``None`` when none is scheduled."""
        return self._heap[0].when if self._heap else None

    def pending(self) -> int:
        """Scheduled calls not cancelled."""
        return sum(not call.cancelled for call in self._heap)

    def pop_due(self, now: float) -> list[ScheduledCall]:
        """Take the calls due at ``now`` (not cancelled), in due order: the caller runs
        them (and decides what a failing one means)."""
        due = []
        while self._heap and self._heap[0].when <= now:
            call = heapq.heappop(self._heap)
            if not call.cancelled:
                due.append(call)
        return due
