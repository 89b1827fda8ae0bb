"""A fan-out node's one upstream subscriber: store each upstream frame under its exact seq, then broadcast it.

``FanoutUpstream`` follows one relay's ``subscribeRepos`` (no verification: the relay did it)
and is the only writer of the node's event log. Its reader greenlet checks each frame only as
far as it must: two DAG-CBOR maps, a message header, an integer ``seq`` above the last one
stored. It queues the frame's bytes unchanged; the writer greenlet appends what is queued in
one batch, fsyncs, then tells the ``Broadcaster``, exactly as the relay's sequencer does.

- Resumes with ``cursor`` = the last seq queued (0 for an empty log: the upstream's whole window).
- ``#info OutdatedCursor`` from upstream: logged and counted; if the log already held events,
  the hole up to the next event is recorded *in the log* as an ``#info OutdatedCursor`` frame
  under the seq just before that event, so a consumer replaying across it, or asking for a
  cursor inside it, is told; never a silent loss.
- Garbage frames and bad seqs are dropped and counted; a seq that does not increase is dropped
  and counted and the connection is redialled from the node's cursor (the stream is out of step).
- An error frame (``FutureCursor``: the upstream is behind this node) or a silent upstream
  (no frame, not even a pong, for ``idle_timeout_seconds``) ends the connection; every
  reconnect waits ``actors.backoff.Backoff``.
- A poller reads the upstream's newest seq (``actors.fanout_status``) for the lag metric.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import gevent
import gevent.queue
import pykka

from actors.backoff import Backoff
from actors.blocking import off_loop
from actors.fanout_status import UpstreamStatus, fetch_head, http_base
from actors.messages_broadcast import Broadcast
from actors.metrics import LAST_SEQ
from actors.metrics_fanout import (
    EVENTS_STORED,
    FRAMES_DROPPED,
    GAP_SEQS,
    GAPS,
    LAG_SECONDS,
    LAG_SEQS,
    OUTDATED_CURSOR,
    UPSTREAM_CONNECTED,
    UPSTREAM_RECONNECTS,
)
from actors.outbound import OutboundClient
from actors.wsclient import WebSocketClient, WebSocketError
from protocol.errors import ProtocolError
from protocol.frames import info_frame, split_frame
from store.eventlog import EventLog, LogRecord

log = logging.getLogger(__name__)

SUBSCRIBE_PATH = "/xrpc/com.atproto.sync.subscribeRepos"
QUEUE_FRAMES = 2000  # frames read but not yet written; the reader stops reading beyond it
BATCH_FRAMES = 1000  # frames appended and fsynced at once, at most
PRUNE_INTERVAL_SECONDS = 60.0
YIELD_EVERY_SECONDS = 0.002
STOP_DRAIN_SECONDS = 10.0
MAX_SEQ = 2**63 - 1


@dataclass(frozen=True, slots=True)
class FanoutConfig:
    upstream: str  # ws(s)://host[:port], no path
    max_frame_bytes: int
    idle_timeout_seconds: float
    poll_seconds: float
    backoff_base_seconds: float = 0.5
    backoff_max_seconds: float = 30.0


class _Reconnect(Exception):
    """End this connection and dial again (after the backoff)."""


@dataclass(frozen=True, slots=True)
class _Crashed:
    error: str


class FanoutUpstream(pykka.ThreadingActor):
    def __init__(
        self,
        event_log: EventLog,
        broadcaster: Any,
        config: FanoutConfig,
        status: UpstreamStatus,
        outbound: OutboundClient | None = None,
    ) -> None:
        super().__init__()
        # the upstream relay is operator configuration: its address is trusted, like plc_url
        self.outbound = (outbound or OutboundClient.for_settings(insecure=False)).trusting(config.upstream)
        self.log = event_log
        self.broadcaster = broadcaster
        self.config = config
        self.status = status
        self._cursor = event_log.last_seq  # last seq queued for the log
        self._outdated = False  # the upstream just said our cursor is older than its log
        self._queue: gevent.queue.Queue[tuple[LogRecord, Any]] = gevent.queue.Queue(QUEUE_FRAMES)
        self._greenlets: list[gevent.Greenlet] = []
        self._stopping = False
        self._writing = False
        self._last_yield = time.monotonic()

    def on_start(self) -> None:
        self.status.last_seq = self.log.last_seq
        LAST_SEQ.set(self.log.last_seq)
        self._greenlets = [gevent.spawn(self._guard, f) for f in (self._read_loop, self._write_loop, self._poll_loop)]

    def on_stop(self) -> None:
        """Stop reading, let the writer store what was read (up to ``STOP_DRAIN_SECONDS``), then stop it."""
        self._stopping = True
        reader, writer, poller = self._greenlets
        reader.kill(block=True, timeout=5)
        deadline = time.monotonic() + STOP_DRAIN_SECONDS
        while (self._writing or not self._queue.empty()) and not writer.dead and time.monotonic() < deadline:
            gevent.sleep(0.01)
        gevent.killall([writer, poller], block=True, timeout=5)

    def on_failure(self, exception_type: Any, exception_value: Any, traceback: Any) -> None:
        self._stopping = True
        gevent.killall([g for g in self._greenlets if g is not gevent.getcurrent()], block=False)

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, _Crashed):
            raise RuntimeError(f"fan-out upstream greenlet crashed: {message.error}")
        log.warning("fanout upstream ignored an unknown message type=%s", type(message).__name__)
        return None

    def _guard(self, run: Any) -> None:
        try:
            run()
        except gevent.GreenletExit:
            raise
        except Exception as exc:  # a bug or a broken log: the actor dies and the node stops
            log.exception("fanout upstream greenlet crashed")
            self.actor_ref.tell(_Crashed(repr(exc)))

    # -- reader ------------------------------------------------------------------------------
    def _read_loop(self) -> None:
        backoff = Backoff(self.config.backoff_base_seconds, self.config.backoff_max_seconds, healthy_after_seconds=30.0)
        while not self._stopping:
            backoff.started()
            self._session()
            if self._stopping:
                return
            delay = backoff.next_delay()
            log.info("fanout upstream reconnecting in=%.1fs cursor=%d", delay, self._cursor)
            gevent.sleep(delay)

    def _session(self) -> None:
        url = f"{self.config.upstream.rstrip('/')}{SUBSCRIBE_PATH}?cursor={self._cursor}"
        client = WebSocketClient(
            url,
            max_message_bytes=self.config.max_frame_bytes,
            timeout_s=self.config.idle_timeout_seconds,
            outbound=self.outbound,
        )
        pinger: gevent.Greenlet | None = None
        try:
            client.connect()
            self._set_connected(True)
            log.info("fanout upstream connected url=%s cursor=%d", self.config.upstream, self._cursor)
            pinger = gevent.spawn(self._ping_loop, client)
            while not self._stopping:
                self._handle(client.recv())
        except WebSocketError as exc:
            UPSTREAM_RECONNECTS.labels(exc.reason).inc()
            log.info("fanout upstream disconnected reason=%s detail=%s", exc.reason, exc)
        except _Reconnect as exc:
            UPSTREAM_RECONNECTS.labels("requested").inc()
            log.info("fanout upstream disconnecting detail=%s", exc)
        finally:
            if pinger is not None:
                pinger.kill(block=False)
            self._set_connected(False)
            client.close()

    def _set_connected(self, up: bool) -> None:
        if up == self.status.connected:
            return
        self.status.connected = up
        self.status.down_since = None if up else time.monotonic()
        UPSTREAM_CONNECTED.set(1 if up else 0)

    def _ping_loop(self, client: WebSocketClient) -> None:
        """A pong resets the read timeout: only a silent upstream times out."""
        while True:
            gevent.sleep(self.config.idle_timeout_seconds / 3)
            try:
                client.ping(b"skyrelay")
            except WebSocketError:
                return

    def _drop(self, reason: str, detail: str) -> None:
        FRAMES_DROPPED.labels(reason).inc()
        log.info("fanout upstream frame dropped reason=%s cursor=%d %s", reason, self._cursor, detail[:200])

    def _handle(self, data: bytes) -> None:
        try:
            header, body = split_frame(data, max_bytes=self.config.max_frame_bytes)
        except ProtocolError as exc:
            self._drop(exc.reason, str(exc))
            return
        op, kind = header.get("op"), header.get("t")
        if op == -1:
            error = body.get("error")
            if error == "FutureCursor":
                log.error("fanout upstream is behind this node's log cursor=%d: check the upstream URL", self._cursor)
            raise _Reconnect(f"upstream error frame {error!r}: {str(body.get('message'))[:200]}")
        if op != 1 or not isinstance(kind, str):
            self._drop("bad_header", f"header={header!r}")
            return
        if kind == "#info":
            self._info(body)
            return
        seq = body.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or not 0 < seq <= MAX_SEQ:
            self._drop("bad_seq", f"type={kind} seq={seq!r}")
            return
        if seq <= self._cursor:
            self._drop("seq_not_increasing", f"seq={seq}")
            raise _Reconnect(f"upstream seq {seq} does not increase past {self._cursor}")
        now = time.time()
        if self._outdated:
            self._outdated = False
            if self._cursor > 0 and seq > self._cursor + 1:
                self._record_gap(seq, now)
        self._queue.put((LogRecord(seq, now, 0, seq, data), body.get("time")))
        self._cursor = seq
        if time.monotonic() - self._last_yield >= YIELD_EVERY_SECONDS:
            self._last_yield = time.monotonic()
            gevent.sleep(0)

    def _info(self, body: dict[str, Any]) -> None:
        name, message = body.get("name"), str(body.get("message"))[:200]
        if name == "OutdatedCursor":
            OUTDATED_CURSOR.inc()
            self._outdated = True
            log.warning("fanout upstream says cursor is outdated: starting from its oldest cursor=%d", self._cursor)
        else:
            log.info("fanout upstream info name=%s message=%s", str(name)[:64], message)

    def _record_gap(self, next_seq: int, now: float) -> None:
        first, last = self._cursor + 1, next_seq - 1
        GAPS.inc()
        GAP_SEQS.inc(last - first + 1)
        log.warning("fanout log gap recorded first_missing=%d last_missing=%d next=%d", first, last, next_seq)
        note = f"events {first} to {last} were pruned upstream before this node received them"
        self._queue.put((LogRecord(last, now, 0, -1, info_frame("OutdatedCursor", note)), None))

    # -- writer ------------------------------------------------------------------------------
    def _write_loop(self) -> None:
        last_prune = time.monotonic()
        while True:
            first = self._queue.get()
            self._writing = True
            try:
                self._write([first, *self._take(BATCH_FRAMES - 1)])
            finally:
                self._writing = False
            if time.monotonic() - last_prune >= PRUNE_INTERVAL_SECONDS:
                last_prune = time.monotonic()
                removed = off_loop(self.log.prune)
                if removed:
                    log.info("fanout log pruned records=%d first_seq=%d", removed, self.log.first_seq)

    def _take(self, limit: int) -> list[tuple[LogRecord, Any]]:
        out: list[tuple[LogRecord, Any]] = []
        while len(out) < limit:
            try:
                out.append(self._queue.get_nowait())
            except gevent.queue.Empty:
                break
        return out

    def _write(self, batch: list[tuple[LogRecord, Any]]) -> None:
        records = [record for record, _ in batch]
        self.log.append(records)
        off_loop(self.log.sync)
        self.broadcaster.tell(Broadcast(tuple((r.seq, r.frame) for r in records)))
        stored = sum(1 for r in records if r.upstream_seq >= 0)
        EVENTS_STORED.inc(stored)
        self.status.last_seq = records[-1].seq
        LAST_SEQ.set(records[-1].seq)
        self._update_lag(batch[-1][1])

    def _update_lag(self, event_time: Any) -> None:
        head = self.status.upstream_seq
        if head is not None and self.status.last_seq >= head:
            LAG_SEQS.set(0)
            LAG_SECONDS.set(0)
            return
        LAG_SEQS.set(float("nan") if head is None else head - self.status.last_seq)
        if isinstance(event_time, str):
            try:
                LAG_SECONDS.set(max(0.0, time.time() - datetime.fromisoformat(event_time).timestamp()))
            except ValueError:
                pass

    # -- upstream head poller ------------------------------------------------------------------
    def _poll_loop(self) -> None:
        url = http_base(self.config.upstream) + "/xrpc/_health"
        while True:
            seq = fetch_head(url, self.config.poll_seconds)
            if seq is not None:
                self.status.upstream_seq = seq
                self._update_lag(None)
            gevent.sleep(self.config.poll_seconds)
