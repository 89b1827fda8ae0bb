"""A firehose server for tests: the subscribeRepos blueprint over an in-memory event log, in its own process.

Run as ``python -m tests.support.firehose_server [options]``; it monkey-patches gevent first,
serves on 127.0.0.1 (port 0 unless ``--port``) and prints ``PORT <n>`` on stdout once listening.
It runs the real ``Broadcaster`` actor, ``ConsumerRegistry``, firehose blueprint and app error
handlers; only the event log is a fake. Control endpoints (tests only):

- ``POST /_test/append?n=N&batch=B&pause_ms=P&background=1``: append N frames in batches of B,
  each batch durable in the log before it is broadcast; pause P ms between batches (0 yields);
  with ``background=1`` answer at once and append in a greenlet.
- ``POST /_test/prune?before=S``: drop every event with seq < S (retention).
- ``GET /_test/stats``: last/first seq, registered consumers, cuts by reason, frames sent,
  replays running and waiting.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import base64  # noqa: E402
import bisect  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
from flask import Blueprint, jsonify, request  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402
from geventwebsocket.handler import WebSocketHandler  # noqa: E402
from prometheus_client import REGISTRY  # noqa: E402

from actors.broadcaster import Broadcaster, ConsumerRegistry  # noqa: E402
from actors.messages_broadcast import Broadcast  # noqa: E402
from protocol.frames import Event, SyncEvent, decode_frame, encode_frame  # noqa: E402
from web.app import create_app  # noqa: E402
from web.firehose import firehose_blueprint, pre_upgrade_hook  # noqa: E402

DID = "did:plc:firehosetest0000000000000"


class MemoryLog:
    """An in-memory event log with the read interface of ``store.eventlog.EventLog``."""

    def __init__(self) -> None:
        self._seqs: list[int] = []
        self._frames: list[bytes] = []
        self._next = 1

    @property
    def last_seq(self) -> int:
        return self._seqs[-1] if self._seqs else 0

    @property
    def first_seq(self) -> int:
        return self._seqs[0] if self._seqs else 0

    def read_after(self, cursor: int, max_records: int = 1000) -> list[tuple[int, bytes]]:
        start = bisect.bisect_right(self._seqs, cursor)
        end = start + max_records
        return list(zip(self._seqs[start:end], self._frames[start:end], strict=True))

    def append(self, make: Callable[[int], bytes], count: int) -> tuple[tuple[int, bytes], ...]:
        out = []
        for _ in range(count):
            seq = self._next
            self._next += 1
            frame = make(seq)
            self._seqs.append(seq)
            self._frames.append(frame)
            out.append((seq, frame))
        return tuple(out)

    def skip_to(self, seq: int) -> None:
        self._next = max(self._next, seq)

    def prune(self, before: int) -> None:
        cut = bisect.bisect_left(self._seqs, before)
        del self._seqs[:cut]
        del self._frames[:cut]


def synthetic_maker(frame_bytes: int) -> Callable[[int], bytes]:
    """``#sync`` frames of about ``frame_bytes`` bytes carrying their seq."""
    padding = b"\x00" * max(0, frame_bytes - 120)

    def make(seq: int) -> bytes:
        return encode_frame(
            SyncEvent(seq=seq, did=DID, blocks=padding, rev="3kabcdefghijk", time="2026-01-01T00:00:00Z")
        )

    return make


def reference_maker(path: Path) -> Callable[[int], bytes]:
    """The recorded reference-PDS frames, cycled and re-sequenced."""
    events: list[Event] = []
    for line in path.read_text().splitlines():
        if line.strip():
            events.append(decode_frame(base64.b64decode(json.loads(line)["frame_b64"])))

    def make(seq: int) -> bytes:
        return encode_frame(events[(seq - 1) % len(events)], seq=seq)

    return make


class _Services:
    def __init__(self, blueprints: list[Blueprint]) -> None:
        self._blueprints = blueprints

    def health(self) -> bool:
        return True

    def blueprints(self) -> list[Blueprint]:
        return self._blueprints


