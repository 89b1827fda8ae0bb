"""Firehose limits as a hostile or broken consumer meets them: replay cap, byte cap, pings, yielding replays.

The server is ``tests/support/firehose_server.py`` in a subprocess (real blueprint, broadcaster
and gevent server; in-memory log), as in ``test_firehose_ws.py``.
"""

from __future__ import annotations

import socket
import threading
import urllib.request
from pathlib import Path

import gevent
import websocket

from actors.broadcaster import ConsumerRegistry
from tests.integration.test_firehose_ws import (
    WAIT_S,
    firehose_server,
    raw_connect,
    recv_event,
    recv_seqs,
)
from web.firehose_connection import Connection, ConnectionLimits, ReplaySlots

SMALL_RCVBUF = ((socket.SOL_SOCKET, socket.SO_RCVBUF, 4096),)


def health(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_test/stats", timeout=WAIT_S) as resp:
        return int(resp.status)


def test_replays_beyond_the_cap_wait_their_turn_while_the_server_keeps_answering(tmp_path: Path) -> None:
    # 4,000 frames of 4 KB: 16 MB, far more than the socket buffers of a consumer that does not read
    with firehose_server(tmp_path, "--frames", "4000", "--frame-bytes", "4000", "--max-replays", "2") as server:
        stuck = [server.connect(0, sockopt=SMALL_RCVBUF) for _ in range(2)]
        server.wait_stats(lambda s: s["replays"]["running"] == 2, "two replays running")
        waiting = server.connect(0)
        stats = server.wait_stats(lambda s: s["replays"]["waiting"] == 1, "the third replay to wait")
        assert stats["replays"]["running"] == 2
        assert health(server.port) == 200  # the server answers while the replays hold their slots
        stuck[0].close()  # a slot frees: the waiting consumer's replay starts, from the start
        assert recv_event(waiting).seq == 1
        server.wait_stats(lambda s: s["replays"]["waiting"] == 0, "no replay waiting")
        waiting.close()
        stuck[1].close()
        server.wait_stats(lambda s: s["consumers"] == 0 and s["replays"]["running"] == 0, "every slot given back")


def test_many_replays_from_zero_all_complete_never_more_than_the_cap_at_once(tmp_path: Path) -> None:
    with firehose_server(tmp_path, "--frames", "3000", "--frame-bytes", "2000", "--max-replays", "3") as server:
        results: dict[int, list[int]] = {}

        def consume(i: int) -> None:
            ws = server.connect(0)
            results[i] = recv_seqs(ws, 3000)
            ws.close()

        threads = [threading.Thread(target=consume, args=(i,), daemon=True) for i in range(12)]
        for thread in threads:
            thread.start()
        samples = []
        while any(thread.is_alive() for thread in threads):
            samples.append(server.stats()["replays"])  # the server keeps answering meanwhile
        for thread in threads:
            thread.join(WAIT_S)
        assert all(seqs == list(range(1, 3001)) for seqs in results.values()) and len(results) == 12
        assert max(sample["running"] for sample in samples) <= 3
        assert server.stats()["replays"] == {"running": 0, "waiting": 0}


def test_a_consumer_whose_queue_exceeds_the_byte_cap_is_cut(tmp_path: Path) -> None:
    args = ("--frame-bytes", "100000", "--buffer-frames", "20000", "--buffer-bytes", "1000000")
    with firehose_server(tmp_path, *args) as server:
        slow = server.connect(sockopt=SMALL_RCVBUF)
        server.wait_stats(lambda s: s["consumers"] == 1, "the consumer to register")
        server.append(300, batch=5, pause_ms=1, background=True)  # 30 MB; 300 frames << 20,000
        stats = server.wait_stats(lambda s: s["consumers"] == 0, "the slow consumer to be cut")
        assert stats["cuts"]["too_slow"] == 1
        slow.close()


def test_an_idle_consumer_is_pinged_and_kept(tmp_path: Path) -> None:
    with firehose_server(tmp_path, "--ping-seconds", "0.3") as server:
        ws = server.connect()
        for _ in range(3):  # websocket-client answers each ping with a pong
            opcode, _frame = ws.recv_data_frame(control_frame=True)
            assert opcode == websocket.ABNF.OPCODE_PING
        stats = server.stats()
        assert stats["consumers"] == 1 and stats["cuts"]["ping_timeout"] == 0
        server.append(1)
        assert recv_event(ws).seq == 1
        ws.close()


def test_a_dead_consumer_is_cut_after_an_unanswered_ping(tmp_path: Path) -> None:
    with firehose_server(tmp_path, "--ping-seconds", "0.3") as server:
        sock, _rest = raw_connect(server)  # handshake done, then silence: never a pong
        with sock:
            server.wait_stats(lambda s: s["consumers"] == 1, "the consumer to register")
            stats = server.wait_stats(lambda s: s["consumers"] == 0, "the dead consumer to be cut")
            assert stats["cuts"]["ping_timeout"] == 1
        live = server.connect()
        server.append(1)
        assert recv_event(live).seq == 1
        live.close()


class _MemoryLog:
    def __init__(self, count: int) -> None:
        self.frames = [(seq, b"\xa0" * 2000) for seq in range(1, count + 1)]

    @property
    def last_seq(self) -> int:
        return len(self.frames)

    @property
    def first_seq(self) -> int:
        return 1

    def read_after(self, cursor: int, max_records: int = 1000) -> list[tuple[int, bytes]]:
        return self.frames[cursor : cursor + max_records]


class _AlwaysWritable:
    """A socket that takes every byte at once (the fastest possible reader)."""

    def __init__(self) -> None:
        self.bytes = 0

    def setsockopt(self, *args: object) -> None:
        pass

    def send(self, data: memoryview, flags: int = 0, timeout: float | None = None) -> int:
        self.bytes += len(data)
        return len(data)


class _Ws:
    def __init__(self) -> None:
        self.handler = type("Handler", (), {"socket": _AlwaysWritable()})()


def test_a_replay_to_a_socket_that_always_accepts_still_yields() -> None:
    """Other greenlets (``_health``, live consumers) run while a replay writes as fast as it can."""
    limits = ConnectionLimits(1000, 1 << 20, 30.0, 4096, 30.0)
    connection = Connection(_Ws(), _MemoryLog(20_000), ConsumerRegistry(), "test", limits, ReplaySlots(1))
    ticks: list[int] = []

    def other_work() -> None:
        while True:
            ticks.append(1)
            gevent.sleep(0)

    ticker = gevent.spawn(other_work)
    gevent.sleep(0)
    replay = gevent.spawn(connection._replay, 0)
    replay.join(WAIT_S)
    ran_during_replay = len(ticks)
    ticker.kill()
    assert replay.value == 20_000
    assert ran_during_replay > 10, "the replay never let another greenlet run"
