"""A fan-out node behind a hostile upstream: garbage frames, a seq regression, a stall, a pruned history.

The upstream is ``tests.support.hostile_upstream`` (a scripted websocket server in its own
process). The node must report each problem (metrics, log), keep serving what it stored, record
the hole it cannot fill so consumers are told, and redial with a growing backoff.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libipld
import pytest

from protocol.frames import IdentityEvent, encode_frame, info_frame
from tests.support.fanout import FanoutProcess, raw_frames
from tests.support.procs import REPO_ROOT, http_json, wait_until

DID = "did:plc:hostileupstream000000000"


def event(seq: int) -> str:
    return encode_frame(IdentityEvent(seq=seq, did=DID, time="2026-01-01T00:00:00Z")).hex()


class Hostile:
    def __init__(self, script: list[list[dict[str, Any]]], work: Path) -> None:
        path = work / "script.json"
        path.write_text(json.dumps({"connections": script}))
        cmd = [sys.executable, "-m", "tests.support.hostile_upstream", "--script", str(path)]
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.port = int(json.loads(self.proc.stdout.readline())["port"])
        self.ws_url = f"ws://127.0.0.1:{self.port}"

    def connections(self) -> list[dict[str, Any]]:
        return list(http_json(f"http://127.0.0.1:{self.port}/control/connections")["connections"])

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[Hostile]:
    script = [
        # garbage between good events, then a seq that goes back: dropped, and the node redials
        [{"frame": event(1)}, {"frame": event(2)}, {"frame": b"\xa2\x01\x02garbage".hex()},
         {"frame": libipld.encode_dag_cbor({"op": 1, "t": "#commit"}).hex() + libipld.encode_dag_cbor({}).hex()},
         {"frame": event(3)}, {"frame": event(2)}, {"hold": 30}],
        # one event, then silence (not even pongs): the node's idle timeout ends it
        [{"frame": event(4)}, {"stall": 30}],
        # the node's cursor is older than this upstream's log: events 5-9 are gone
        [{"frame": info_frame("OutdatedCursor", "pruned").hex()}, {"frame": event(10)}, {"hold": 4}],
    ]  # fmt: skip
    upstream = Hostile(script, tmp_path)
    yield upstream
    upstream.stop()


def test_node_reports_bad_upstream_keeps_serving_and_backs_off(tmp_path: Path, hostile: Hostile) -> None:
    node = FanoutProcess(
        tmp_path / "node", hostile.ws_url, extra_env={"SKYRELAY_UPSTREAM_IDLE_TIMEOUT_SECONDS": "1.5"}
    ).start()
    try:
        wait_until(lambda: node.last_seq() >= 10, 60, "the node to store event 10")
        paths = [c["path"].rsplit("?", 1)[1] for c in hostile.connections()[:3]]
        assert paths == ["cursor=0", "cursor=3", "cursor=4"], node.log()

        assert node.metric("skyrelay_fanout_frames_dropped_total", reason="seq_not_increasing") == 1
        assert node.metric("skyrelay_fanout_frames_dropped_total", reason="bad_seq") == 1
        assert node.metric("skyrelay_fanout_frames_dropped_total") == 3  # and the garbage
        assert node.metric("skyrelay_fanout_upstream_reconnects_total", reason="requested") >= 1
        assert node.metric("skyrelay_fanout_upstream_reconnects_total", reason="read_failed") >= 1  # the stall
        assert node.metric("skyrelay_fanout_outdated_cursor_total") == 1
        assert node.metric("skyrelay_fanout_gaps_total") == 1
        assert node.metric("skyrelay_fanout_gap_seqs_total") == 5
        assert "fanout log gap recorded first_missing=5 last_missing=9" in node.log()

        # consumers get what the node has, and are told about the hole
        frames = [libipld.decode_dag_cbor_multi(f) for f in raw_frames(node.ws_url, 0, 6, timeout=10)]
        assert [b.get("seq") for _, b in frames] == [1, 2, 3, 4, None, 10]
        assert frames[4][0]["t"] == "#info" and frames[4][1]["name"] == "OutdatedCursor"
        inside = [libipld.decode_dag_cbor_multi(f) for f in raw_frames(node.ws_url, 6, 2, timeout=10)]
        assert [h["t"] for h, _ in inside] == ["#info", "#identity"] and inside[1][1]["seq"] == 10
        assert len(raw_frames(node.ws_url, 10, 1, timeout=1.0)) == 0

        # the upstream now refuses every connection: the node redials, waiting longer each time
        wait_until(lambda: len(hostile.connections()) >= 6, 60, "three more dial attempts")
        at = [c["at"] for c in hostile.connections()]
        assert at[4] - at[3] < at[5] - at[4], at
        # and it keeps serving what it stored
        assert len(raw_frames(node.ws_url, 0, 6, timeout=10)) == 6
        assert node.stop() == 0, node.log()
    finally:
        node.stop()
