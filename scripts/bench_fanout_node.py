"""Benchmark one `skyrelay fanout` node: deliveries/s, RSS per consumer and CPU per delivery.

    python scripts/bench_fanout_node.py [--consumers 10,100,1000] [--rate 1000] [--seconds 10] [--quick]

Processes: a synthetic upstream relay (``tests.support.firehose_server``: the real firehose
blueprint over an in-memory log, ~``--frame-bytes`` frames), the fan-out node under test
(``skyrelay fanout`` on a temporary data dir, its own event log fsynced as in production), and a
consumer process holding N live websockets to the node, reading with ``selectors`` and counting
whole websocket frames. For each N, two runs: the network's pace (``--rate`` events/s for
``--seconds``) and the maximum (the upstream appends as fast as it can, ``--max-events``).

Printed per run: deliveries/s (N x events / time from the first byte to the last frame read by
the consumer process), the node's CPU seconds per 1,000 deliveries (from /proc), and its RSS per
consumer ((RSS with N consumers connected - RSS before) / N). ``--quick`` runs a small version
end to end (10 and 50 consumers, a few seconds) to check the benchmark itself; its figures
mean nothing. Figures vary with the machine and its load: run it on a quiet one.
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
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PATH = "/xrpc/com.atproto.sync.subscribeRepos"


# -- consumer process --------------------------------------------------------------------------


def _open(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET {PATH} HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    return sock


class _Counter:
    """Counts whole server-to-client websocket frames in a byte stream (after the 101 answer)."""

    def __init__(self) -> None:
        self.head = b""  # the HTTP answer, then a partial frame header
        self.upgraded = False
        self.skip = 0  # payload bytes of the current frame still to come
        self.frames = 0

    def feed(self, data: bytes) -> None:
        if not self.upgraded:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            answer, data = self.head.split(b"\r\n\r\n", 1)
            if b" 101 " not in answer.split(b"\r\n", 1)[0]:
                raise SystemExit(f"consumer refused: {answer[:200]!r}")
            self.upgraded, self.head = True, b""
        pos = 0
        while pos < len(data):
            if self.skip:
                take = min(self.skip, len(data) - pos)
                self.skip -= take
                pos += take
                continue
            self.head += data[pos : pos + 1]  # headers are 2-10 bytes: byte by byte is cheap enough
            pos += 1
            head = self.head
            if len(head) < 2:
                continue
            size = head[1] & 0x7F
            if len(head) < 2 + (2 if size == 126 else 8 if size == 127 else 0):
                continue
            if size == 126:
                size = struct.unpack_from("!H", head, 2)[0]
            elif size == 127:
                size = struct.unpack_from("!Q", head, 2)[0]
            if head[0] & 0x0F == 0x2:
                self.frames += 1
            self.skip, self.head = size, b""


def consume(port: int, count: int) -> int:
    """Hold ``count`` websockets; on each stdin line ``N``, read until every one has N more frames, then report."""
    socks = [_open(port) for _ in range(count)]
    selector = selectors.DefaultSelector()
    counters: dict[int, _Counter] = {}
    for sock in socks:
        selector.register(sock, selectors.EVENT_READ, sock)
        counters[sock.fileno()] = _Counter()
    print("ready", flush=True)
    for line in sys.stdin:
        want = {fd: c.frames + int(line) for fd, c in counters.items()}  # frames counted so far, plus N
        first = last = 0.0
        while any(c.frames < want[fd] for fd, c in counters.items()):
            events = selector.select(timeout=60)
            if not events:
                raise SystemExit("consumers got nothing for 60 s")
            for key, _ in events:
                data = key.data.recv(1 << 20)
                if not data:
                    raise SystemExit("the node closed a consumer connection")
                if not first:
                    first = time.perf_counter()
                counters[key.data.fileno()].feed(data)
            last = time.perf_counter()
        print(json.dumps({"first": first, "last": last}), flush=True)
    return 0


# -- orchestration -------------------------------------------------------------------------------


def _proc_stats(pid: int) -> tuple[float, int]:
    """(CPU seconds, RSS bytes) of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    rss = int(fields[21]) * resource.getpagesize()
    return cpu, rss


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def _post(url: str) -> Any:
    with urllib.request.urlopen(urllib.request.Request(url, data=b"", method="POST"), timeout=600) as resp:
        return json.loads(resp.read())


