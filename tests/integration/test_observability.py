"""Observability of a running relay (subprocess): OTLP traces over HTTP, the metrics listener,
``/_health``, the idle host status and JSON log lines carrying trace ids."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from protocol.crypto import PrivateKey
from protocol.frames import encode_frame
from protocol.repo_writer import RepoWriter, Write
from tests.support.fake_plc import FakePlc, make_did_doc, new_plc_did
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.procs import FrameHost, RelayProcess, free_port, http_json, wait_until

STAGES = ["event.decode", "event.verify", "event.sequence", "event.durable", "event.broadcast"]


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def make_writer(plc: FakePlc, host: FrameHost) -> RepoWriter:
    key = PrivateKey.generate("k256")
    did = new_plc_did()
    plc.put(did, make_did_doc(did, key.public_key().did_key(), host.url))
    return RepoWriter(did, key)


def post(i: int) -> Write:
    return Write("create", f"app.bsky.feed.post/3k{i:011d}", {"$type": "app.bsky.feed.post", "text": f"post {i}"})


@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "2-workers"])
def test_traces_reach_an_otlp_receiver_and_metrics_have_their_own_listener(
    tmp_path: Path, plc: FakePlc, host: FrameHost, workers: int
) -> None:
    metrics_port = free_port()
    with OtlpReceiver() as receiver:
        relay = RelayProcess(
            tmp_path / "relay",
            database_url=f"sqlite:///{tmp_path / 'relay.sqlite'}",
            plc_url=plc.url,
            extra_env={
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                "OTEL_SERVICE_NAME": "relay-under-test",
                "SKYRELAY_TRACE_EVENTS_RATIO": "1",
                "SKYRELAY_LOG_FORMAT": "json",
                "SKYRELAY_METRICS_BIND": f"127.0.0.1:{metrics_port}",
                "SKYRELAY_INGEST_WORKERS": str(workers),  # samples then cross the worker link
            },
        ).start()
        try:
            assert relay.request_crawl(host.hostname) == {}
            wait_until(lambda: host.status()["subscribers"] == 1, 20, "relay to subscribe")
            writer = make_writer(plc, host)
            host.push([encode_frame(writer.commit([], 1)), encode_frame(writer.commit([post(1)], 2))])

            metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
            wait_until(
                lambda: 'skyrelay_events_accepted_total{type="#commit"} 2.0' in get(metrics_url)[1].decode(),
                30,
                "two commits accepted, seen on the metrics listener",
            )
            assert get(f"{relay.url}/metrics")[0] == 404  # not on the main listener any more
            status, body = get(f"http://127.0.0.1:{metrics_port}/xrpc/_health")
            assert status == 404 and json.loads(body)["error"] == "NotFound"
            status, body = get(f"{relay.url}/_health")
            assert status == 200 and json.loads(body)["database"] == "ok"
        finally:
            assert relay.stop() == 0, relay.log()  # stopping exports the spans still pending

        assert receiver.paths and set(receiver.paths) == {"/v1/traces"}
        received = receiver.spans()
        assert {resource["service.name"] for resource, _ in received} == {"relay-under-test"}
        spans = [span for _, span in received]
        roots = [s for s in spans if s.name == "upstream.event"]
        assert len(roots) == 2
        for root in roots:
            attrs = {a.key: a.value for a in root.attributes}
            assert attrs["host"].string_value == host.hostname
            assert attrs["did"].string_value == writer.did
            children = [s for s in spans if s.parent_span_id == root.span_id]
            assert sorted(c.name for c in children) == sorted(STAGES)
            assert all(c.trace_id == root.trace_id for c in children)
        (crawl,) = [s for s in spans if s.name == "POST /xrpc/com.atproto.sync.requestCrawl"]
        status_code = next(a.value.int_value for a in crawl.attributes if a.key == "http.response.status_code")
        assert status_code == 200

        # the log line written while handling requestCrawl carries that request's trace id
        lines = [json.loads(line) for line in relay.log_path.read_text().splitlines() if line.startswith("{")]
        (crawl_line,) = [line for line in lines if line["msg"].startswith("crawl requested")]
        assert crawl_line["trace_id"] == crawl.trace_id.hex()
        assert crawl_line["span_id"] == crawl.span_id.hex()
        assert any(line["msg"].startswith(f"host added host={host.hostname}") for line in lines)


def test_a_connected_silent_host_is_idle_until_it_sends_again(tmp_path: Path, plc: FakePlc, host: FrameHost) -> None:
    relay = RelayProcess(
        tmp_path / "relay",
        database_url=f"sqlite:///{tmp_path / 'relay.sqlite'}",
        plc_url=plc.url,
        extra_env={"SKYRELAY_HOST_IDLE_STATUS_SECONDS": "1"},
    ).start()
    status_url = f"{relay.url}/xrpc/com.atproto.sync.getHostStatus?hostname={host.hostname}"
    try:
        relay.request_crawl(host.hostname)
        wait_until(lambda: host.status()["subscribers"] == 1, 20, "relay to subscribe")
        wait_until(lambda: http_json(status_url)["status"] == "idle", 30, "the silent host to show as idle")
        listed = http_json(f"{relay.url}/xrpc/com.atproto.sync.listHosts")["hosts"]
        assert [(h["hostname"], h["status"]) for h in listed] == [(host.hostname, "idle")]

        writer = make_writer(plc, host)
        seq = 0

        def send_and_check() -> bool:
            nonlocal seq
            seq += 1
            host.push([encode_frame(writer.commit([] if seq == 1 else [post(seq)], seq))])
            return bool(http_json(status_url)["status"] == "active")

        wait_until(send_and_check, 30, "the host to be active again while it sends", interval=0.1)
    finally:
        assert relay.stop() == 0, relay.log()


def test_bench_tracing_runs_and_prints_every_row() -> None:
    import subprocess
    import sys

    from tests.support.procs import REPO_ROOT

    out = subprocess.run(
        [sys.executable, "scripts/bench_tracing.py", "--events", "2000", "--repeat", "1"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    for row in ("baseline (no hooks)", "off (default)", "on, ratio 0.001", "on, ratio 0.01", "on, ratio 1"):
        assert row in out
