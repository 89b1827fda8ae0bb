"""A scripted, misbehaving firehose upstream for fan-out node tests: garbage, seq regressions, stalls.

Run as ``python -m tests.support.hostile_upstream --script FILE``; prints ``{"port": n}`` once
listening on 127.0.0.1. The script is JSON ``{"connections": [[action, ...], ...]}``: the k-th
subscribeRepos connection plays the k-th list, then is closed; connections past the list are
refused with a close at once. Actions:

- ``{"frame": "<hex>"}``: send these bytes as one binary websocket message;
- ``{"stall": seconds}``: send nothing and answer nothing (pings included) for that long;
- ``{"hold": seconds}``: stay connected, answering pings, for that long.

``GET /control/connections`` answers ``{"connections": [{"path": ..., "at": monotonic}, ...]}``.
Plain threads and sockets (no gevent), so its timing is independent of the node under test.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import select
import socketserver
import struct
import sys
import threading
import time
from typing import Any

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Upstream(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, script: list[list[dict[str, Any]]]) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.script = script
        self.lock = threading.Lock()
        self.connections: list[dict[str, Any]] = []


class Handler(socketserver.StreamRequestHandler):
    server: Upstream

    def handle(self) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.request.recv(4096)
            if not chunk:
                return
            head += chunk
        lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        path = lines[0].split(" ")[1]
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if path.startswith("/control/connections"):
            with self.server.lock:
                body = json.dumps({"connections": self.server.connections}).encode()
            self._answer("200 OK", body)
            return
        if not path.startswith("/xrpc/com.atproto.sync.subscribeRepos"):
            self._answer("404 Not Found", b'{"error":"NotFound","message":"no such thing here"}')
            return
        with self.server.lock:
            index = len(self.server.connections)
            self.server.connections.append({"path": path, "at": time.monotonic()})
        key = headers.get("sec-websocket-key", "").encode()
        accept = base64.b64encode(hashlib.sha1(key + _GUID).digest()).decode()
        self.request.sendall(
            (
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Accept: {accept}\r\n\r\n"
            ).encode()
        )
        actions = self.server.script[index] if index < len(self.server.script) else []
        try:
            for action in actions:
                if "frame" in action:
                    self.request.sendall(_ws_frame(0x2, bytes.fromhex(action["frame"])))
                elif "stall" in action:
                    time.sleep(float(action["stall"]))
                elif "hold" in action:
                    self._hold(float(action["hold"]))
            self.request.sendall(_ws_frame(0x8, struct.pack("!H", 1000)))
        except OSError:
            return

    def _hold(self, seconds: float) -> None:
        """Stay connected, answering each ping with a pong (client frames are small: read whole)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.request], [], [], left)
            if not ready:
                continue
            data = self.request.recv(4096)
            if not data:
                return
            if data[0] & 0x0F == 0x9:
                length = data[1] & 0x7F
                mask, payload = data[2:6], data[6 : 6 + length]
                self.request.sendall(_ws_frame(0xA, bytes(b ^ mask[i % 4] for i, b in enumerate(payload))))

    def _answer(self, status: str, body: bytes) -> None:
        self.request.sendall(
            f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n".encode()
            + body
        )


def _ws_frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return head + payload


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--script", required=True)
    args = parser.parse_args()
    with open(args.script) as fh:
        script = json.load(fh)["connections"]
    server = Upstream(script)
    print(json.dumps({"port": server.server_address[1]}), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
