"""Kept-alive connections of the outbound client (``actors.outbound_pool``) against a scripted server.

The server is a real listening socket on 127.0.0.1 whose answers a test scripts per request:
it counts the connections it accepts, so reuse (or its refusal) is seen from the other end.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from actors.addrguard import AddressPolicy
from actors.identity import IdentityDirectory
from actors.outbound import Limits, OutboundClient
from actors.outbound_errors import ProtocolFailure
from actors.outbound_pool import ConnectionPool
from protocol.crypto import PrivateKey
from tests.support.fake_plc import FakePlc, make_did_doc, new_plc_did

ONLY_127_0_0_1 = AddressPolicy.for_mode(True, ["127.0.0.1/32"])
FAST = Limits(total_seconds=3.0, read_seconds=3.0, max_bytes=64 * 1024)

# An answer script: (connection number, request number on it) -> raw bytes to send, or None to
# close the connection without answering.
Script = Callable[[int, int], bytes | None]


def answer(body: bytes, *, version: str = "1.1", extra: str = "", trailing: bytes = b"") -> bytes:
    head = f"HTTP/{version} 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body + trailing


class ScriptedServer:
    """Accepts connections on 127.0.0.1 and answers each request as ``script`` says."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self._open: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}/doc"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            self._open.append(conn)
            threading.Thread(target=self._serve, args=(conn, self.connections), daemon=True).start()

    def drop_idle(self) -> None:
        """Close every connection from this side, as a server's idle timeout does."""
        for conn in self._open:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _serve(self, conn: socket.socket, number: int) -> None:
        buffer = b""
        request = 0
        with conn:
            while True:
                while b"\r\n\r\n" not in buffer:
                    try:
                        piece = conn.recv(4096)
                    except OSError:
                        return
                    if not piece:
                        return
                    buffer += piece
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                self.requests.append(head)
                request += 1
                reply = self.script(number, request)
                if reply is None:
                    return
                conn.sendall(reply)
                if b"content-length:" not in reply.lower():
                    return  # an unframed body ends where the connection does

    def close(self) -> None:
        self._stop.set()
        self._listener.close()


