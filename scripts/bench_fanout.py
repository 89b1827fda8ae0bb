"""Benchmark firehose fan-out: frame deliveries/s to N websocket consumers, and replay frames/s for one.

    python scripts/bench_fanout.py [--consumers 10,100] [--deliveries 2000000] [--frame-bytes 2100]

Three processes: this one (orchestrates and prints), a relay-side server (gevent, the real
``Broadcaster`` actor, ``ConsumerRegistry`` and firehose blueprint on ``WSGIServer``) and a
consumer process that opens the websockets on plain sockets and reads as fast as it can with
``selectors``. Every frame has the same size, so the consumer counts bytes, not frames.

Fan-out: the server waits for N live consumers, then broadcasts synthetic ``#sync`` frames in
``Broadcast`` batches of ``--batch`` as fast as the consumers take them (it pauses while any
consumer queue is over half full, so nobody is cut: this measures throughput, not cutting).
The broadcast frames are not kept in the log. Deliveries/s = N x events / time from the first
broadcast to the last byte read by the consumer process.

Replay: one consumer connects with ``cursor=0`` to a log of ``--replay-frames`` frames and reads
them all; replay frames/s = frames / time from connecting to the last byte.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import resource
import selectors
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATH = "/xrpc/com.atproto.sync.subscribeRepos"


# -- server process --------------------------------------------------------------------------


def serve(args: argparse.Namespace) -> int:
    from gevent import monkey

    monkey.patch_all()
    import gevent
    import gevent.fileobject
    from flask import Flask
    from gevent.pywsgi import WSGIServer
    from geventwebsocket.handler import WebSocketHandler

    from actors.broadcaster import Broadcaster, ConsumerRegistry, websocket_header
    from actors.messages_broadcast import Broadcast
    from protocol.frames import SyncEvent, encode_frame
    from web.firehose import firehose_blueprint, pre_upgrade_hook

    padding = b"\x00" * (args.frame_bytes - 120)

    def frame(seq: int) -> bytes:
        return encode_frame(SyncEvent(seq=seq, did="did:plc:bench", blocks=padding, rev="3kbench", time="2026"))

    # Fan-out seqs start at 2**32 so every frame has the same size (a 9-byte CBOR integer), and
    # are made by patching the seq into a template: the benchmark measures fan-out, not encoding.
    base_seq = 2**32 + 0x0102030405
    template = frame(base_seq)
    seq_at = template.index(struct.pack("!Q", base_seq))

    def live_frame(seq: int) -> bytes:
        return template[:seq_at] + struct.pack("!Q", seq) + template[seq_at + 8 :]

    class ListLog:
        def __init__(self, frames: list[bytes]) -> None:
            self.frames = frames

        @property
        def last_seq(self) -> int:
            return len(self.frames)

        @property
        def first_seq(self) -> int:
            return 1 if self.frames else 0

        def read_after(self, cursor: int, max_records: int = 1000) -> list[tuple[int, bytes]]:
            start = min(cursor, len(self.frames))  # seq s is frames[s - 1]
            return [(start + i + 1, f) for i, f in enumerate(self.frames[start : start + max_records])]

    assert live_frame(2**32 + 77) == frame(2**32 + 77)
    replay_log = ListLog([frame(s) for s in range(1, args.replay_frames + 1)])
    replay_bytes = sum(len(websocket_header(len(f))) + len(f) for f in replay_log.frames)
    registry = ConsumerRegistry()
    broadcaster = Broadcaster.start(registry)
    app = Flask("bench")
    app.register_blueprint(firehose_blueprint(replay_log, registry, buffer_frames=args.buffer_frames))
    server = WSGIServer(("127.0.0.1", 0), app, handler_class=WebSocketHandler, log=None)
    server.pre_start_hook = pre_upgrade_hook
    server.start()
    hello = {"port": server.server_port, "wire_bytes": len(websocket_header(len(template))) + len(template)}
    print(json.dumps({**hello, "replay_bytes": replay_bytes}), flush=True)

    # One command a line on stdin: {"fanout": N, "events": M} or {"quit": true}.
    stdin = gevent.fileobject.FileObject(sys.stdin.fileno(), "r")
    seq = 2**32
    for line in stdin:
        command = json.loads(line)
        if command.get("quit"):
            break
        n, events = command["fanout"], command["events"]
        while len(registry):
            gevent.sleep(0.01)  # the previous run's consumers are gone
        print(json.dumps({"idle": True}), flush=True)
        while len(registry) < n:
            gevent.sleep(0.01)
        consumers = registry.consumers()
        limit = args.buffer_frames // 2
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        sent = 0
        while sent < events:
            count = min(args.batch, events - sent)
            batch = tuple((seq + i + 1, live_frame(seq + i + 1)) for i in range(count))
            seq += count
            sent += count
            broadcaster.tell(Broadcast(batch))
            gevent.sleep(0)
            while max(c.queued for c in consumers) > limit:
                gevent.sleep(0.001)
        while min(c.frames_sent for c in consumers) < events:
            gevent.sleep(0.001)
        elapsed = time.perf_counter() - started
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime
        cuts = sum(1 for c in consumers if c.cut_reason)
        print(json.dumps({"server_seconds": elapsed, "server_cpu_seconds": cpu, "cut": cuts}), flush=True)
    server.stop(timeout=2)
    broadcaster.stop()
    return 0


# -- consumer process ------------------------------------------------------------------------


def _open(port: int, cursor: int | None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    query = "" if cursor is None else f"?cursor={cursor}"
    sock.sendall(
        f"GET {PATH}{query} HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    return sock


def consume(args: argparse.Namespace) -> int:
    """Open N websockets, print ready, read until every socket got ``expect_bytes``; print timings."""
    socks = [_open(args.port, args.cursor) for _ in range(args.consume)]
    started = time.perf_counter()
    selector = selectors.DefaultSelector()
    received: dict[int, int] = {}
    in_headers: dict[int, bytes] = {}
    for sock in socks:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, sock)
        received[sock.fileno()] = 0
        in_headers[sock.fileno()] = b""
    print("ready", flush=True)
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    remaining = len(socks)
    first = last = 0.0
    while remaining:
        for key, _ in selector.select(timeout=30):
            sock = key.data
            fd = sock.fileno()
            n = sock.recv_into(buf)
            if n == 0:
                raise SystemExit(f"server closed a consumer connection after {received[fd]} bytes")
            if fd in in_headers:
                data = in_headers[fd] + bytes(view[:n])
                if b"\r\n\r\n" not in data:
                    in_headers[fd] = data
                    continue
                del in_headers[fd]
                n = len(data.split(b"\r\n\r\n", 1)[1])
            if not first and n:
                first = time.perf_counter()
            received[fd] += n
            if received[fd] >= args.expect_bytes:
                selector.unregister(sock)
                remaining -= 1
                last = time.perf_counter()
    print(json.dumps({"first_byte": first, "last_byte": last, "connected": started}), flush=True)
    return 0


# -- orchestration ---------------------------------------------------------------------------


def _python(*argv: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, __file__, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )


def _line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"benchmark process exited with {proc.wait()}")
    return line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--consumers", default="10,100", help="comma-separated consumer counts")
    parser.add_argument("--deliveries", type=int, default=2_000_000, help="frames x consumers per fan-out run")
    parser.add_argument("--frame-bytes", type=int, default=2100)
    parser.add_argument("--batch", type=int, default=100, help="events per Broadcast message")
    parser.add_argument("--buffer-frames", type=int, default=20_000)
    parser.add_argument("--replay-frames", type=int, default=200_000)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--consume", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cursor", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--expect-bytes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args)
    if args.consume:
        return consume(args)

    server = _python(
        "--serve",
        f"--frame-bytes={args.frame_bytes}",
        f"--batch={args.batch}",
        f"--buffer-frames={args.buffer_frames}",
        f"--replay-frames={args.replay_frames}",
    )
    assert server.stdin is not None
    try:
        hello = json.loads(_line(server))
        port, wire, replay_bytes = hello["port"], hello["wire_bytes"], hello["replay_bytes"]
        print(f"frames of {wire - 4} bytes, Broadcast batches of {args.batch}, buffer {args.buffer_frames} frames")
        for n in (int(x) for x in args.consumers.split(",")):
            events = max(1, args.deliveries // n)
            server.stdin.write(json.dumps({"fanout": n, "events": events}) + "\n")
            server.stdin.flush()
            assert json.loads(_line(server)) == {"idle": True}
            client = _python("--consume", str(n), "--port", str(port), "--expect-bytes", str(events * wire))
            assert _line(client).strip() == "ready"
            stats = json.loads(_line(server))
            timing = json.loads(_line(client))
            client.wait()
            seconds = timing["last_byte"] - timing["first_byte"]
            rate = n * events / seconds
            per_cpu = n * events / stats["server_cpu_seconds"]
            print(
                f"fan-out {n:>4} consumers x {events:>7} events: {rate:>10,.0f} deliveries/s "
                f"({events / seconds:,.0f} events/s; server {per_cpu:,.0f} deliveries per CPU-second; "
                f"cut {stats['cut']})"
            )
        client = _python("--consume", "1", "--port", str(port), "--cursor", "0", "--expect-bytes", str(replay_bytes))
        assert _line(client).strip() == "ready"
        timing = json.loads(_line(client))
        client.wait()
        seconds = timing["last_byte"] - timing["connected"]
        print(f"replay  1 consumer  x {args.replay_frames:>7} frames: {args.replay_frames / seconds:>10,.0f} frames/s")
        server.stdin.write(json.dumps({"quit": True}) + "\n")
        server.stdin.flush()
        server.wait(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
