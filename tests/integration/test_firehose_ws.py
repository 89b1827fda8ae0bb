"""subscribeRepos over real sockets: replay, cursors, replay-to-live hand-off, slow consumers, a real SDK client.

Each test starts ``tests/support/firehose_server.py`` in a subprocess (gevent, real Broadcaster
actor, in-memory event log) and talks to it with websocket-client, raw sockets and the
``atproto`` SDK. The server's stderr must hold no error log or traceback at the end.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import websocket

from protocol.frames import ErrorFrame, Event, InfoEvent, decode_frame
from tests.conftest import REPO_ROOT
from tests.support.testdata import REFPDS_FRAMES

WAIT_S = 20.0
PATH = "/xrpc/com.atproto.sync.subscribeRepos"


class Server:
    def __init__(self, port: int) -> None:
        self.port = port

    def ws_url(self, cursor: str | int | None = None) -> str:
        query = "" if cursor is None else f"?cursor={cursor}"
        return f"ws://127.0.0.1:{self.port}{PATH}{query}"

    def post(self, path: str) -> dict[str, Any]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method="POST")
        with urllib.request.urlopen(req, timeout=WAIT_S) as resp:
            return json.loads(resp.read())

    def append(self, n: int, batch: int = 1, pause_ms: float = 0, background: bool = False) -> int:
        query = f"n={n}&batch={batch}&pause_ms={pause_ms}&background={int(background)}"
        return int(self.post(f"/_test/append?{query}")["target_seq"])

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/_test/stats", timeout=WAIT_S) as resp:
            return json.loads(resp.read())

    def wait_stats(self, predicate: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT_S
        while True:
            stats = self.stats()
            if predicate(stats):
                return stats
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {stats}"
            time.sleep(0.01)

    def connect(self, cursor: str | int | None = None, **kwargs: Any) -> websocket.WebSocket:
        return websocket.create_connection(self.ws_url(cursor), timeout=WAIT_S, **kwargs)


@contextmanager
def firehose_server(tmp_path: Path, *args: str) -> Iterator[Server]:
    stderr_path = tmp_path / "server.stderr"
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.firehose_server", *args],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    assert proc.stdout is not None
    try:
        ready, _, _ = select.select([proc.stdout], [], [], WAIT_S)
        line = proc.stdout.readline().decode() if ready else ""
        assert line.startswith("PORT "), f"server did not start: {line!r} {stderr_path.read_text()}"
        yield Server(int(line.split()[1]))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log = stderr_path.read_text()
    bad = [ln for ln in log.splitlines() if ln.startswith(("ERROR", "CRITICAL", "Traceback")) or "Error" in ln]
    assert not bad, "server logged errors:\n" + log


def recv_event(ws: websocket.WebSocket) -> Event:
    opcode, data = ws.recv_data()
    assert opcode == websocket.ABNF.OPCODE_BINARY, (opcode, data)
    return decode_frame(data)


def recv_seqs(ws: websocket.WebSocket, last_seq: int, on_frame: Callable[[int], None] | None = None) -> list[int]:
    """Seqs received until ``last_seq`` arrives (or something that is not an event)."""
    seqs: list[int] = []
    while not seqs or seqs[-1] < last_seq:
        event = recv_event(ws)
        seq = getattr(event, "seq", None)
        assert isinstance(seq, int), f"expected an event, got {event!r} after {seqs[-3:]}"
        seqs.append(seq)
        if on_frame is not None:
            on_frame(seq)
    return seqs


def recv_close(ws: websocket.WebSocket) -> int:
    """The status code of the server's close frame (the next frame must be a close)."""
    opcode, data = ws.recv_data(control_frame=True)
    assert opcode == websocket.ABNF.OPCODE_CLOSE, (opcode, data)
    return int.from_bytes(data[:2], "big")