@pytest.fixture
def serve() -> Iterator[Callable[[Script], ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def start(script: Script) -> ScriptedServer:
        servers.append(ScriptedServer(script))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def get(client: OutboundClient, url: str) -> bytes:
    return client.request("GET", url, FAST, keep_alive=True).body


def test_a_kept_connection_carries_the_next_requests(serve: Callable[[Script], ScriptedServer]) -> None:
    server = serve(lambda conn, n: answer(f"answer {n}".encode()))
    client = OutboundClient(ONLY_127_0_0_1)
    assert [get(client, server.url) for _ in range(3)] == [b"answer 1", b"answer 2", b"answer 3"]
    assert server.connections == 1
    assert all(b"\r\nConnection: keep-alive" in head for head in server.requests)
    assert len(client.pool) == 1


def test_without_keep_alive_every_request_has_its_connection(serve: Callable[[Script], ScriptedServer]) -> None:
    server = serve(lambda conn, n: answer(b"x"))
    client = OutboundClient(ONLY_127_0_0_1)
    for _ in range(3):
        assert client.get(server.url, FAST).body == b"x"
    assert server.connections == 3
    assert all(b"\r\nConnection: close" in head for head in server.requests)
    assert len(client.pool) == 0


@pytest.mark.parametrize(
    "reply",
    [
        answer(b"x", extra="Connection: close\r\n"),  # the server says so
        answer(b"x", version="1.0"),  # HTTP/1.0 closes unless told otherwise
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nx",  # the body ends at the close
    ],
    ids=["connection-close", "http-1.0", "unframed-body"],
)
def test_an_answer_that_does_not_allow_reuse_is_not_pooled(
    serve: Callable[[Script], ScriptedServer], reply: bytes
) -> None:
    def script(conn: int, n: int) -> bytes | None:
        return reply if n == 1 else None

    server = serve(script)
    client = OutboundClient(ONLY_127_0_0_1)
    assert get(client, server.url) == b"x"
    assert len(client.pool) == 0
    assert get(client, server.url) == b"x"
    assert server.connections == 2


def test_a_connection_the_server_closed_while_idle_is_not_used(serve: Callable[[Script], ScriptedServer]) -> None:
    server = serve(lambda conn, n: answer(f"on {conn}".encode()))
    client = OutboundClient(ONLY_127_0_0_1)
    assert get(client, server.url) == b"on 1"
    server.drop_idle()
    assert get(client, server.url) == b"on 2"  # the pooled connection was found closed before use
    assert server.connections == 2 and len(server.requests) == 2


def test_a_get_meeting_a_connection_closed_as_it_is_sent_goes_out_again(
    serve: Callable[[Script], ScriptedServer],
) -> None:
    # the server closes connection 1 only when the next request arrives on it: the race a
    # kept-alive client meets when the server's idle timeout fires as the request is sent
    server = serve(lambda conn, n: answer(f"on {conn}".encode()) if n == 1 else None)
    client = OutboundClient(ONLY_127_0_0_1)
    assert get(client, server.url) == b"on 1"
    assert get(client, server.url) == b"on 2"
    assert server.connections == 2


def test_bytes_sent_unasked_make_a_kept_connection_unusable(serve: Callable[[Script], ScriptedServer]) -> None:
    server = serve(lambda conn, n: answer(f"on {conn}".encode(), trailing=b"HTTP/1.1 200 OK\r\n\r\nforged"))
    client = OutboundClient(ONLY_127_0_0_1)
    assert get(client, server.url) == b"on 1"
    assert get(client, server.url) == b"on 2"  # not the forged answer waiting on connection 1
    assert server.connections == 2


def test_a_post_is_not_sent_twice(serve: Callable[[Script], ScriptedServer]) -> None:
    server = serve(lambda conn, n: answer(b"ok") if n == 1 else None)
    client = OutboundClient(ONLY_127_0_0_1)
    assert client.request("POST", server.url, FAST, body=b"{}", keep_alive=True).body == b"ok"
    with pytest.raises(ProtocolFailure):
        client.request("POST", server.url, FAST, body=b"{}", keep_alive=True)
    assert server.connections == 1


def test_a_trusting_client_keeps_its_own_connections(serve: Callable[[Script], ScriptedServer]) -> None:
    server = serve(lambda conn, n: answer(b"x"))
    client = OutboundClient(ONLY_127_0_0_1)
    trusting = client.trusting(server.url)
    assert get(trusting, server.url) == b"x"
    assert len(trusting.pool) == 1 and len(client.pool) == 0
    assert get(client, server.url) == b"x"
    assert server.connections == 2


class _Pair:
    """A connected socket pair posing as a pooled connection (the pool probes ``sock``)."""

    def __init__(self) -> None:
        from actors.outbound import Connection
        from actors.outbound_http import SocketReader

        self.sock, self.peer = socket.socketpair()
        self.conn = Connection(self.sock, SocketReader(self.sock, 1.0), 1024)
        self.closed = False

    @property
    def raw(self):  # type: ignore[no-untyped-def]
        return self.conn.raw

    @property
    def reader(self):  # type: ignore[no-untyped-def]
        return self.conn.reader

    def close(self) -> None:
        self.closed = True
        self.sock.close()
        self.peer.close()


def test_the_pool_is_bounded_per_host_in_all_and_in_age() -> None:
    now = [0.0]
    pool: ConnectionPool[_Pair] = ConnectionPool(max_per_key=2, max_idle=3, idle_seconds=10.0, clock=lambda: now[0])
    a, b = ("http", "a", 80), ("http", "b", 80)
    pairs = [_Pair() for _ in range(5)]
    for pair in pairs[:3]:
        pool.put(a, pair)
    assert pairs[0].closed and len(pool) == 2  # a third idle connection to one host pushes out its oldest
    pool.put(b, pairs[3])
    pool.put(b, pairs[4])
    assert pairs[1].closed and len(pool) == 3  # the oldest of all goes when the pool is full
    assert pool.take(a) is pairs[2]
    now[0] = 11.0
    assert pool.take(b) is None  # idle too long: closed, not reused
    assert pairs[3].closed and pairs[4].closed and len(pool) == 0


def test_the_identity_directory_keeps_its_connection_to_the_plc() -> None:
    dids = [new_plc_did() for _ in range(5)]
    key = PrivateKey.generate("k256").public_key().did_key()
    docs = {did: make_did_doc(did, key, "http://127.0.0.1:1") for did in dids}
    with FakePlc(docs) as plc:
        directory = IdentityDirectory(None, plc_url=plc.url, allow_insecure_hosts=True)
        for did in dids:
            assert directory.resolve(did).did == did
        assert plc.requests == 5
        assert plc.connections == 1
