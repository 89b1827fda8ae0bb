"""One subscriber per upstream PDS: reads its firehose, verifies each event, tells the sequencer.

Not a pykka actor: its reader greenlet is its only greenlet (an actor's own greenlet would idle
on an inbox for every host, about 10 KiB each), and ``start``/``tell``/``stop``/``is_alive``
give its supervisor the actor surface it uses. A ``tell`` is handled at once in the caller's
greenlet (the only message, new limits, only stores fields, without yielding).

It keeps per-account order (one host's events are handled one at a time), respects a bound
on the sequencer's inbox (it stops reading instead of growing memory), rate-limits the host,
reconnects with backoff and resumes from the last upstream seq. Bad frames and invalid events are counted and dropped;
a bug in the reader stops the subscriber and is told to the supervisor (``ChildFailed``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import gevent

from actors import tracing
from actors.account_announce import announcement
from actors.accounts import AccountState
from actors.host_activity import HostActivity, HostLink
from actors.host_events import host_changed
from actors.host_heartbeat import Heartbeat
from actors.host_progress import HostProgress
from actors.host_rate import HostWindows, WindowLimits, window_limits, with_overrides
from actors.lookahead import LookAhead
from actors.messages import AdvanceCursor, ChildFailed, HostGaveUp, MovedHint, PersistEvent
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
from actors.token_bucket import TokenBucket
from actors.verify import Accepted, HostContext, Verifier
from actors.wsclient import WebSocketClient, WebSocketError
from config.settings import Settings
from protocol.errors import ProtocolError
from protocol.frames import ErrorFrame, InfoEvent, decode_frame, encode_frame, event_type, peek_did, peek_seq
from store.accounts import THROTTLED
from store.db import TRANSIENT_DB_ERRORS

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
    stall_seconds: float = 60.0  # the supervisor reconnects a host whose reader is stuck on one frame this long
    activity: HostActivity | None = None  # where connection state and last frames are shown (idle status)
    events_per_hour: int | None = None  # base hour and day windows (actors.host_rate); None: no limit
    events_per_day: int | None = None
    trusted_rate_multiplier: float = 10.0
    heartbeat: Heartbeat = field(default_factory=Heartbeat)  # pings and idle cursors of every connected host
    lookahead: LookAhead | None = None  # look-ups of DIDs in frames read ahead (actors.lookahead); None: none

    @classmethod
    def from_settings(
        cls, settings: Settings, activity: HostActivity | None = None, lookahead: LookAhead | None = None
    ) -> SubscriberConfig:
        return cls(
            lookahead=lookahead,
            max_frame_bytes=settings.max_frame_bytes,
            max_ops=settings.max_commit_ops,
            max_queue=max(1000, settings.host_inflight_events * 4),
            cursor_flush_seconds=settings.cursor_flush_seconds,
            idle_timeout_seconds=settings.upstream_idle_timeout_seconds,
            ping_seconds=settings.upstream_idle_timeout_seconds / 3,
            max_failures=settings.upstream_max_failures,
            insecure=settings.allow_insecure_hosts,
            outbound=OutboundClient.from_settings(settings),
            stall_seconds=settings.host_stall_seconds,
            activity=activity,
            events_per_hour=settings.default_host_events_per_hour or None,
            events_per_day=settings.default_host_events_per_day or None,
            trusted_rate_multiplier=settings.trusted_host_rate_multiplier,
        )


WINDOW_RECHECK_SECONDS = 1.0  # a host held by its hour or day window looks at its limits again this often
YIELD_EVERY_SECONDS = 0.002  # longest a subscriber runs before letting other greenlets in
BUG_LOG_INTERVAL_SECONDS = 300.0  # a traceback per host and reason at most this often


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


class HostSubscriber:
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
        progress: HostProgress | None = None,
        trusted: bool = False,
        own_windows: WindowLimits | None = None,
    ) -> None:
        self.own_windows = own_windows or WindowLimits(None, None)  # set by an operator: they win over the defaults
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
        self._ahead: deque[tuple[bytes, float]] = deque()  # frames read ahead (actors.lookahead), oldest first
        self._ahead_bytes = 0
        self._ahead_error: WebSocketError | None = None  # met reading ahead: raised once those frames are done
        self._stopping = False
        self._alive = True
        self._last_advance = time.monotonic()
        self._advanced = cursor  # the last cursor told to the sequencer
        self._last_yield = time.monotonic()
        self.connected = False
        self.progress = progress if progress is not None else HostProgress()
        self._bug_logged: dict[str, float] = {}  # reason -> monotonic time of its last traceback
        self._link = HostLink()  # replaced by the shared one on connection (config.activity)
        self._failures = 0  # consecutive failed connections (restarts at 0 with the actor)
        self.stats = {"received": 0, "accepted": 0, "dropped": 0, "reconnects": 0}
        self._client: WebSocketClient | None = None  # the open connection, pinged by the shared heartbeat
        self._next_ping = 0.0
        self._pinging = False

    def _windows(self, config: SubscriberConfig, account_limit: int | None) -> HostWindows:
        limits = window_limits(config.events_per_hour, config.events_per_day, account_limit,
                               trusted=self.trusted, trusted_multiplier=config.trusted_rate_multiplier)  # fmt: skip
        return HostWindows(with_overrides(limits, self.own_windows))

    # -- life cycle (the part of pykka's actor surface the supervisor uses) ------------------------
    @classmethod
    def start(cls, **kwargs: Any) -> HostSubscriber:
        """A running subscriber (its reader started); it is its own reference."""
        subscriber = cls(**kwargs)
        subscriber.on_start()
        return subscriber

    def is_alive(self) -> bool:
        return self._alive

    def tell(self, message: Any) -> None:
        """Handled now, in the caller's greenlet; ignored once stopped (the supervisor checks first)."""
        if not self._alive:
            return
        try:
            self.on_receive(message)
        except Exception as exc:  # as an actor's failure: stop and tell the supervisor
            log.exception("host subscriber failed host=%s", self.host.hostname)
            self._failed(exc)

    def stop(self, block: bool = True, timeout: float | None = None) -> None:
        """Stop the reader; the last cursor is told to the sequencer (at once when ``block``)."""
        if not self._alive:
            return
        self._alive = False
        self._stopping = True
        if self._reader is not None and self._reader is not gevent.getcurrent():
            if block:
                self._reader.kill(block=True, timeout=timeout if timeout is not None else 5)
            else:
                self._reader.kill(block=False)  # its session's finally tells the cursor
        if block:
            self._advance(force=True)

    def on_start(self) -> None:
        self._reader = gevent.spawn(self._run)
        self.progress.reader = self._reader

    def _failed(self, exception: BaseException) -> None:
        if not self._alive:
            return
        self._alive = False
        self._stopping = True
        if self._reader is not None and self._reader is not gevent.getcurrent():
            self._reader.kill(block=False)
        self.parent.tell(ChildFailed(self.host.hostname, repr(exception)))

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, SetSubscriberLimits):  # an operator changed them (already in SQL)
            self.host = dataclasses.replace(self.host, account_limit=message.account_limit)
            self.bucket = TokenBucket(message.events_per_second)
            self.own_windows = WindowLimits(message.events_per_hour, message.events_per_day)
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
            self._failed(RuntimeError(f"subscriber reader crashed: {exc!r}"))  # the supervisor decides

    def _loop(self) -> None:
        while not self._stopping:
            good = self._session()
            if self._stopping:
                return
            failures = self._failures = 0 if good else self._failures + 1
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
        heartbeat = self.config.heartbeat
        try:
            client.connect()
            if self.cursor < 0:
                # read live: from now on everything after seq 0 is ours, so a restart before the
                # host's first event resumes from 0 instead of live again (no event is lost)
                self.cursor = start_cursor = 0
                self._advance(force=True)
            self.connected = True
            if self.config.activity is not None:
                self._link = self.config.activity.connected(self.host.host_id)
            UPSTREAM_CONNECTED.inc()
            log.info("upstream connected host=%s cursor=%d", self.host.hostname, self.cursor)
            if self._failures:
                host_changed("reconnected", self.host.hostname, limited=False, failures=self._failures)
            self._client, self._next_ping = client, time.monotonic() + self.config.ping_seconds
            heartbeat.add(self, min(self.config.ping_seconds, self.config.cursor_flush_seconds))
            while not self._stopping:
                if self._ahead:
                    data, received_at = self._next_ahead()
                elif self._ahead_error is not None:
                    raise self._ahead_error
                else:
                    data, received_at = client.recv(), time.time()
                self.progress.begin()
                try:
                    self._handle(data, received_at)
                finally:
                    self.progress.done()
        except WebSocketError as exc:
            UPSTREAM_RECONNECTS.labels(exc.reason).inc()
            host_changed("disconnected", self.host.hostname, reason=exc.reason, detail=repr(str(exc)))
        except Reconnect as exc:
            UPSTREAM_RECONNECTS.labels("requested").inc()
            log.info("upstream reconnecting host=%s detail=%s", self.host.hostname, exc)
        finally:
            heartbeat.discard(self)
            self._client = None
            self._drop_ahead()  # read again after the reconnect: the cursor is before them
            if self.connected:
                if self.config.activity is not None:
                    self.config.activity.disconnected(self.host.host_id)
                UPSTREAM_CONNECTED.dec()
                self.connected = False
            client.close()
            self._advance(force=True)
        return self.cursor != start_cursor

    def beat(self, now: float) -> None:
        """From the shared heartbeat (never blocks): save an idle cursor, ping the upstream when due.

        Dead connections show as read timeouts; the ping makes a live but silent upstream
        answer. It is sent from a short-lived greenlet (a full socket would block it), one at a time.
        """
        self._advance()  # trailing dropped events move the cursor too
        client = self._client
        if client is not None and now >= self._next_ping and not self._pinging:
            self._next_ping = now + self.config.ping_seconds
            self._pinging = True
            gevent.spawn(self._ping, client)

    def _ping(self, client: WebSocketClient) -> None:
        try:
            client.ping(b"skyrelay")
        except WebSocketError:
            pass  # the reader sees the broken connection
        finally:
            self._pinging = False

    def _drop(self, reason: str, seq: int | None, did: str | None, detail: str = "") -> None:
        self.stats["dropped"] += 1
        EVENTS_DROPPED.labels(self.host.hostname, reason).inc()
        log.info("event dropped host=%s reason=%s seq=%s did=%s %s", self.host.hostname, reason, seq, did, detail)

    def _bug(self, reason: str, seq: int | None, did: str | None, exc: Exception) -> None:
        """A frame that raised where only typed drops are expected: dropped, traceback logged now and then."""
        now = time.monotonic()
        if now - self._bug_logged.get(reason, float("-inf")) >= BUG_LOG_INTERVAL_SECONDS:
            self._bug_logged[reason] = now
            log.error("upstream frame raised host=%s reason=%s seq=%s did=%s", self.host.hostname, reason, seq, did,
                      exc_info=exc)  # fmt: skip
        self._drop(reason, seq, did, f"{type(exc).__name__}: {str(exc)[:160]}")

    def _next_ahead(self) -> tuple[bytes, float]:
        data, received_at = self._ahead.popleft()
        self._ahead_bytes -= len(data)
        if self.config.lookahead is not None:
            self.config.lookahead.release(len(data))
        return data, received_at

    def _drop_ahead(self) -> None:
        while self._ahead:
            self._next_ahead()
        self._ahead_error = None

    def _read_ahead(self, lookahead: LookAhead) -> None:
        """Read the frames already arrived (never waiting for more) and start look-ups of their DIDs."""
        client = self._client
        while (
            client is not None
            and self._ahead_error is None
            and lookahead.room(self._ahead_bytes, len(self._ahead))
            and client.has_buffered()
        ):
            try:
                data = client.recv()
            except WebSocketError as exc:
                self._ahead_error = exc
                return
            self._ahead.append((data, time.time()))
            self._ahead_bytes += len(data)
            lookahead.hold(len(data))
            did = peek_did(data)
            if did is not None:
                lookahead.offer(did)

    def _handle(self, data: bytes, received_at: float) -> None:
        self._link.last_frame = received_at
        self.stats["received"] += 1
        trace = tracing.start_event() if tracing.ENABLED else None
        try:
            event = decode_frame(data, max_bytes=self.config.max_frame_bytes, max_ops=self.config.max_ops)
        except ProtocolError as exc:
            EVENTS_RECEIVED.labels("invalid").inc()
            self._drop(exc.reason, None, None, str(exc)[:200])
            self._skip_past(peek_seq(data))
            return
        except Exception as exc:  # a parser bug: this frame is dropped, the host goes on
            EVENTS_RECEIVED.labels("invalid").inc()
            seq = peek_seq(data)
            self._bug("parse_error", seq, None, exc)
            self._skip_past(seq)
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
        lookahead = self.config.lookahead
        if did is not None and lookahead is not None and lookahead.missing(did):
            self._read_ahead(lookahead)  # this event waits for its look-up: start the next ones' meanwhile
        if event.seq <= self.cursor:
            self._drop("seq_not_increasing", event.seq, did)
            return
        self.progress.enter("rate_limit")
        self.bucket.wait()
        if trace:
            trace.mark()  # decoded (and rate-limited)
        while self.windows.wait(max_sleep=WINDOW_RECHECK_SECONDS) < 0:
            pass  # held by the hour or day window; new limits (SetSubscriberLimits) apply at the next check
        self.progress.enter("verify")
        try:
            verdict = self.verifier.check(event, self.host)
        except TRANSIENT_DB_ERRORS:
            raise  # the database is down past the retry policy: crash, restart, read this frame again
        except Exception as exc:  # a verifier bug on this event: dropped, the host goes on
            self._bug("verify_error", event.seq, did, exc)
            self._skip_past(event.seq)
            return
        if trace:
            trace.mark()  # verified
        if not isinstance(verdict, Accepted):
            self._drop(verdict.reason, event.seq, did, verdict.detail[:200])
            if verdict.reason == "wrong_host" and did:  # it may have moved to a host we do not follow
                self.sequencer.tell(MovedHint(did))
            self._skip_past(event.seq)
            return
        if verdict.new_account:
            limit = self.host.account_limit
            if limit is not None and self.account_count >= limit:
                self._throttle(verdict.account, event.seq)
                return
            self.account_count += 1
        for warning in verdict.warnings:
            VERIFY_WARNINGS.labels(self.host.hostname, warning).inc()
        if verdict.gap:
            ACCOUNTS_RESYNC.inc()
        self.progress.enter("backpressure")
        self._wait_for_room()
        # from here to the tell nothing yields: a reader killed while it waited for room has
        # changed nothing, and reads the event again after a restart
        self.verifier.accounts.put(verdict.account)
        self.stats["accepted"] += 1
        frame = encode_frame(event, 0)
        if trace:
            tracing.event_handed_over(trace, self.host.host_id, self.host.hostname, event.seq, kind, did)
        self.sequencer.tell(PersistEvent(self.host.host_id, event.seq, kind, frame, verdict.account, received_at))
        # only now is the event processed: a reader stopped before this point (shutdown, a stall
        # restart) leaves the cursor before it, so the event is read again, never skipped
        self.cursor = event.seq
        now = time.monotonic()
        if now - self._last_yield >= YIELD_EVERY_SECONDS:  # let the sequencer and other hosts run
            self._last_yield = now
            gevent.sleep(0)

    def _throttle(self, account: AccountState, seq: int) -> None:
        """A new account past the host's account limit: announced ``throttled``, its events dropped until released.

        It counts towards the host's accounts (as the accounts table does on a restart); raising
        the limit releases it (``Relay.change_limits``), with a re-sync for what it wrote meanwhile.
        """
        self.account_count += 1
        state = account.updated(status=THROTTLED)
        self.verifier.accounts.put(state)  # its later events drop in the verifier (account_throttled)
        self._drop("account_throttled", seq, account.did, "past the host's account limit")
        self._wait_for_room()
        self.sequencer.tell(announcement(state))
        self._skip_past(seq)
        log.info("account throttled host=%s did=%s limit=%s", self.host.hostname, account.did, self.host.account_limit)

    def _skip_past(self, seq: int | None) -> None:
        """A dropped event is processed too: move the cursor past it (told in order, rate-limited)."""
        if seq is not None and seq > self.cursor:
            self.cursor = seq
            self._advance()

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