def upgrade_request(server: Server, query: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """An HTTP GET of the firehose, with websocket upgrade headers by default; (status, JSON body)."""
    key = base64.b64encode(os.urandom(16)).decode()
    default = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": key, "Sec-WebSocket-Version": "13"}
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=WAIT_S)
    try:
        conn.request("GET", PATH + query, headers=default if headers is None else headers)
        resp = conn.getresponse()
        assert resp.getheader("Content-Type") == "application/json", resp.status
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_replay_from_zero_then_live(tmp_path: Path) -> None:
    with firehose_server(tmp_path, "--frames", "500") as server:
        ws = server.connect(0)
        assert recv_seqs(ws, 500) == list(range(1, 501))
        server.append(5, batch=2)
        assert recv_seqs(ws, 505) == list(range(501, 506))
        ws.close()


def test_replay_from_the_middle(tmp_path: Path) -> None:
    with firehose_server(tmp_path, "--frames", "500") as server:
        ws = server.connect(250)
        assert recv_seqs(ws, 500) == list(range(251, 501))
        server.append(1)
        assert recv_seqs(ws, 501) == [501]
        ws.close()


def test_no_cursor_is_live_only(tmp_path: Path) -> None:
    with firehose_server(tmp_path, "--frames", "500") as server:
        ws = server.connect()
        server.wait_stats(lambda s: s["consumers"] == 1, "the consumer to register")
        server.append(3, batch=3)
        assert recv_seqs(ws, 503) == [501, 502, 503]
        ws.close()


def test_cursor_at_the_head_waits_for_live_events(tmp_path: Path) -> None:
    with firehose_server(tmp_path, "--frames", "10") as server:
        ws = server.connect(10)
        server.wait_stats(lambda s: s["consumers"] == 1, "the consumer to register")
        server.append(2)
        assert recv_seqs(ws, 12) == [11, 12]
        ws.close()


def test_future_cursor_gets_an_error_frame_then_close(tmp_path: Path) -> None:
    with firehose_server(tmp_path, "--frames", "10") as server:
        ws = server.connect(11)
        event = recv_event(ws)
        assert isinstance(event, ErrorFrame) and event.error == "FutureCursor"
        assert recv_close(ws) == 1008
        server.wait_stats(lambda s: s["consumers"] == 0, "the consumer to unregister")


def test_outdated_cursor_gets_info_then_the_oldest_retained_events(tmp_path: Path) -> None:
    with firehose_server(tmp_path, "--frames", "300") as server:
        server.post("/_test/prune?before=101")
        ws = server.connect(5)
        info = recv_event(ws)
        assert isinstance(info, InfoEvent) and info.name == "OutdatedCursor"
        assert recv_seqs(ws, 300) == list(range(101, 301))
        ws.close()
        ws = server.connect(100)  # the event right before the oldest retained one: nothing missing
        assert recv_seqs(ws, 300) == list(range(101, 301))
        ws.close()


@pytest.mark.parametrize("cursor", ["abc", "-1", "1.5", "", "1e3", " 7", "99999999999999999999", "٣"])
def test_malformed_cursor_is_http_400_before_upgrade(tmp_path: Path, cursor: str) -> None:
    with firehose_server(tmp_path) as server:
        status, body = upgrade_request(server, "?cursor=" + urllib.parse.quote(cursor))
        assert (status, body["error"]) == (400, "InvalidRequest")
        with pytest.raises(websocket.WebSocketBadStatusException) as err:
            server.connect(urllib.parse.quote(cursor))
        assert err.value.status_code == 400


def test_malformed_cursor_without_the_upgrade_hook_gets_an_error_frame(tmp_path: Path) -> None:
    with firehose_server(tmp_path, "--no-upgrade-hook") as server:
        ws = server.connect("abc")  # gevent-websocket alone upgrades before the view can answer 400
        event = recv_event(ws)
        assert isinstance(event, ErrorFrame) and event.error == "InvalidRequest"
        recv_close(ws)


