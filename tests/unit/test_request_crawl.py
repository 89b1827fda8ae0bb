"""requestCrawl: hostname rules (SSRF guards, bans, ports), the PDS probe, and XRPC 4xx errors."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from actors.crawl import CrawlRefused, is_banned, normalize_hostname
from actors.messages import StartHost
from store.db import open_database
from store.hosts import add_domain_ban
from store.migrations import apply_migrations
from tests.support.fakes import BlueprintServices, Recorder
from web.app import create_app
from web.xrpc_sync import sync_blueprint


class _Pds(BaseHTTPRequestHandler):
    answer: Any = {"did": "did:web:pds.test", "availableUserDomains": [".test"]}

    def do_GET(self) -> None:
        if self.path != "/xrpc/com.atproto.server.describeServer":
            self.send_error(404)
            return
        body = json.dumps(self.answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _NotPds(_Pds):
    answer = {"error": "MethodNotImplemented"}


def _serve(handler: type[BaseHTTPRequestHandler]) -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


@pytest.fixture
def pds_port() -> Iterator[int]:
    yield from _serve(_Pds)


@pytest.fixture
def not_pds_port() -> Iterator[int]:
    yield from _serve(_NotPds)


def make_app(tmp_path: Path, *, insecure: bool) -> tuple[Flask, Recorder, Any]:
    db = open_database(f"sqlite:///{tmp_path / 'c.sqlite'}")
    apply_migrations(db)
    hosts = Recorder()
    app = create_app(BlueprintServices(sync_blueprint(db=db, host_supervisor=hosts, insecure=insecure)))
    return app, hosts, db


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("pds.example.com", "pds.example.com"),
        ("PDS.Example.COM", "pds.example.com"),
        ("https://pds.example.com/", "pds.example.com"),
        ("pds.example.com:443", "pds.example.com"),
    ],
)
def test_production_hostnames_accepted(raw: str, expected: str) -> None:
    target = normalize_hostname(raw, insecure=False)
    assert target.hostname == expected
    assert target.base_url == f"https://{expected}"


@pytest.mark.parametrize(
    "raw",
    ["localhost", "localhost:2583", "127.0.0.1", "10.0.0.1", "pds.example.com:8080", "http://pds.example.com",
     "pds", "pds.local", "a..b", "-bad-.example.com", "user@pds.example.com", "pds.example.com/path", "", None, 42,
     "x" * 300 + ".com", "[::1]"],
)  # fmt: skip
def test_production_refuses_unsafe_hosts(raw: object) -> None:
    with pytest.raises(CrawlRefused):
        normalize_hostname(raw, insecure=False)


def test_insecure_mode_accepts_loopback_with_ports() -> None:
    assert normalize_hostname("localhost:2583", insecure=True).base_url == "http://localhost:2583"
    assert normalize_hostname("127.0.0.1:9", insecure=True).hostname == "127.0.0.1:9"


def test_bans_match_subdomains() -> None:
    assert is_banned("evil.example.com", ["example.com"])
    assert is_banned("example.com", ["example.com"])
    assert not is_banned("notexample.com", ["example.com"])
    assert is_banned("pds.evil.test:2583", ["evil.test"])


def test_request_crawl_starts_a_subscriber(tmp_path: Path, pds_port: int) -> None:
    app, hosts, _ = make_app(tmp_path, insecure=True)
    resp = app.test_client().post("/xrpc/com.atproto.sync.requestCrawl", json={"hostname": f"localhost:{pds_port}"})
    assert resp.status_code == 200, resp.json
    assert hosts.told == [StartHost(f"localhost:{pds_port}")]


def test_request_crawl_errors_are_xrpc_4xx(tmp_path: Path, not_pds_port: int) -> None:
    app, hosts, db = make_app(tmp_path, insecure=True)
    client = app.test_client()
    url = "/xrpc/com.atproto.sync.requestCrawl"
    cases = [
        (client.post(url, data="not json"), "InvalidRequest"),
        (client.post(url, json={"hostname": 7}), "InvalidRequest"),
        (client.post(url, json={"hostname": "bad host"}), "InvalidRequest"),
        (client.post(url, json={"hostname": f"localhost:{not_pds_port}"}), "HostNotPds"),
        (client.post(url, json={"hostname": "localhost:1"}), "HostUnreachable"),
    ]
    with db.connection_context():
        add_domain_ban(db, "banned.test")
    cases.append((client.post(url, json={"hostname": "pds.banned.test:1"}), "HostBanned"))
    for resp, error in cases:
        assert 400 <= resp.status_code < 500
        assert resp.json is not None and resp.json["error"] == error, resp.json
        assert resp.json["message"]
    assert hosts.told == []
    assert client.get(url).status_code == 405


def test_list_hosts_and_host_status(tmp_path: Path, pds_port: int) -> None:
    app, _, db = make_app(tmp_path, insecure=True)
    client = app.test_client()
    from store.hosts import ensure_host

    with db.connection_context():
        for i in range(3):
            ensure_host(db, f"pds{i}.example.com")
    page = client.get("/xrpc/com.atproto.sync.listHosts?limit=2").json
    assert page is not None and [h["hostname"] for h in page["hosts"]] == ["pds0.example.com", "pds1.example.com"]
    rest = client.get(f"/xrpc/com.atproto.sync.listHosts?limit=2&cursor={page['cursor']}").json
    assert rest is not None and [h["hostname"] for h in rest["hosts"]] == ["pds2.example.com"]
    status = client.get("/xrpc/com.atproto.sync.getHostStatus?hostname=pds1.example.com").json
    assert status is not None and status["status"] == "active"
    missing = client.get("/xrpc/com.atproto.sync.getHostStatus?hostname=nope.example.com")
    assert missing.status_code == 400 and missing.json is not None and missing.json["error"] == "HostNotFound"
    bad = client.get("/xrpc/com.atproto.sync.listHosts?limit=0")
    assert bad.status_code == 400 and bad.json is not None and bad.json["error"] == "InvalidRequest"


def test_non_utf8_query_is_a_400_not_a_500(tmp_path: Path) -> None:
    app, _, _ = make_app(tmp_path, insecure=True)
    resp = app.test_client().get("/xrpc/com.atproto.sync.listHosts", environ_overrides={"QUERY_STRING": "limit=\xff"})
    assert resp.status_code == 400
    assert resp.json is not None and resp.json["error"] == "InvalidRequest"
