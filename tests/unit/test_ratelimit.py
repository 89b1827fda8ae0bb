"""KeyedRateLimiter: bursts, refill, independent keys, bounded memory."""

from __future__ import annotations

import pytest

from web.ratelimit import KeyedRateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_then_one_per_interval() -> None:
    clock = Clock()
    limiter = KeyedRateLimiter(6, clock=clock)  # one every 10 s
    assert [limiter.allow("a") for _ in range(6)] == [0.0] * 6
    assert limiter.allow("a") == pytest.approx(10.0)
    clock.now += 10.0
    assert limiter.allow("a") == 0.0
    assert limiter.allow("a") > 0.0


def test_keys_are_independent_and_memory_is_bounded() -> None:
    clock = Clock()
    limiter = KeyedRateLimiter(1, max_keys=3, clock=clock)
    assert limiter.allow("a") == 0.0
    assert limiter.allow("a") > 0.0
    assert limiter.allow("b") == 0.0
    for key in ("c", "d", "e"):
        limiter.allow(key)
    assert len(limiter._buckets) == 3
    assert limiter.allow("a") == 0.0  # forgotten: a fresh bucket
