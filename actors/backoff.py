"""Backoff for supervised work: restart delays for children, and retries of failing infrastructure.

``Backoff`` is the restart schedule of a supervised child (exponential, jittered, reset once the
child has been healthy for a while). ``retry`` runs one infrastructure operation (a database
write, an event log append) until it succeeds, logging, counting and backing off between
failures, and re-raises once the failure has lasted ``give_up_after_seconds``: that is when an
owning actor escalates to its supervisor (house rule: retry in the owner, then escalate).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import gevent

from actors.metrics import INFRA_FAILING, INFRA_RETRIES

log = logging.getLogger(__name__)
T = TypeVar("T")


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


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How long a failing operation is retried, and how fast."""

    give_up_after_seconds: float = 300.0  # then the failure is re-raised (the owner escalates)
    base_seconds: float = 0.2
    max_seconds: float = 5.0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def retry(
    fn: Callable[[], T],
    *,
    operation: str,
    retry_on: tuple[type[BaseException], ...],
    policy: RetryPolicy,
    repair: Callable[[], None] | None = None,
    sleep: Callable[[float], object] = gevent.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """``fn()``, retried with backoff while it raises one of ``retry_on``; its result.

    Each failure is logged (WARNING, first line of the error) and counted in
    ``skyrelay_infrastructure_retries_total{operation}``; ``skyrelay_infrastructure_failing``
    shows the operations failing right now. ``repair`` runs before each new attempt (a failure
    there counts as one more failed attempt). ``operation`` is a fixed string (a metric label).
    """
    backoff = Backoff(policy.base_seconds, policy.max_seconds, healthy_after_seconds=math.inf)
    first_failure: float | None = None
    try:
        while True:
            try:
                if first_failure is not None and repair is not None:
                    repair()
                result = fn()
            except retry_on as exc:
                now = clock()
                if first_failure is None:
                    first_failure = now
                    INFRA_FAILING.labels(operation).inc()
                if now - first_failure >= policy.give_up_after_seconds:
                    log.error(
                        "infrastructure failure: giving up operation=%s after=%.0fs error=%s",
                        operation,
                        now - first_failure,
                        _first_line(exc),
                    )
                    raise
                delay = backoff.next_delay()
                INFRA_RETRIES.labels(operation).inc()
                log.warning(
                    "infrastructure failure: retrying operation=%s attempt=%d in=%.1fs error=%s",
                    operation,
                    backoff.failures,
                    delay,
                    _first_line(exc),
                )
                sleep(delay)
                continue
            if first_failure is not None:
                log.warning(
                    "infrastructure recovered operation=%s after=%.1fs attempts=%d",
                    operation,
                    clock() - first_failure,
                    backoff.failures + 1,
                )
            return result
    finally:
        if first_failure is not None:
            INFRA_FAILING.labels(operation).dec()


def retry_db(db: Any, fn: Callable[[], T], *, operation: str, policy: RetryPolicy) -> T:
    """``fn()`` (database work) in a connection, in the thread pool, retried while the database fails.

    Off the event loop: SQLite waiting out another writer's lock (busy_timeout) must not freeze
    every greenlet of the relay; on PostgreSQL it costs a thread hop and nothing else.
    """
    from actors.blocking import off_loop
    from store.db import TRANSIENT_DB_ERRORS

    def attempt() -> T:
        with db.connection_context():
            return fn()

    return retry(lambda: off_loop(attempt), operation=operation, retry_on=TRANSIENT_DB_ERRORS, policy=policy)
