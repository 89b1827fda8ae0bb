"""Fuzz target for XRPC parameters: raw query strings (and requestCrawl bodies) sent to the app's routes.

``XrpcApp`` is the Flask app of the sync endpoints (``web.xrpc_sync``, ``web.xrpc_repo`` and the
plain-HTTP side of ``web.firehose``, whose pre-upgrade hook also sees every query string)
over SQLite in a temporary folder, with one host and one account whose repo is in the mirror;
``XrpcApp.run`` sends one request through Flask's test client. The first input byte picks the
route, the rest is the raw query string (as a WSGI server hands it over: any bytes) or, for
requestCrawl, the body. A finding is a 5xx answer or an error answer that is not XRPC JSON
(``{"error", "message"}``). No request reaches the network: name resolution fails for the
duration of each request, so requestCrawl stops at its address check.
"""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

from actors.relay_reads import SyncReads
from protocol.car import read_car
from protocol.crypto import K256, PrivateKey
from protocol.repo_writer import RepoWriter, Write
from store.accounts import AccountRow, upsert_accounts
from store.carstore import CarStore, SliceWrite
from store.db import open_database
from store.hosts import ensure_host
from store.migrations import apply_migrations
from tests.support.fakes import BlueprintServices, Recorder
from web.app import create_app
from web.firehose import firehose_blueprint, pre_upgrade_hook
from web.xrpc_repo import repo_blueprint
from web.xrpc_sync import sync_blueprint

DID = "did:plc:fuzzxrpc0000000000000000"
HOSTNAME = "pds.example.com"
GET_ROUTES = tuple(
    "/xrpc/com.atproto.sync." + name
    for name in ("listHosts", "getHostStatus", "getRepo", "getRecord", "getBlocks", "getLatestCommit",
                 "listRepos", "getRepoStatus", "subscribeRepos")
)  # fmt: skip
CRAWL = "/xrpc/com.atproto.sync.requestCrawl"


def _gaierror(*_args: object, **_kwargs: object) -> Any:
    raise socket.gaierror(socket.EAI_NONAME, "name resolution is off while fuzzing")


class XrpcApp:
    """The app under test, its databases and the one repo it serves (see the module docstring)."""

    def __init__(self, folder: Path | None = None) -> None:
        self._tmp = None if folder else tempfile.TemporaryDirectory(prefix="skyrelay-fuzz-xrpc-")
        root = folder or Path(self._tmp.name)  # type: ignore[union-attr]
        self.db = open_database(f"sqlite:///{root / 'relay.sqlite'}")
        apply_migrations(self.db)
        self.car_db = open_database(f"sqlite:///{root / 'carstore.sqlite'}")
        self.store = CarStore(root / "repos", self.car_db, fsync=False)
        self.store.open()
        writer = RepoWriter(DID, PrivateKey.from_bytes(K256, bytes(range(1, 33))))
        for n in range(3):
            record = {"$type": "app.bsky.feed.post", "text": f"post {n}", "createdAt": "2024-01-01T00:00:00Z"}
            event = writer.commit([Write("create", f"app.bsky.feed.post/3k{n:011d}", record)])
            blocks = list(read_car(event.blocks).blocks.items())
            self.store.write_slices([SliceWrite(DID, event.rev, event.since, event.commit, writer.data, blocks)])
        with self.db.connection_context(), self.db.atomic():
            host = ensure_host(self.db, HOSTNAME)
            upsert_accounts(
                self.db,
                [AccountRow(DID, host.id, "active", "active", writer.rev, writer.commit_cid, writer.data, False)],
            )
        self.supervisor = Recorder()
        blueprints = (
            sync_blueprint(db=self.db, host_supervisor=self.supervisor, insecure=False),
            repo_blueprint(reads=SyncReads(self.db, self.store)),
            firehose_blueprint(None, None, buffer_frames=1),  # type: ignore[arg-type]  # no upgrade: no log read
        )
        self.client = create_app(BlueprintServices(*blueprints)).test_client()

    def request(self, data: bytes) -> tuple[str, Any]:
        """Send the request ``data`` describes; return (route, response)."""
        routes = (*GET_ROUTES, CRAWL)
        route = routes[data[0] % len(routes)] if data else routes[0]
        rest = data[1:]
        with mock.patch("socket.getaddrinfo", _gaierror):
            if route == CRAWL:
                response = self.client.post(route, data=rest, content_type="application/json")
            else:
                query = rest.decode("latin-1")
                response = self.client.get(route, environ_overrides={"QUERY_STRING": query})
                handler = SimpleNamespace(environ={"PATH_INFO": route, "QUERY_STRING": query})
                assert pre_upgrade_hook(handler) in (True, False)  # gevent-websocket's hook, before any upgrade
        return route, response

    def run(self, data: bytes) -> None:
        """The target: a request must get a success or an XRPC error below 500."""
        route, response = self.request(data)
        status = response.status_code
        assert status < 500, (route, data[1:], status, response.get_data(as_text=True)[:300])
        if status >= 400:
            body = response.get_json(silent=True)
            assert isinstance(body, dict) and isinstance(body.get("error"), str), (route, status, body)
            assert isinstance(body.get("message"), str), (route, status, body)

    def close(self) -> None:
        self.store.close()
        self.car_db.close()
        self.db.close()
        if self._tmp is not None:
            self._tmp.cleanup()


def seeds() -> list[bytes]:
    """One plausible request per route (the fuzzer mutates from there)."""
    queries = [
        b"limit=2&cursor=1",
        b"hostname=" + HOSTNAME.encode(),
        b"did=" + DID.encode(),
        b"did=" + DID.encode() + b"&collection=app.bsky.feed.post&rkey=3k00000000001",
        b"did=" + DID.encode() + b"&cids=bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm",
        b"did=" + DID.encode(),
        b"limit=10&cursor=did:plc:a",
        b"did=" + DID.encode(),
        b"cursor=0",
    ]
    out = [bytes([i]) + query for i, query in enumerate(queries)]
    out.append(bytes([len(GET_ROUTES)]) + b'{"hostname": "pds.example.com"}')
    return out
