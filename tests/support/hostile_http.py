"""A hostile HTTP server on a raw socket, as a real process: how a broken or malicious PDS answers.

Run as ``python -m tests.support.hostile_http --mode MODE [--host 127.0.0.2] [--tls CERT KEY]``.
It prints ``{"port": N}`` once listening, then ``{"connection": k}`` as it accepts the k-th
connection and ``{"sent": bytes}`` when it is done with one. Modes:

- ``redirect``: 302 to ``--location``.
- ``drip``: a 200 head declaring a large body, then one body byte every ``--interval`` seconds.
- ``drip-head``: the status line itself, one byte every ``--interval`` seconds.
- ``chunked-flood``: a chunked 200 whose 64 KiB chunks never end (until the client goes).
- ``huge-chunk``: a chunked 200 whose first chunk declares 1 TiB.
- ``bad-status``: a malformed status line.
- ``reset``: accept, then close with a TCP reset.
- ``silent``: accept and never answer.
- ``status``: answer ``--status`` with an empty body (a websocket upgrade refused, say).

``HostileServer`` runs it from a test and collects what it prints.
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
_CHUNK = 64 * 1024


def _say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def _read_request(conn: socket.socket) -> None:
    data = b""
    conn.settimeout(10)
    while b"\r\n\r\n" not in data and len(data) < 65536:
        piece = conn.recv(4096)
        if not piece:
            return
        data += piece


def _answer(conn: socket.socket, args: argparse.Namespace) -> int:
    """Play ``args.mode`` on one connection; the number of bytes sent."""
    if args.mode == "reset":
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return 0
    _read_request(conn)
    if args.mode == "silent":
        time.sleep(3600)
        return 0
    if args.mode == "drip-head":
        sent = 0
        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}":
            conn.sendall(bytes([byte]))
            sent += 1
            time.sleep(args.interval)
        return sent
    heads = {
        "redirect": f"HTTP/1.1 302 Found\r\nLocation: {args.location}\r\nContent-Length: 0\r\n\r\n",
        "drip": "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n",
        "chunked-flood": "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        "huge-chunk": "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10000000000\r\n",
        "bad-status": "HTTP/1.1 two hundred OK\r\nContent-Length: 2\r\n\r\n{}",
        "status": f"HTTP/1.1 {args.status} Whatever\r\nContent-Length: 0\r\n\r\n",
    }
    sent = len(heads[args.mode])
    conn.sendall(heads[args.mode].encode())
    if args.mode == "drip":
        while True:
            conn.sendall(b" ")
            sent += 1
            time.sleep(args.interval)
    elif args.mode in ("chunked-flood", "huge-chunk"):
        chunk = f"{_CHUNK:x}\r\n".encode() + b"x" * _CHUNK + b"\r\n"
        while sent < 200 * 1024 * 1024:
            conn.sendall(chunk)
            sent += len(chunk)
    return sent


def _serve_one(conn: socket.socket, peer_port: int, args: argparse.Namespace, tls: ssl.SSLContext | None) -> None:
    sent = 0
    try:
        if tls is not None:
            conn = tls.wrap_socket(conn, server_side=True)
        sent = _answer(conn, args)
    except OSError:
        pass
    finally:
        _say(sent=sent, peer_port=peer_port)
        conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--location", default="")
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--status", type=int, default=400)
    parser.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    args = parser.parse_args(argv)
    tls = None
    if args.tls:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(*args.tls)
    listener = socket.create_server((args.host, args.port))
    _say(port=listener.getsockname()[1])
    count = 0
    while True:
        conn, peer = listener.accept()
        count += 1
        _say(connection=count, peer_port=peer[1])
        threading.Thread(target=_serve_one, args=(conn, peer[1], args, tls), daemon=True).start()


class HostileServer:
    """``main`` in a subprocess; ``connections`` and ``sent`` follow what it reports."""

    def __init__(self, mode: str, *, host: str = "127.0.0.1", port: int = 0, **options: object) -> None:
        argv = [sys.executable, "-m", "tests.support.hostile_http", "--mode", mode, "--host", host,
                "--port", str(port)]  # fmt: skip
        for name, value in options.items():
            argv.append(f"--{name}")
            argv.extend(str(v) for v in (value if isinstance(value, tuple) else (value,)))
        self.proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"hostile server {mode} did not start")
        self.host = host
        self.port = int(json.loads(line)["port"])
        self.connections = 0
        self._peer_ports: list[int] = []
        self._markers: set[int] = set()
        self._sent: list[tuple[int, int]] = []  # (peer port, bytes sent)
        self._changed = threading.Condition()
        threading.Thread(target=self._follow, daemon=True).start()

    def _follow(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            report = json.loads(line)
            with self._changed:
                if "connection" in report:
                    self.connections = int(report["connection"])
                    self._peer_ports.append(int(report["peer_port"]))
                if "sent" in report:
                    self._sent.append((int(report["peer_port"]), int(report["sent"])))
                self._changed.notify_all()

    def connections_so_far(self, timeout: float = 20.0) -> int:
        """How many connections others made before now (a marker connection settles the count)."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        with socket.socket(family) as marker:
            marker.connect((self.host, self.port))
            mine = marker.getsockname()[1]
            with self._changed:
                if not self._changed.wait_for(lambda: mine in self._peer_ports, timeout):
                    raise TimeoutError("the hostile server did not report the marker connection")
                before = self._peer_ports[: self._peer_ports.index(mine)]
                self._markers.add(mine)
                return sum(1 for port in before if port not in self._markers)

    def wait_sent(self, count: int = 1, timeout: float = 20.0) -> list[int]:
        """The byte counts of the first ``count`` finished connections (waits for them)."""

        def finished() -> list[int]:
            return [sent for port, sent in self._sent if port not in self._markers]

        with self._changed:
            if not self._changed.wait_for(lambda: len(finished()) >= count, timeout):
                raise TimeoutError(f"hostile server finished {len(finished())} of {count} connections")
            return finished()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> HostileServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
