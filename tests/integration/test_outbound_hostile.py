"""The outbound client and requestCrawl against hostile servers (real processes on loopback).

The policy in these tests allows only 127.0.0.1 (``outbound_allowed_networks=127.0.0.1/32``),
so a redirect or a name that leads to 127.0.0.2, another loopback address, shows what a
production relay does with a private address.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from actors.addrguard import AddressPolicy, DnsServerResolver
from actors.crawl import probe_pds
from actors.mirror import fetch_repo
from actors.outbound import Limits, OutboundClient
from actors.outbound_errors import (
    BadStatus,
    BadUrl,
    ConnectFailed,
    OutboundTimeout,
    ProtocolFailure,
    RefusedAddress,
    TooLarge,
)
from store.db import open_database
from store.migrations import apply_migrations
from tests.support.dns_stub import DnsStub
from tests.support.fakes import BlueprintServices, Recorder
from tests.support.hostile_http import HostileServer
from tests.support.procs import free_port
from tests.support.tls import client_context, make_certificate
from web.app import create_app
from web.xrpc_sync import sync_blueprint

ONLY_127_0_0_1 = AddressPolicy.for_mode(True, ["127.0.0.1/32"])
CRAWL = "/xrpc/com.atproto.sync.requestCrawl"
FAST = Limits(total_seconds=2.0, read_seconds=2.0, max_bytes=64 * 1024)


@pytest.fixture
def client() -> OutboundClient:
    return OutboundClient(ONLY_127_0_0_1)


@pytest.fixture
def other_loopback() -> Iterator[HostileServer]:
    """A server on 127.0.0.2 that only counts who connects: nobody may."""
    with HostileServer("silent", host="127.0.0.2") as server:
        yield server


def crawl_app(tmp_path: Path, client: OutboundClient, limits: Limits = FAST) -> tuple[Flask, Recorder]:
    db = open_database(f"sqlite:///{tmp_path / 'crawl.sqlite'}")
    apply_migrations(db)
    hosts = Recorder()
    probe = lambda target: probe_pds(target, client=client, limits=limits)  # noqa: E731
    bp = sync_blueprint(db=db, host_supervisor=hosts, insecure=True, outbound=client, probe=probe)
    return create_app(BlueprintServices(bp)), hosts


def crawl(app: Flask, hostname: str) -> tuple[int, dict[str, Any]]:
    resp = app.test_client().post(CRAWL, json={"hostname": hostname})
    assert resp.json is not None
    return resp.status_code, resp.json


def test_redirect_to_another_loopback_address_is_not_followed(
    tmp_path: Path, client: OutboundClient, other_loopback: HostileServer
) -> None:
    target = f"http://127.0.0.2:{other_loopback.port}/xrpc/com.atproto.server.describeServer"
    with HostileServer("redirect", location=target) as pds:
        app, hosts = crawl_app(tmp_path, client)
        status, body = crawl(app, f"127.0.0.1:{pds.port}")
        assert status == 400 and body["error"] == "HostNotPds", body
        with pytest.raises(BadStatus) as err:
            client.get(f"http://127.0.0.1:{pds.port}/", FAST)
        assert err.value.status == 302
    assert other_loopback.connections_so_far() == 0
    assert hosts.told == []


def test_https_redirect_to_http_is_not_followed(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path, "pds.test")
    with DnsStub() as dns, HostileServer("silent") as plain:
        location = f"http://127.0.0.1:{plain.port}/"
        with HostileServer("redirect", tls=(cert, key), location=location) as pds:
            dns.set("pds.test", ["127.0.0.1"])
            tls_only = AddressPolicy(False, ONLY_127_0_0_1.allowed_networks)
            client = OutboundClient(tls_only, resolver=DnsServerResolver(dns.server), ssl_context=client_context(cert))
            with pytest.raises(BadStatus):  # TLS verified against the name while connecting to the checked address
                client.get(f"https://pds.test:{pds.port}/", FAST)
            assert pds.connections_so_far() == 1
        assert plain.connections_so_far() == 0


def test_a_server_dripping_one_byte_a_second_hits_the_total_deadline(client: OutboundClient) -> None:
    for mode in ("drip", "drip-head"):
        with HostileServer(mode, interval=1.0) as server:
            started = time.monotonic()
            with pytest.raises(OutboundTimeout):
                client.get(f"http://127.0.0.1:{server.port}/", Limits(2.5, 5.0, 10_000_000))
            assert time.monotonic() - started < 4.5, mode  # per-read timeouts alone would never end


def test_backfill_download_has_a_deadline(tmp_path: Path, client: OutboundClient) -> None:
    with HostileServer("drip", interval=1.0) as server, pytest.raises(OutboundTimeout):
        fetch_repo(client, f"http://127.0.0.1:{server.port}", "did:plc:x", Limits(2.0, 5.0, 1 << 20), tmp_path)


def test_an_endless_chunked_body_is_cut_at_the_cap(tmp_path: Path, client: OutboundClient) -> None:
    cap = 1 << 20
    with HostileServer("chunked-flood") as server:
        with pytest.raises(TooLarge):
            fetch_repo(client, f"http://127.0.0.1:{server.port}", "did:plc:x", Limits(30.0, 5.0, cap), tmp_path)
        (sent,) = server.wait_sent()
    assert sent < 40 * cap  # the server was cut off long before its 200 MB (socket buffers hold a few MB)
    assert list(tmp_path.iterdir()) == []  # the spool file is gone


def test_a_chunk_declared_over_the_cap_is_refused_before_it_is_read(client: OutboundClient) -> None:
    with HostileServer("huge-chunk") as server, pytest.raises(TooLarge):
        client.get(f"http://127.0.0.1:{server.port}/", Limits(10.0, 5.0, 1 << 20))


def test_malformed_status_line_is_a_typed_failure_and_a_crawl_4xx(tmp_path: Path, client: OutboundClient) -> None:
    with HostileServer("bad-status") as server:
        with pytest.raises(ProtocolFailure):
            client.get(f"http://127.0.0.1:{server.port}/", FAST)
        app, hosts = crawl_app(tmp_path, client)
        status, body = crawl(app, f"127.0.0.1:{server.port}")
    assert status == 400 and body["error"] == "HostNotPds", body
    assert "two hundred" not in body["message"]
    assert hosts.told == []


def test_refused_reset_and_silent_ports_look_the_same_to_a_client(tmp_path: Path, client: OutboundClient) -> None:
    app, _ = crawl_app(tmp_path, client, Limits(1.0, 1.0, 64 * 1024))
    answers = {"refused": crawl(app, f"127.0.0.1:{free_port()}")}
    for mode in ("reset", "silent"):
        with HostileServer(mode) as server:
            answers[mode] = crawl(app, f"127.0.0.1:{server.port}")
    assert answers["refused"] == answers["reset"] == answers["silent"], answers
    status, body = answers["refused"]
    assert status == 400 and body["error"] == "HostUnreachable"
    for leak in ("refused", "Errno", "reset by peer", "timed out"):
        assert leak not in body["message"].split("(")[0]
    with pytest.raises(ConnectFailed) as err:
        client.get(f"http://127.0.0.1:{free_port()}/", FAST)
    assert "Errno" not in str(err.value)


def test_a_name_is_resolved_once_and_rebinding_is_refused(other_loopback: HostileServer) -> None:
    with DnsStub() as dns, HostileServer("status", status=200) as good:
        dns.set("pds.test", ["127.0.0.1"], ["127.0.0.2"])
        client = OutboundClient(ONLY_127_0_0_1, resolver=DnsServerResolver(dns.server))
        assert client.get(f"http://pds.test:{good.port}/", FAST).status == 200
        with pytest.raises(RefusedAddress):  # the second look-up answers 127.0.0.2
            client.get(f"http://pds.test:{other_loopback.port}/", FAST)
        assert dns.lookups["pds.test"] == 2
    assert other_loopback.connections_so_far() == 0


def test_production_refuses_plaintext_and_loopback() -> None:
    production = OutboundClient(AddressPolicy.for_mode(False))
    with HostileServer("status", status=200) as server:
        with pytest.raises(BadUrl):
            production.get(f"http://127.0.0.1:{server.port}/", FAST)
        with pytest.raises(RefusedAddress):
            production.get(f"https://127.0.0.1:{server.port}/", FAST)
        assert server.connections_so_far() == 0


def test_a_tls_handshake_that_never_completes_hits_the_deadline(dns_name_client: OutboundClient) -> None:
    with HostileServer("silent") as server:  # accepts, reads the ClientHello, never answers
        started = time.monotonic()
        with pytest.raises(OutboundTimeout):
            dns_name_client.get(f"https://pds.test:{server.port}/", Limits(1.5, 5.0, 1000))
        assert time.monotonic() - started < 4.0


def test_post_sends_its_body_and_reads_the_answer(client: OutboundClient) -> None:
    class Echo(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            answer = json.dumps({"got": json.loads(body), "type": self.headers["Content-Type"]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/xrpc/x"
        response = client.request(
            "POST", url, FAST, body=json.dumps({"hostname": "a"}).encode(), headers={"Content-Type": "application/json"}
        )
        assert json.loads(response.body) == {"got": {"hostname": "a"}, "type": "application/json"}
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def dns_name_client(tmp_path: Path) -> Iterator[OutboundClient]:
    cert, _ = make_certificate(tmp_path, "pds.test")
    with DnsStub() as dns:
        dns.set("pds.test", ["127.0.0.1"])
        tls_only = AddressPolicy(False, ONLY_127_0_0_1.allowed_networks)
        yield OutboundClient(tls_only, resolver=DnsServerResolver(dns.server), ssl_context=client_context(cert))


def test_proxies_from_the_environment_are_ignored(
    tmp_path: Path, client: OutboundClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    with HostileServer("silent") as proxy, HostileServer("bad-status") as pds:
        for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
            monkeypatch.setenv(name, f"http://127.0.0.1:{proxy.port}")
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        app, _ = crawl_app(tmp_path, client)
        status, body = crawl(app, f"127.0.0.1:{pds.port}")
        assert (status, body["error"]) == (400, "HostNotPds")  # the answer came from the host itself
        assert pds.connections_so_far() == 1
        assert proxy.connections_so_far() == 0
