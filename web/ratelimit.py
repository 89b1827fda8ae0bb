"""Per-client rate limits for public endpoints: a token bucket per client address, in bounded memory.

``KeyedRateLimiter(per_minute)`` lets each key (a client address) make ``per_minute`` requests
in a burst and then one every ``60 / per_minute`` seconds. At most ``max_keys`` buckets are
kept; the least recently seen key is forgotten first (a forgotten key starts with a full
bucket again, so an attacker cycling through more addresses than ``max_keys`` gains nothing a
larger pool of addresses would not give it anyway). Not thread-safe across real threads; the
web layer runs on greenlets, and ``allow`` does not yield.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

DEFAULT_MAX_KEYS = 10_000


class KeyedRateLimiter:
    """Token buckets keyed by client address."""

    def __init__(
        self, per_minute: int, *, max_keys: int = DEFAULT_MAX_KEYS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1")
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0  # tokens per second
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, stamp)

    def allow(self, key: str) -> float:
        """Take a token for ``key``: 0.0 when allowed, else the seconds until one is available."""
        now = self._clock()
        tokens, stamp = self._buckets.pop(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - stamp) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait
