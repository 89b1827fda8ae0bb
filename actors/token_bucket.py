"""A token-bucket rate limiter for one upstream host's reader (it sleeps; it never drops)."""

from __future__ import annotations

import time

import gevent


class TokenBucket:
    """Rate limiter: ``rate`` events/s with bursts up to ``burst``; ``wait()`` sleeps as needed."""

    def __init__(self, rate: float | None, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = burst or (max(rate * 2, 10.0) if rate else 0.0)
        self.tokens = self.burst
        self.stamp = time.monotonic()

    def wait(self) -> float:
        if not self.rate:
            return 0.0
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        delay = (1 - self.tokens) / self.rate
        gevent.sleep(delay)
        self.tokens = 0.0
        self.stamp = time.monotonic()
        return delay