def test_plain_http_and_bad_handshakes_get_json_errors(tmp_path: Path) -> None:
    with firehose_server(tmp_path, "--frames", "3") as server:
        status, body = upgrade_request(server, "?cursor=1", headers={"Accept": "application/json"})
        assert (status, body["error"]) == (426, "InvalidRequest")
        status, body = upgrade_request(server, "?cursor=x", headers={"Accept": "application/json"})
        assert (status, body["error"]) == (400, "InvalidRequest")
        status, body = upgrade_request(server, "?cursor=1&cursor=2")
        assert (status, body["error"]) == (400, "InvalidRequest")
        status, body = upgrade_request(server, "?cursor=1", headers={"Upgrade": "websocket", "Connection": "Upgrade"})
        assert (status, body["error"]) == (400, "InvalidRequest")
        assert server.stats()["consumers"] == 0


def test_replay_hands_off_to_live_without_gap_or_duplicate(tmp_path: Path) -> None:
    """Clients replay a 20,000-event log while 5,000 more are appended and broadcast concurrently."""
    with firehose_server(tmp_path, "--frames", "20000") as server:
        target = server.append(5000, batch=5, pause_ms=2, background=True)
        results: dict[int, list[int]] = {}
        appending_at_log_end: dict[int, bool] = {}

        def consume(cursor: int) -> None:
            ws = server.connect(cursor)

            def note(seq: int) -> None:
                if seq == 20000:
                    appending_at_log_end[cursor] = server.stats()["appending"]

            results[cursor] = recv_seqs(ws, target, note)
            ws.close()

        threads = [threading.Thread(target=consume, args=(c,)) for c in (0, 12_345)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT_S * 2)
        assert results[0] == list(range(1, target + 1))
        assert results[12_345] == list(range(12_346, target + 1))
        # The hand-off really happened while events were being appended:
        assert appending_at_log_end == {0: True, 12_345: True}


def test_slow_consumer_is_cut_while_a_fast_one_gets_everything(tmp_path: Path) -> None:
    with firehose_server(tmp_path, "--buffer-frames", "200", "--frame-bytes", "4000") as server:
        slow = server.connect(sockopt=((socket.SOL_SOCKET, socket.SO_RCVBUF, 4096),))
        fast = server.connect()
        server.wait_stats(lambda s: s["consumers"] == 2, "both consumers to register")
        fast_seqs: list[int] = []
        reader = threading.Thread(target=lambda: fast_seqs.extend(recv_seqs(fast, 4000)))
        reader.start()
        target = server.append(4000, batch=10, pause_ms=1, background=True)
        assert target == 4000
        stats = server.wait_stats(lambda s: s["cuts"]["too_slow"] == 1, "the slow consumer to be cut")
        assert stats["consumers"] == 1
        reader.join(WAIT_S)
        assert fast_seqs == list(range(1, 4001))
        # The slow client now reads: contiguous events from the start, then ConsumerTooSlow, then close.
        seqs: list[int] = []
        while True:
            event = recv_event(slow)
            if isinstance(event, ErrorFrame):
                break
            seqs.append(event.seq)  # type: ignore[union-attr]
        assert event.error == "ConsumerTooSlow"
        assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) < 4000
        assert recv_close(slow) == 1008
        assert server.stats()["cuts"]["too_slow"] == 1
        fast.close()


def test_disconnects_unregister_and_pings_are_answered(tmp_path: Path) -> None:
    with firehose_server(tmp_path, "--frames", "50") as server:
        clean = server.connect(0)
        abrupt = server.connect(0)
        pinger = server.connect()
        server.wait_stats(lambda s: s["consumers"] == 3, "three consumers")
        pinger.ping(b"are you there")
        assert pinger.recv_data(control_frame=True) == (websocket.ABNF.OPCODE_PONG, b"are you there")
        assert recv_seqs(clean, 50)[-1] == 50
        clean.close()  # close handshake
        assert abrupt.sock is not None
        abrupt.sock.shutdown(socket.SHUT_RDWR)  # no close frame
        abrupt.sock.close()
        server.wait_stats(lambda s: s["consumers"] == 1, "two consumers to unregister")
        pinger.close()
        server.wait_stats(lambda s: s["consumers"] == 0, "the last consumer to unregister")


