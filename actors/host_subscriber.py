"""One actor per upstream PDS: reads its firehose, verifies each event, tells the sequencer.

The reader runs in a greenlet owned by the actor. It keeps per-account order (one host's
events are handled one at a time), respects a bound on the sequencer's inbox (it stops
reading instead of growing memory), rate-limits the host, reconnects with backoff and
resumes from the last upstream seq. Bad frames and invalid events are counted and dropped;
a bug in the reader is re-raised inside the actor so the supervisor sees the failure.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import gevent
import pykka

from actors.host_rate import HostWindows, window_limits
from actors.messages import AdvanceCursor, ChildFailed, HostGaveUp, PersistEvent, SubscriberCrashed
from actors.messages_control import SetSubscriberLimits, unknown_message
from actors.metrics import (
    ACCOUNTS_RESYNC,
    EVENTS_DROPPED,
    EVENTS_RECEIVED,
    UPSTREAM_CONNECTED,
    UPSTREAM_RECONNECTS,
    VERIFY_WARNINGS,
)
from actors.outbound import OutboundClient
from actors.verify import Accepted, HostContext, Verifier
from actors.wsclient import WebSocketClient, WebSocketError
from config.settings import Settings
from protocol.errors import ProtocolError
from protocol.frames import ErrorFrame, InfoEvent, decode_frame, encode_frame, event_type

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SubscriberConfig:
    """Per-relay knobs a subscriber needs (from Settings), passed explicitly."""

    max_frame_bytes: int
    max_ops: int
    max_queue: int  # stop reading while the sequencer's inbox holds more than this
    cursor_flush_seconds: float
    idle_timeout_seconds: float = 90.0
    ping_seconds: float = 30.0
    max_failures: int = 8  # consecutive failed connections before the host is marked offline
    insecure: bool = False
    outbound: OutboundClient | None = None  # None: the default policy of ``insecure``
    events_per_hour: int | None = None  # base hour and day windows (actors.host_rate); None: no limit
    events_per_day: int | None = None
    trusted_rate_multiplier: float = 10.0

    @classmethod
    def from_settings(cls, settings: Settings) -> SubscriberConfig:
        return cls(
            max_frame_bytes=settings.max_frame_bytes,
            max_ops=settings.max_commit_ops,
            max_queue=max(1000, settings.host_inflight_events * 4),
            cursor_flush_seconds=settings.cursor_flush_seconds,
            idle_timeout_seconds=settings.upstream_idle_timeout_seconds,
            ping_seconds=settings.upstream_idle_timeout_seconds / 3,
            max_failures=settings.upstream_max_failures,
            insecure=settings.allow_insecure_hosts,
            outbound=OutboundClient.from_settings(settings),
            events_per_hour=settings.default_host_events_per_hour or None,
            events_per_day=settings.default_host_events_per_day or None,
            trusted_rate_multiplier=settings.trusted_host_rate_multiplier,
        )


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


WINDOW_RECHECK_SECONDS = 1.0  # a host held by its hour or day window looks at its limits again this often
YIELD_EVERY_SECONDS = 0.002  # longest a subscriber runs before letting other greenlets in


@functools.lru_cache(maxsize=16)
def _received(kind: str) -> Any:
    return EVENTS_RECEIVED.labels(kind)


class Reconnect(Exception):
    """The upstream asked us to (error frame) or the connection is unusable."""


def firehose_url(hostname: str, cursor: int, insecure: bool) -> str:
    local = ":" in hostname or hostname == "localhost" or hostname.replace(".", "").isdigit()
    scheme = "ws" if insecure and local else "wss"
    query = f"?cursor={cursor}" if cursor >= 0 else ""
    return f"{scheme}://{hostname}/xrpc/com.atproto.sync.subscribeRepos{query}"


class HostSubscriber(pykka.ThreadingActor):
    def __init__(
        self,
        *,
        host: HostContext,
        cursor: int,
        account_count: int,
        events_per_second: float | None,
        verifier: Verifier,
        sequencer: Any,
        parent: Any,
        config: SubscriberConfig,
        trusted: bool = False,
    ) -> None:
        super().__init__()
        self.host = host
        self.cursor = cursor  # last upstream seq processed (logged or dropped); -1: none yet
        self.account_count = account_count
        self.bucket = TokenBucket(events_per_second)
        self.trusted = trusted
        self.windows = self._windows(config, host.account_limit)
        self.verifier = verifier
        self.sequencer = sequencer
        self.parent = parent
        self.config = config
        self._reader: gevent.Greenlet | None = None
        self._stopping = False
        self._last_advance = time.monotonic()
        self._advanced = cursor  # the last cursor told to the sequencer
        self._last_yield = time.monotonic()
        self.connected = False
        self.stats = {"received": 0, "accepted": 0, "dropped": 0, "reconnects": 0}

    def _windows(self, config: SubscriberConfig, account_limit: int | None) -> HostWindows:
        limits = window_limits(config.events_per_hour, config.events_per_day, account_limit,
                               trusted=self.trusted, trusted_multiplier=config.trusted_rate_multiplier)  # fmt: skip
        return HostWindows(limits)

    # -- actor life cycle ------------------------------------------------------------------------
    def on_start(self) -> None:
        self._reader = gevent.spawn(self._run)

    def on_stop(self) -> None:
        self._stopping = True
        if self._reader is not None:
            self._reader.kill(block=True, timeout=5)
        self._advance(force=True)

    def on_failure(self, exception_type: Any, exception_value: Any, traceback: Any) -> None:
        self._stopping = True
        if self._reader is not None and self._reader is not gevent.getcurrent():
            self._reader.kill(block=False)
        self.parent.tell(ChildFailed(self.host.hostname, repr(exception_value)))

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, SubscriberCrashed):
            raise RuntimeError(f"subscriber reader crashed: {message.error}")
        if isinstance(message, SetSubscriberLimits):  # an operator changed them (already in SQL)
            self.host = dataclasses.replace(self.host, account_limit=message.account_limit)
            self.bucket = TokenBucket(message.events_per_second)
            self.windows = self._windows(self.config, message.account_limit)  # counts start again
            log.info("host limits applied host=%s account_limit=%s events_per_second=%s",
                     self.host.hostname, message.account_limit, message.events_per_second)  # fmt: skip
            return None
        unknown_message("host_subscriber", message)
        return None

    # -- reader greenlet -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except gevent.GreenletExit:
            raise
        except Exception as exc:  # a bug: hand it to the actor so the supervisor decides
            log.exception("subscriber reader crashed host=%s", self.host.hostname)
            self.actor_ref.tell(SubscriberCrashed(repr(exc)))

    def _loop(self) -> None:
        failures = 0
        while not self._stopping:
            good = self._session()
            if self._stopping:
                return
            failures = 0 if good else failures + 1
            self.stats["reconnects"] += 1
            if failures >= self.config.max_failures:
                self.parent.tell(HostGaveUp(self.host.hostname, f"{failures} failed connections"))
                return
            delay = min(60.0, 0.5 * 2**failures) * random.uniform(0.8, 1.2)
            gevent.sleep(delay)

    def _session(self) -> bool:
        """One connection; True when it made progress (the cursor moved).

        A connection that only yields error or info frames is a failed one, so a host that
        answers every connection with an error ends up offline instead of being redialled forever.
        """
        start_cursor = self.cursor
        url = firehose_url(self.host.hostname, self.cursor, self.config.insecure)
        client = WebSocketClient(
            url,
            max_message_bytes=self.config.max_frame_bytes,
            timeout_s=self.config.idle_timeout_seconds,
            outbound=self.config.outbound or OutboundClient.for_settings(self.config.insecure),
        )
        pinger: gevent.Greenlet | None = None
        try:
            client.connect()
            self.connected = True
            UPSTREAM_CONNECTED.inc()
            log.info("upstream connected host=%s cursor=%d", self.host.hostname, self.cursor)
            pinger = gevent.spawn(self._ping_loop, client)
            while not self._stopping:
                self._handle(client.recv())
        except WebSocketError as exc:
            UPSTREAM_RECONNECTS.labels(exc.reason).inc()
            log.info("upstream disconnected host=%s reason=%s detail=%s", self.host.hostname, exc.reason, exc)
        except Reconnect as exc:
            UPSTREAM_RECONNECTS.labels("requested").inc()
            log.info("upstream reconnecting host=%s detail=%s", self.host.hostname, exc)
        finally:
            if pinger is not None:
                pinger.kill(block=False)
            if self.connected:
                UPSTREAM_CONNECTED.dec()
                self.connected = False
            client.close()
            self._advance(force=True)
        return self.cursor != start_cursor

    def _ping_loop(self, client: WebSocketClient) -> None:
        """Ping the upstream (dead connections show as read timeouts) and save an idle cursor."""
        next_ping = time.monotonic() + self.config.ping_seconds
        while True:
            gevent.sleep(min(self.config.ping_seconds, self.config.cursor_flush_seconds))
            self._advance()  # trailing dropped events move the cursor too
            if time.monotonic() >= next_ping:
                next_ping = time.monotonic() + self.config.ping_seconds
                try:
                    client.ping(b"skyrelay")
                except WebSocketError:
                    return

    def _drop(self, reason: str, seq: int | None, did: str | None, detail: str = "") -> None:
        self.stats["dropped"] += 1
        EVENTS_DROPPED.labels(self.host.hostname, reason).inc()
        log.info("event dropped host=%s reason=%s seq=%s did=%s %s", self.host.hostname, reason, seq, did, detail)

    def _handle(self, data: bytes) -> None:
        received_at = time.time()
        self.stats["received"] += 1
        try:
            event = decode_frame(data, max_bytes=self.config.max_frame_bytes, max_ops=self.config.max_ops)
        except ProtocolError as exc:
            EVENTS_RECEIVED.labels("invalid").inc()
            self._drop(exc.reason, None, None, str(exc)[:200])
            return
        if isinstance(event, ErrorFrame):
            if event.error == "FutureCursor":
                log.warning(
                    "upstream says FutureCursor host=%s cursor=%d: resuming live", self.host.hostname, self.cursor
                )
                self.cursor = -1
                self._advanced = -1
                self.sequencer.tell(AdvanceCursor(self.host.host_id, -1, reset=True))
            raise Reconnect(f"error frame {event.error}: {event.message}")
        if isinstance(event, InfoEvent):
            log.info("upstream info host=%s name=%s message=%s", self.host.hostname, event.name, event.message)
            return
        kind = event_type(event)
        _received(kind).inc()
        did = getattr(event, "repo", None) or getattr(event, "did", None)
        if event.seq <= self.cursor:
            self._drop("seq_not_increasing", event.seq, did)
            return
        self.cursor = event.seq
        self.bucket.wait()
        while self.windows.wait(max_sleep=WINDOW_RECHECK_SECONDS) < 0:
            pass  # held by the hour or day window; new limits (SetSubscriberLimits) apply at the next check
        verdict = self.verifier.check(event, self.host)
        if not isinstance(verdict, Accepted):
            self._drop(verdict.reason, event.seq, did, verdict.detail[:200])
            self._advance()
            return
        if verdict.new_account:
            limit = self.host.account_limit
            if limit is not None and self.account_count >= limit:
                self._drop("host_account_limit", event.seq, did)
                self._advance()
                return
            self.account_count += 1
        for warning in verdict.warnings:
            VERIFY_WARNINGS.labels(self.host.hostname, warning).inc()
        if verdict.gap:
            ACCOUNTS_RESYNC.inc()
        self.verifier.accounts.put(verdict.account)
        self.stats["accepted"] += 1
        self._wait_for_room()
        frame = encode_frame(event, 0)
        self.sequencer.tell(PersistEvent(self.host.host_id, event.seq, kind, frame, verdict.account, received_at))
        now = time.monotonic()
        if now - self._last_yield >= YIELD_EVERY_SECONDS:  # let the sequencer and other hosts run
            self._last_yield = now
            gevent.sleep(0)

    def _wait_for_room(self) -> None:
        inbox = self.sequencer.actor_inbox
        while inbox.qsize() > self.config.max_queue and not self._stopping:
            gevent.sleep(0.002)

    def _advance(self, force: bool = False) -> None:
        """Tell the sequencer how far this host is processed (rate-limited unless ``force``)."""
        now = time.monotonic()
        if self.cursor < 0 or self.cursor == self._advanced:
            return
        if force or now - self._last_advance >= self.config.cursor_flush_seconds:
            self._last_advance = now
            self._advanced = self.cursor
            self.sequencer.tell(AdvanceCursor(self.host.host_id, self.cursor))