def _wait(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--consumers", default="10,100,1000", help="comma-separated consumer counts")
    parser.add_argument("--rate", type=int, default=1000, help="events/s of the paced run (the network's pace)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the paced run")
    parser.add_argument("--max-events", type=int, default=20_000, help="events of the as-fast-as-possible run")
    parser.add_argument("--frame-bytes", type=int, default=1500)
    parser.add_argument("--quick", action="store_true", help="a small run to check the benchmark works")
    parser.add_argument("--consume", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.consume:
        return consume(args.port, args.consume)
    if args.quick:
        args.consumers, args.seconds, args.max_events = "10,50", 2.0, 2000
    _raise_nofile()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYRELAY_") and k != "DATABASE_URL"}
    env["PYTHONPATH"] = str(ROOT)
    procs: list[subprocess.Popen[str]] = []
    with tempfile.TemporaryDirectory(prefix="bench-fanout-node-") as tmp:
        try:
            upstream = subprocess.Popen(
                [sys.executable, "-m", "tests.support.firehose_server", f"--frame-bytes={args.frame_bytes}"],
                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )  # fmt: skip
            procs.append(upstream)
            assert upstream.stdout is not None
            up_port = int(upstream.stdout.readline().split()[1])
            node_port = _free_port()
            node_env = {**env, "SKYRELAY_FANOUT_MAX_CONSUMERS": "100000", "SKYRELAY_LOG_LEVEL": "warning"}
            node = subprocess.Popen(
                [sys.executable, "-m", "web.cli", "fanout", "--upstream", f"ws://127.0.0.1:{up_port}",
                 "--bind", f"127.0.0.1:{node_port}", "--data-dir", tmp],
                cwd=ROOT, env=node_env, stdout=subprocess.DEVNULL, text=True,
            )  # fmt: skip
            procs.append(node)
            _wait(lambda: _health(node_port), 60, "the fan-out node")
            print(f"frames of ~{args.frame_bytes} bytes; paced run {args.rate}/s for {args.seconds:g} s; "
                  f"max run {args.max_events} events")  # fmt: skip
            print(f"{'consumers':>9}  {'run':>12}  {'deliveries/s':>13}  {'CPU ms/1k deliveries':>21}  "
                  f"{'RSS/consumer':>13}")  # fmt: skip
            for count in (int(c) for c in args.consumers.split(",")):
                _, rss0 = _proc_stats(node.pid)
                consumer = subprocess.Popen(
                    [sys.executable, __file__, "--consume", str(count), "--port", str(node_port)],
                    cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                )  # fmt: skip
                procs.append(consumer)
                assert consumer.stdout is not None and consumer.stdin is not None
                if consumer.stdout.readline().strip() != "ready":
                    raise SystemExit("consumer process failed")
                _wait(lambda n=count: _metric(node_port, "skyrelay_consumers") >= n, 120, "consumers to connect")
                _, rss1 = _proc_stats(node.pid)
                rss_per = (rss1 - rss0) / count
                paced = int(args.rate * args.seconds)
                runs = (("paced", paced, 100, 100_000 / args.rate), ("max", args.max_events, 100, 0.0))
                for name, events, batch, pause_ms in runs:
                    cpu0, _ = _proc_stats(node.pid)
                    consumer.stdin.write(f"{events}\n")
                    consumer.stdin.flush()
                    _post(f"http://127.0.0.1:{up_port}/_test/append?n={events}&batch={batch}"
                          f"&pause_ms={pause_ms}&background=1")  # fmt: skip
                    report = json.loads(consumer.stdout.readline())
                    cpu1, _ = _proc_stats(node.pid)
                    deliveries = events * count
                    seconds = max(1e-9, report["last"] - report["first"])
                    cpu_ms = 1000 * 1000 * (cpu1 - cpu0) / deliveries
                    print(f"{count:>9}  {name:>12}  {deliveries / seconds:>13,.0f}  {cpu_ms:>21.2f}  "
                          f"{rss_per / 1024:>10,.0f} KiB")  # fmt: skip
                consumer.stdin.close()
                consumer.wait(timeout=30)
                _wait(lambda: _metric(node_port, "skyrelay_consumers") == 0, 60, "consumers to leave")
        finally:
            for proc in reversed(procs):
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
    return 0


def _health(port: int) -> bool:
    try:
        return bool(_get(f"http://127.0.0.1:{port}/xrpc/_health").get("upstream") == "connected")
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main())