def raw_connect(server: Server) -> tuple[socket.socket, bytes]:
    """A websocket handshake on a plain socket: the socket and whatever followed the 101 response."""
    sock = socket.create_connection(("127.0.0.1", server.port), WAIT_S)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET {PATH} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, data
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock, rest


def raw_close_code(sock: socket.socket, data: bytes) -> int:
    """The status code of the close frame that must come next on ``sock`` (``data`` already read)."""
    while len(data) < 4:
        chunk = sock.recv(4096)
        assert chunk, data
        data += chunk
    assert data[0] == 0x88, data
    return int.from_bytes(data[2:4], "big")


@pytest.mark.parametrize(
    ("frame", "code", "reason"),
    [
        (b"\x82\xff" + (100_000).to_bytes(8, "big") + b"mask", 1009, "client_frame_too_big"),  # header only
        (b"\x82\x03abc", 1002, "client_protocol_error"),  # not masked
        (b"\x89\xfe\x00\xc8mask" + b"p" * 200, 1002, "client_protocol_error"),  # a 200-byte ping
        (b"\x83\x80mask", 1002, "client_protocol_error"),  # reserved opcode
    ],
)
def test_bad_client_frames_close_the_connection(tmp_path: Path, frame: bytes, code: int, reason: str) -> None:
    with firehose_server(tmp_path) as server:
        sock, rest = raw_connect(server)
        with sock:
            sock.sendall(frame)
            assert raw_close_code(sock, rest) == code
        stats = server.wait_stats(lambda s: s["consumers"] == 0, "the consumer to unregister")
        assert stats["cuts"][reason] == 1


def test_atproto_sdk_client_parses_every_reference_frame(tmp_path: Path) -> None:
    reference = REFPDS_FRAMES
    kinds = [json.loads(line)["t"] for line in reference.read_text().splitlines() if line.strip()]
    total = 2 * len(kinds)  # the recorded frames, re-sequenced, twice over
    from atproto import firehose_models, parse_subscribe_repos_message
    from atproto_firehose import FirehoseSubscribeReposClient

    with firehose_server(tmp_path, "--reference", str(reference), "--frames", str(total)) as server:
        client = FirehoseSubscribeReposClient({"cursor": 0}, base_uri=f"ws://127.0.0.1:{server.port}/xrpc")
        seen: list[tuple[int, str]] = []

        def on_message(frame: firehose_models.MessageFrame) -> None:
            message = parse_subscribe_repos_message(frame)
            seen.append((message.seq, frame.type))
            if len(seen) == total:
                client.stop()

        thread = threading.Thread(target=client.start, args=(on_message,), daemon=True)
        thread.start()
        thread.join(WAIT_S)
        client.stop()
        assert not thread.is_alive()
        assert [seq for seq, _ in seen] == list(range(1, total + 1))
        assert Counter(kind for _, kind in seen) == Counter(kinds * 2)


def test_socket_that_never_drains_is_dropped_after_the_stall_timeout(tmp_path: Path) -> None:
    with firehose_server(tmp_path, "--stall-seconds", "0.5", "--frame-bytes", "4000") as server:
        stuck = server.connect(sockopt=((socket.SOL_SOCKET, socket.SO_RCVBUF, 4096),))
        server.wait_stats(lambda s: s["consumers"] == 1, "the consumer to register")
        server.append(3000, batch=10, pause_ms=1, background=True)  # 12 MB, far more than socket buffers
        stats = server.wait_stats(lambda s: s["consumers"] == 0, "the stalled consumer to be dropped")
        assert stats["cuts"] == {**stats["cuts"], "send_stalled": 1, "too_slow": 0}
        stuck.close()
