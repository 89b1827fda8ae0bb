"""Fan-out nodes end to end: frame host -> relay -> two `skyrelay fanout` nodes -> HAProxy -> a consumer.

All real processes on loopback: the relay fed by a synthetic PDS, two fan-out nodes following it,
HAProxy running the shipped ``config/haproxy.cfg.example``. A consumer through the balancer gets
every event in seq order; the node serving it is killed (SIGKILL) mid-stream and the consumer
reconnects through the balancer with its cursor, reaching the other node, without a gap or a
duplicate; the killed node restarts and catches up from its own log; the relay and both nodes
serve the same bytes for the same cursor.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import libipld

from tests.integration.test_relay_spine import make_account
from tests.support.fanout import FanoutProcess, HaproxyProcess, RawStream, raw_frames
from tests.support.procs import RelayProcess, http_json, wait_until


def seq_of(frame: bytes) -> int:
    header, body = libipld.decode_dag_cbor_multi(frame)
    assert header.get("op") == 1 and header.get("t") != "#info", (header, body)
    return int(body["seq"])


def read_seqs(stream: RawStream, after: int, until: int, timeout: float = 60.0) -> list[int]:
    """Seqs received after ``after`` until ``until`` arrives (or the stream ends, or ``timeout`` passes).

    An overall deadline: a node's pings would keep each single read alive forever.
    """
    seqs: list[int] = []
    deadline = time.monotonic() + timeout
    while (seqs[-1] if seqs else after) < until and (left := deadline - time.monotonic()) > 0:
        frame = stream.recv(left)
        if frame is None:
            break
        seqs.append(seq_of(frame))
    return seqs


def test_two_nodes_behind_haproxy_are_interchangeable(tmp_path: Path, plc: Any, host: Any) -> None:
    writers = [make_account(plc, host, 40 + i) for i in range(4)]
    accounts = [{"did": w.did, "curve": "k256", "key_hex": w.key.to_bytes().hex()} for w in writers]
    relay = RelayProcess(
        tmp_path / "relay", database_url=f"sqlite:///{tmp_path / 'relay.sqlite'}", plc_url=plc.url
    ).start()
    nodes: list[FanoutProcess] = []
    balancer: HaproxyProcess | None = None
    try:
        relay.request_crawl(host.hostname)
        wait_until(lambda: host.status()["subscribers"] == 1, 20, "relay to subscribe")
        first = host.generate(accounts, commits=400)
        wait_until(lambda: relay.metric("skyrelay_last_seq") >= first, 60, "the relay to take the first batch")
        nodes = [FanoutProcess(tmp_path / f"node{i}", relay.ws_url).start() for i in (1, 2)]
        for node in nodes:
            wait_until(lambda n=node: n.last_seq() >= first, 60, "a node to catch up with the relay")
        balancer = HaproxyProcess(tmp_path / "haproxy", [f"127.0.0.1:{n.port}" for n in nodes])

        # a consumer through the balancer, from the start
        stream = RawStream(balancer.ws_url, cursor=0)
        served_by = nodes[0] if stream.node == "node1" else nodes[1]
        other = nodes[1] if served_by is nodes[0] else nodes[0]
        assert stream.node in ("node1", "node2"), stream.node
        got = read_seqs(stream, 0, until=first // 2)
        assert got == list(range(1, first // 2 + 1))

        # more events flow, paced so that they are still flowing when the serving node dies
        body = {"accounts": accounts, "commits": 600, "start_seq": first + 1, "hold": True}
        more = int(http_json(f"{host.url}/control/generate", body, timeout=600)["frames"])
        http_json(f"{host.url}/control/release", {"rate": 200})
        got += read_seqs(stream, got[-1], until=first + 50)
        served_by.kill9()
        assert relay.metric("skyrelay_last_seq") < first + more - len(accounts)  # mid-stream indeed
        cursor = got[-1]
        while (frame := stream.recv(2.0)) is not None:  # frames the kernel had already delivered
            cursor = seq_of(frame)
            got.append(cursor)
        stream.close()

        # reconnect through the balancer with the cursor: the other node answers
        # at most the second run's genesis commits are refused (stale); they come first
        wait_until(lambda: relay.metric("skyrelay_last_seq") >= first + more - len(accounts), 120, "the relay")
        total = int(relay.metric("skyrelay_last_seq"))
        assert total > first + 500
        again = RawStream(balancer.ws_url, cursor=cursor)
        assert again.node == ("node1" if other is nodes[0] else "node2")
        got += read_seqs(again, cursor, until=total)
        again.close()
        assert got == list(range(1, total + 1)), "gap or duplicate across the node switch"

        # the killed node restarts and catches up from its own log, not from zero
        served_by.start(wait_healthy=False)
        wait_until(lambda: served_by.last_seq() >= total, 60, "the restarted node to catch up")
        assert "fanout upstream connected" in served_by.log()
        resumed = [line for line in served_by.log().splitlines() if "fanout upstream connected" in line][-1]
        assert "cursor=0" not in resumed, resumed

        # the same bytes from the relay and from each node, for the same cursors
        for cursor in (0, total // 3):
            want = raw_frames(relay.ws_url, cursor, total - cursor, timeout=60)
            assert len(want) == total - cursor
            for node in nodes:
                assert raw_frames(node.ws_url, cursor, total - cursor, timeout=60) == want, node.log()
    finally:
        if balancer is not None:
            balancer.stop()
        for node in nodes:
            node.stop()
        assert relay.stop() == 0, relay.log()


def test_node_health_proxy_and_consumer_limit(tmp_path: Path, plc: Any, host: Any) -> None:
    relay = RelayProcess(
        tmp_path / "relay", database_url=f"sqlite:///{tmp_path / 'relay.sqlite'}", plc_url=plc.url
    ).start()
    node = FanoutProcess(
        tmp_path / "node",
        relay.ws_url,
        extra_env={"SKYRELAY_FANOUT_MAX_CONSUMERS": "1", "SKYRELAY_FANOUT_UNHEALTHY_AFTER_SECONDS": "1"},
    ).start()
    try:
        # requestCrawl is forwarded to the relay, which then subscribes to the host
        assert http_json(f"{node.url}/xrpc/com.atproto.sync.requestCrawl", {"hostname": host.hostname}) == {}
        wait_until(lambda: host.status()["subscribers"] == 1, 20, "relay to subscribe via the node")
        # sync reads are proxied; what the node does not serve is a 501
        hosts = http_json(f"{node.url}/xrpc/com.atproto.sync.listHosts")
        assert [h["hostname"] for h in hosts["hosts"]] == [host.hostname]
        status, body = _get(f"{node.url}/xrpc/com.atproto.sync.getRepoStatus?did=did:plc:nobody0000000000000000")
        assert status == 404 or status == 400, body
        status, body = _get(f"{node.url}/xrpc/com.atproto.sync.getBlob?did=did:plc:x&cid=x")
        assert (status, body["error"]) == (501, "MethodNotImplemented")

        # consumer limit: the second consumer is refused before the upgrade with XRPC JSON
        first = RawStream(node.ws_url, cursor=None)
        wait_until(lambda: node.metric("skyrelay_consumers") >= 1, 10, "the first consumer")
        status, body = _get(
            f"{node.url}/xrpc/com.atproto.sync.subscribeRepos",
            {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
             "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="},
        )  # fmt: skip
        assert (status, body["error"]) == (503, "ConsumerLimitReached"), body
        assert node.metric("skyrelay_fanout_consumers_refused_total") == 1
        first.close()

        # health follows the upstream: 503 once it has been down longer than the setting
        assert node.health()[0] == 200
        assert relay.stop() == 0, relay.log()
        wait_until(lambda: node.health()[0] == 503, 30, "the node to report its upstream down")
        assert node.health()[1]["upstream"].startswith("down for")
    finally:
        node.stop()
        relay.stop()


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")
