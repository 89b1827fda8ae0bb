"""The benchmarks' firehose consumers: C websockets in one process, timing each ``#commit``'s arrival.

Run by ``ConsumerProcess`` as ``python -m scripts.benchkit.consumer --connections C --port P``
(from the repository root); commands and replies are JSON lines on its stdin and stdout. Plain
sockets and ``selectors``, no websocket library: the consumer must cost little beside the relay.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import queue
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PATH = "/xrpc/com.atproto.sync.subscribeRepos"


@dataclass
class Conn:
    sock: socket.socket
    index: int
    buf: bytes = b""
    handshake: bool = True
    count: int = 0
    closed: bool = False
    target: int | None = None
    reached_at: float | None = None
    recorded: int = 0  # #commit frames recorded since recording was last turned on


def _ws_open(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    return sock


class ConsumerWorker:
    """C live websockets read with ``selectors``; commands and replies are JSON lines on stdin/stdout.

    Commands: ``{"cmd": "arm", "delta": n}`` (reply ``reached`` once every open connection has
    ``n`` more frames), ``{"cmd": "record", "on": bool}`` (decode ``#commit`` frames and keep
    (did, rev, arrival)), ``{"cmd": "latency", "sends": path}`` (match arrivals to send times),
    ``{"cmd": "progress"}`` (reply ``progress``: ``#commit`` frames recorded per connection),
    ``{"cmd": "quit"}``.
    """

    def __init__(self, port: int, connections: int) -> None:
        self.conns = [Conn(_ws_open(port), i) for i in range(connections)]
        self.selector = selectors.DefaultSelector()
        for conn in self.conns:
            conn.sock.setblocking(False)
            self.selector.register(conn.sock, selectors.EVENT_READ, conn)
        self.selector.register(sys.stdin.fileno(), selectors.EVENT_READ, None)
        self.stdin_buf = b""
        self.recording = False
        self.arrivals: list[tuple[str, str, int, float]] = []
        self.armed = False
        self.cut = 0
        self.running = True

    def reply(self, **body: Any) -> None:
        sys.stdout.write(json.dumps(body) + "\n")
        sys.stdout.flush()

    def run(self) -> int:
        while self.running:
            for key, _ in self.selector.select(timeout=1.0):
                if key.data is None:
                    self.read_stdin()
                else:
                    self.read_conn(key.data)
            if self.armed:
                self.check_reached()
        return 0

    def read_stdin(self) -> None:
        data = os.read(sys.stdin.fileno(), 65536)
        if not data:
            self.running = False
            return
        self.stdin_buf += data
        while b"\n" in self.stdin_buf:
            line, self.stdin_buf = self.stdin_buf.split(b"\n", 1)
            if line.strip():
                self.command(json.loads(line))

    def command(self, cmd: dict[str, Any]) -> None:
        name = cmd["cmd"]
        if name == "arm":
            for conn in self.conns:
                conn.target = conn.count + int(cmd["delta"])
                conn.reached_at = None
            self.armed = True
            self.reply(type="armed")
            self.check_reached()
        elif name == "record":
            self.recording = bool(cmd["on"])
            if self.recording:
                self.arrivals = []
                for conn in self.conns:
                    conn.recorded = 0
            self.reply(type="recording", on=self.recording)
        elif name == "progress":
            self.reply(type="progress", commits=[c.recorded for c in self.conns])
        elif name == "latency":
            self.reply(type="latency", **self.latency(Path(cmd["sends"])))
        elif name == "quit":
            self.running = False

    def check_reached(self) -> None:
        if any(not c.closed and c.reached_at is None for c in self.conns):
            return
        self.armed = False
        times = [c.reached_at for c in self.conns if c.reached_at is not None]
        self.reply(
            type="reached",
            first=min(times, default=None),
            last=max(times, default=None),
            closed=sum(c.closed for c in self.conns),
            cut=self.cut,
            counts=[c.count for c in self.conns],
        )

    def read_conn(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(1 << 18)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        now = time.monotonic()
        if not data:
            self.close(conn)
            return
        buf = conn.buf + data if conn.buf else data
        if conn.handshake:
            head, sep, rest = buf.partition(b"\r\n\r\n")
            if not sep:
                conn.buf = buf
                return
            if b" 101 " not in head.split(b"\r\n", 1)[0]:
                raise SystemExit(f"consumer {conn.index}: upgrade refused: {head[:200]!r}")
            conn.handshake = False
            buf = rest
            if all(not c.handshake for c in self.conns):
                self.reply(type="ready")
        conn.buf = self.parse(conn, buf, now)
        if conn.target is not None and conn.reached_at is None and conn.count >= conn.target:
            conn.reached_at = now

    def parse(self, conn: Conn, buf: bytes, now: float) -> bytes:
        """Count complete websocket frames in ``buf`` (server frames are never masked); return the rest."""
        pos, size = 0, len(buf)
        while size - pos >= 2:
            length = buf[pos + 1] & 0x7F
            head = 2
            if length == 126:
                if size - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if size - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            end = pos + head + length
            if end > size:
                break
            opcode = buf[pos] & 0x0F
            if opcode == 0x2:
                conn.count += 1
                if self.recording:
                    self.record(conn, buf[pos + head : end], now)
            elif opcode == 0x8:
                self.close(conn)
                return b""
            elif opcode == 0x9:  # ping: answer with a masked pong (zero mask) carrying the same data
                payload = buf[pos + head : end]
                conn.sock.sendall(bytes((0x8A, 0x80 | len(payload))) + b"\0\0\0\0" + payload)
            pos = end
        return buf[pos:]

    def record(self, conn: Conn, payload: bytes, now: float) -> None:
        import libipld

        header, body = libipld.decode_dag_cbor_multi(payload)
        if header.get("op") == -1:
            self.cut += 1
        elif header.get("t") == "#commit":
            self.arrivals.append((body["repo"], body["rev"], conn.index, now))
            conn.recorded += 1

    def close(self, conn: Conn) -> None:
        if not conn.closed:
            conn.closed = True
            self.selector.unregister(conn.sock)
            conn.sock.close()

    def latency(self, sends_path: Path) -> dict[str, Any]:
        rows = json.loads(sends_path.read_text())  # [seq, did, rev, t] or [seq, did, rev, t, group]
        sent = {(row[1], row[2]): row[3] for row in rows}
        per_frame: dict[tuple[str, str], list[float]] = {}
        unmatched = 0
        for did, rev, _, at in self.arrivals:
            t = sent.get((did, rev))
            if t is None:
                unmatched += 1
                continue
            per_frame.setdefault((did, rev), []).append(at - t)
        every = sorted(x for xs in per_frame.values() for x in xs)
        slowest = sorted(max(xs) for xs in per_frame.values())
        return {
            "deliveries": len(every),
            "frames": len(per_frame),
            "sent": len(sent),
            "unmatched": unmatched,
            "all": _quantiles(every),
            "slowest": _quantiles(slowest),
            "per_connection": self.spans(),
            "per_group": self.per_group(rows, per_frame),
            "timeline": _timeline(sent, per_frame),
        }

    def per_group(self, rows: list[list[Any]], per_frame: dict[tuple[str, str], list[float]]) -> dict[str, Any]:
        """For sends rows with a 5th field (a group: the upstream host): ``{group: [sent, not at every consumer]}``."""
        out: dict[str, list[int]] = {}
        for row in rows:
            if len(row) < 5:
                continue
            counts = out.setdefault(str(row[4]), [0, 0])
            counts[0] += 1
            if len(per_frame.get((row[1], row[2]), ())) < len(self.conns):
                counts[1] += 1
        return out

    def spans(self) -> list[dict[str, Any]]:
        """Per connection: ``#commit`` frames recorded, and the first and last one's arrival time."""
        spans: list[dict[str, Any]] = [{"commits": 0, "first": None, "last": None} for _ in self.conns]
        for _, _, index, at in self.arrivals:
            span = spans[index]
            span["commits"] += 1
            span["first"] = at if span["first"] is None else span["first"]
            span["last"] = at
        return spans


def _timeline(sent: dict[tuple[str, str], float], per_frame: dict[tuple[str, str], list[float]]) -> dict[str, Any]:
    """p99 and max of the slowest delivery of each commit, by when it was sent (about 24 windows)."""
    if not per_frame:
        return {}
    first = min(sent[key] for key in per_frame)
    last = max(sent[key] for key in per_frame)
    window = max(1.0, (last - first) / 24)
    buckets: dict[int, list[float]] = {}
    for key, delays in per_frame.items():
        buckets.setdefault(int((sent[key] - first) // window), []).append(max(delays))
    out: list[list[float]] = []
    for index in range(max(buckets) + 1):
        values = sorted(buckets.get(index, []))
        q = _quantiles(values)
        out.append([index * window, len(values), q.get("p99", 0.0), q.get("max", 0.0)])
    return {"window_seconds": window, "windows": out}  # [start s, commits, p99 s, max s]


def _quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}

    def q(p: float) -> float:
        return values[min(len(values) - 1, int(p * len(values)))]

    return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": values[-1]}


class ConsumerProcess:
    """The consumer worker as a subprocess; replies are read by a thread into a queue."""

    def __init__(self, port: int, connections: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "scripts.benchkit.consumer", "--connections", str(connections), "--port", str(port)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.replies: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.replies.put(json.loads(line))
        self.replies.put({"type": "exited"})

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def expect(self, kind: str, timeout: float) -> dict[str, Any]:
        try:
            reply = self.replies.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"consumer process: no {kind!r} within {timeout:.0f}s") from None
        if reply["type"] != kind:
            raise RuntimeError(f"consumer process: expected {kind!r}, got {reply}")
        return reply

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send(cmd="quit")
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--connections", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the orchestrator stops us (quit or kill)
    return ConsumerWorker(args.port, args.connections).run()


if __name__ == "__main__":
    sys.exit(main())
