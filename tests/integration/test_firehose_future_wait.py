"""A firehose that may be a moment behind its peers (a fan-out node) lets a cursor ahead of it wait.

With ``future_cursor_wait_seconds`` the connection waits for the log to reach the cursor, then
replays from it as usual; past the wait it is ``FutureCursor`` as before. Without it (the
relay) a cursor ahead is ``FutureCursor`` at once (tests/integration/test_firehose_ws.py).
"""

from __future__ import annotations

from pathlib import Path

from protocol.frames import ErrorFrame
from tests.integration.test_firehose_ws import firehose_server, recv_close, recv_event, recv_seqs


def test_cursor_ahead_waits_for_the_log_then_gets_the_events_after_it(tmp_path: Path) -> None:
    with firehose_server(tmp_path, "--frames", "10", "--future-wait-seconds", "30") as server:
        ws = server.connect(13)
        server.wait_stats(lambda s: s["consumers"] == 1, "the consumer to register")
        server.append(5)
        assert recv_seqs(ws, 15) == [14, 15]
        ws.close()


def test_cursor_ahead_past_the_wait_is_future_cursor(tmp_path: Path) -> None:
    with firehose_server(tmp_path, "--frames", "10", "--future-wait-seconds", "0.5") as server:
        ws = server.connect(11)
        event = recv_event(ws)
        assert isinstance(event, ErrorFrame) and event.error == "FutureCursor"
        assert recv_close(ws) == 1008
        server.wait_stats(lambda s: s["consumers"] == 0, "the consumer to unregister")
