"""Many silent upstream hosts in one process: each port answers like a PDS and then sends nothing.

Run as ``python -m scripts.benchkit.idle_hosts --hosts N``. It listens on N loopback ports (one
host each, since a host is a name and port) and on a control port, and prints
``{"port": CONTROL, "hosts": [PORT, ...]}`` once listening. Every host port answers
``describeServer`` (the crawl probe) and an empty ``listRepos`` (the enumerator), and accepts
a ``subscribeRepos`` websocket on which it never sends an event: it only answers pings with
pongs and a close with a close. ``GET /status`` on the control port answers
``{"connected": k, "subscriptions": s, "pings": p}`` (open websockets, handshakes so far,
pings answered).
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import base64  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
from gevent.server import StreamServer  # noqa: E402

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
STATS = {"connected": 0, "subscriptions": 0, "pings": 0}


def raise_nofile() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _head(sock: socket.socket) -> tuple[str, dict[str, str]] | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk or len(data) > 16384:
            return None
        data += chunk
    lines = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return (parts[1] if len(parts) > 1 else "/"), headers


def _answer(sock: socket.socket, status: str, body: Any) -> None:
    raw = json.dumps(body).encode()
    head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(raw)}\r\n"
    head += "Connection: close\r\n\r\n"
    sock.sendall(head.encode() + raw)


def _read_exact(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _frame(opcode: int, payload: bytes) -> bytes:
    return struct.pack("!BB", 0x80 | opcode, len(payload)) + payload


def _silent_websocket(sock: socket.socket, headers: dict[str, str]) -> None:
    """Upgrade, then answer control frames until the peer goes away; never send a message."""
    accept = base64.b64encode(hashlib.sha1(headers.get("sec-websocket-key", "").encode() + _GUID).digest())
    sock.sendall(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )
    STATS["subscriptions"] += 1
    STATS["connected"] += 1
    try:
        while True:
            head = _read_exact(sock, 2)
            if head is None:
                return
            opcode, length = head[0] & 0x0F, head[1] & 0x7F
            if length == 126:
                length = struct.unpack("!H", _read_exact(sock, 2) or b"\0\0")[0]
            elif length == 127:
                length = struct.unpack("!Q", _read_exact(sock, 8) or b"\0" * 8)[0]
            mask = _read_exact(sock, 4) if head[1] & 0x80 else b"\0\0\0\0"
            payload = _read_exact(sock, length) if length else b""
            if mask is None or payload is None:
                return
            payload = bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
            if opcode == 0x9:
                STATS["pings"] += 1
                sock.sendall(_frame(0xA, payload[:125]))
            elif opcode == 0x8:
                sock.sendall(_frame(0x8, payload[:2]))
                return
    except OSError:
        return
    finally:
        STATS["connected"] -= 1


def _host(sock: socket.socket, address: Any) -> None:
    try:
        got = _head(sock)
        if got is None:
            return
        path, headers = got
        if path.startswith("/xrpc/com.atproto.sync.subscribeRepos"):
            _silent_websocket(sock, headers)
        elif path.startswith("/xrpc/com.atproto.server.describeServer"):
            _answer(sock, "200 OK", {"did": "did:web:idle.invalid", "availableUserDomains": []})
        elif path.startswith("/xrpc/com.atproto.sync.listRepos"):
            _answer(sock, "200 OK", {"repos": []})
        else:
            _answer(sock, "404 Not Found", {"error": "NotFound"})
    except OSError:
        pass
    finally:
        sock.close()


def _control(sock: socket.socket, address: Any) -> None:
    try:
        if _head(sock) is not None:
            _answer(sock, "200 OK", STATS)
    except OSError:
        pass
    finally:
        sock.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hosts", type=int, default=3000)
    args = p.parse_args()
    raise_nofile()
    servers = [StreamServer(("127.0.0.1", 0), _host, backlog=128) for _ in range(args.hosts)]
    for server in servers:
        server.start()
    control = StreamServer(("127.0.0.1", 0), _control)
    control.start()
    ports = [server.server_port for server in servers]
    print(json.dumps({"port": control.server_port, "hosts": ports}), flush=True)
    try:
        gevent.wait()
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