def control_blueprint(
    log: MemoryLog, broadcaster: Any, registry: ConsumerRegistry, make: Callable[[int], bytes]
) -> Blueprint:
    bp = Blueprint("test_control", __name__)
    appending: list[gevent.Greenlet] = []

    def append(n: int, batch: int, pause_s: float) -> None:
        done = 0
        while done < n:
            events = log.append(make, min(batch, n - done))
            done += len(events)
            broadcaster.tell(Broadcast(events))
            gevent.sleep(pause_s)

    @bp.post("/_test/append")
    def append_route() -> Any:
        n = int(request.args.get("n", "1"))
        batch = int(request.args.get("batch", "1"))
        pause_s = float(request.args.get("pause_ms", "0")) / 1000
        target = log.last_seq + n
        if request.args.get("background") == "1":
            appending.append(gevent.spawn(append, n, batch, pause_s))
        else:
            append(n, batch, pause_s)
        return jsonify({"target_seq": target})

    @bp.post("/_test/prune")
    def prune_route() -> Any:
        log.prune(int(request.args["before"]))
        return jsonify({"first_seq": log.first_seq})

    @bp.get("/_test/stats")
    def stats_route() -> Any:
        cuts = {}
        for reason in ("too_slow", "send_stalled", "client_frame_too_big", "client_protocol_error", "ping_timeout"):
            cuts[reason] = REGISTRY.get_sample_value("skyrelay_consumers_cut_total", {"reason": reason}) or 0
        return jsonify(
            {
                "last_seq": log.last_seq,
                "first_seq": log.first_seq,
                "consumers": len(registry),
                "queued": [c.queued for c in registry.consumers()],
                "cuts": cuts,
                "frames_sent": REGISTRY.get_sample_value("skyrelay_consumer_frames_sent_total") or 0,
                "appending": any(not g.dead for g in appending),
                "replays": {
                    state: REGISTRY.get_sample_value("skyrelay_firehose_replays", {"state": state}) or 0
                    for state in ("running", "waiting")
                },
            }
        )

    return bp


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--frames", type=int, default=0, help="events in the log at start")
    parser.add_argument("--first-seq", type=int, default=1, help="seq of the first event in the log")
    parser.add_argument("--frame-bytes", type=int, default=300, help="size of synthetic frames")
    parser.add_argument("--reference", type=Path, help="jsonl of recorded frames to re-sequence instead")
    parser.add_argument("--buffer-frames", type=int, default=20_000)
    parser.add_argument("--buffer-bytes", type=int, default=64 * 1024 * 1024)
    parser.add_argument("--stall-seconds", type=float, default=30.0)
    parser.add_argument("--max-replays", type=int, default=8)
    parser.add_argument("--ping-seconds", type=float, default=30.0)
    parser.add_argument("--future-wait-seconds", type=float, default=0.0, help="as a fan-out node: wait for a cursor")
    parser.add_argument("--no-upgrade-hook", action="store_true", help="serve without pre_upgrade_hook")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")

    make = reference_maker(args.reference) if args.reference else synthetic_maker(args.frame_bytes)
    log = MemoryLog()
    log.skip_to(args.first_seq)
    log.append(make, args.frames)
    registry = ConsumerRegistry()
    broadcaster = Broadcaster.start(registry)
    firehose = firehose_blueprint(
        log,
        registry,
        buffer_frames=args.buffer_frames,
        buffer_bytes=args.buffer_bytes,
        send_stall_seconds=args.stall_seconds,
        max_replays=args.max_replays,
        ping_seconds=args.ping_seconds,
        future_cursor_wait_seconds=args.future_wait_seconds,
    )
    app = create_app(_Services([firehose, control_blueprint(log, broadcaster, registry, make)]))
    server = WSGIServer(("127.0.0.1", args.port), app, handler_class=WebSocketHandler, log=None)
    if not args.no_upgrade_hook:
        server.pre_start_hook = pre_upgrade_hook
    stop = gevent.event.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(sig, stop.set)
    server.start()
    print(f"PORT {server.server_port}", flush=True)
    stop.wait()
    server.stop(timeout=2)
    broadcaster.stop(timeout=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
