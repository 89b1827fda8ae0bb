"""Per-host event limits over an hour and a day: how long a subscriber waits before it reads on.

Each window counts events in the last ``seconds`` with ``SLOTS`` sub-buckets (bounded memory:
a few dozen integers per host, whatever the rate), so it is exact to within one slot. When a
window is full, the wait is until enough of its oldest slots have aged out. Limits slow
reading from the host; they never drop an event. The per-second limit stays the subscriber's
token bucket (it allows short bursts); these windows cap the sustained volume on top of it.

Limits of a host: ``events_per_hour`` and ``events_per_day`` (settings) plus the host's
account limit once per hour and ten times per day, so a host allowed more accounts may
write more; a trusted host gets ``trusted_rate_multiplier`` times as much. ``None``: no limit.
The clock and the sleep are injectable, so tests measure a day's window without waiting a day.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import gevent

SLOTS = 60


@dataclass(frozen=True, slots=True)
class WindowLimits:
    per_hour: int | None
    per_day: int | None


def window_limits(per_hour: int | None, per_day: int | None, account_limit: int | None, *,
                  trusted: bool = False, trusted_multiplier: float = 10.0) -> WindowLimits:  # fmt: skip
    """A host's hour and day limits from the base limits, its account limit and whether it is trusted."""
    extra = max(0, account_limit or 0)
    factor = trusted_multiplier if trusted else 1.0

    def scaled(base: int | None, per_account: int) -> int | None:
        return None if not base else int((base + extra * per_account) * factor)

    return WindowLimits(scaled(per_hour, 1), scaled(per_day, 10))


def with_overrides(scaled: WindowLimits, own: WindowLimits) -> WindowLimits:
    """A host's own hour and day limits (an operator's, not scaled) where set, else the scaled ones."""
    return WindowLimits(own.per_hour if own.per_hour is not None else scaled.per_hour,
                        own.per_day if own.per_day is not None else scaled.per_day)  # fmt: skip


class Window:
    """Events counted over the last ``seconds`` in ``SLOTS`` slots; ``limit`` at most."""

    __slots__ = ("_slots", "_total", "limit", "seconds", "slot")

    def __init__(self, limit: int, seconds: float) -> None:
        self.limit = limit
        self.seconds = seconds
        self.slot = seconds / SLOTS
        self._slots: deque[list[int]] | None = None  # [slot index, count], oldest first; made at the first event
        self._total = 0

    def _trim(self, now: float) -> None:
        oldest_live = int((now - self.seconds) // self.slot) + 1
        while self._slots and self._slots[0][0] < oldest_live:
            self._total -= self._slots.popleft()[1]

    def count(self, now: float) -> int:
        self._trim(now)
        return self._total

    def delay(self, now: float) -> float:
        """Seconds until one more event fits (0.0: now)."""
        if self._total < self.limit:  # fits whatever has left the window since (the per-event path)
            return 0.0
        self._trim(now)
        running = self._total
        if running < self.limit:
            return 0.0
        for index, count in self._slots or ():
            running -= count
            if running < self.limit:  # this slot leaves the window when now passes its end + seconds
                return max(0.0, (index + 1) * self.slot + self.seconds - now)
        return 0.0  # pragma: no cover - the loop always ends with running 0 < limit

    def add(self, now: float) -> None:
        index = int(now // self.slot)
        if self._slots is None:  # an idle host's window holds no deque (thousands of idle hosts)
            self._slots = deque()
        if self._slots and self._slots[-1][0] == index:
            self._slots[-1][1] += 1
        else:
            self._trim(now)  # once per slot: what delay() no longer trims on its fast path
            self._slots.append([index, 1])
        self._total += 1


class HostWindows:
    """The hour and day windows of one host; ``wait()`` before each event."""

    def __init__(self, limits: WindowLimits, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], object] = gevent.sleep) -> None:  # fmt: skip
        self.clock = clock
        self.sleep = sleep
        self.windows = [Window(n, s) for n, s in ((limits.per_hour, 3600.0), (limits.per_day, 86400.0)) if n]

    def delay(self) -> float:
        """Seconds until the next event fits every window (0.0: now)."""
        now = self.clock()
        return max((w.delay(now) for w in self.windows), default=0.0)

    def add(self) -> None:
        now = self.clock()
        for window in self.windows:
            window.add(now)

    def wait(self, max_sleep: float | None = None) -> float:
        """Sleep until the next event fits every window, then count it; the seconds waited.

        With ``max_sleep``, return 0 after sleeping that long at most without counting anything:
        the caller asks again (and may have new limits by then).
        """
        waited = 0.0
        while True:
            delay = self.delay()
            if delay <= 0:
                self.add()
                return waited
            if max_sleep is not None and delay > max_sleep:
                self.sleep(max_sleep)
                return -1.0
            self.sleep(delay)
            waited += delay
