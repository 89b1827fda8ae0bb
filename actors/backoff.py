"""Restart schedule for supervised children: exponential backoff with jitter, reset on health."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class Backoff:
    base_seconds: float = 1.0
    max_seconds: float = 300.0
    healthy_after_seconds: float = 60.0  # a child that ran this long restarts from base again
    failures: int = 0
    started_at: float = field(default_factory=time.monotonic)

    def started(self) -> None:
        self.started_at = time.monotonic()

    def next_delay(self) -> float:
        """Seconds to wait before the next restart (and count this failure)."""
        if time.monotonic() - self.started_at >= self.healthy_after_seconds:
            self.failures = 0
        self.failures += 1
        delay = min(self.max_seconds, self.base_seconds * 2 ** (self.failures - 1))
        return delay * random.uniform(0.75, 1.25)
