"""Every SQL statement of a public read runs inside the reads layer's offload (the thread pool), on a kept connection.

The real app (``web.xrpc_sync`` and ``web.xrpc_repo`` over ``SyncReads``) with an offload that
marks when it runs: each statement the main database and the carstore database execute while
serving listHosts, getHostStatus and every repo read is checked to be inside it, and the main
database is connected once for all of them (not once per look-up).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import pytest

from actors.relay_reads import SyncReads
from protocol.repo_writer import RepoWriter
from store.hosts import ensure_host
from tests.support.fakes import BlueprintServices
from tests.unit.test_xrpc_repo import ALICE, URL, Relay, _data_requests, alice, relay
from web.app import create_app
from web.xrpc_repo import repo_blueprint
from web.xrpc_sync import sync_blueprint

__all__ = ["alice", "relay"]  # the fixtures
T = TypeVar("T")


def test_reads_run_their_sql_in_the_pool_on_kept_connections(
    relay: Relay, alice: RepoWriter, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with relay.db.connection_context():
        ensure_host(relay.db, "pds.example.com")
    inside = [False]
    outside: list[str] = []
    connects = [0]

    def offload(fn: Any) -> Any:
        inside[0] = True
        try:
            return fn()
        finally:
            inside[0] = False

    for db in (relay.db, relay.car_db):
        execute, connect = db.execute_sql, db.connect

        def checked(sql: str, *args: Any, _execute: Any = execute, **kw: Any) -> Any:
            if not inside[0]:
                outside.append(sql)
            return _execute(sql, *args, **kw)

        def counted(*args: Any, _connect: Any = connect, _db: Any = db, **kw: Any) -> Any:
            if _db is relay.db:
                connects[0] += 1
            return _connect(*args, **kw)

        monkeypatch.setattr(db, "execute_sql", checked)
        monkeypatch.setattr(db, "connect", counted)
    relay.db.close()
    reads = SyncReads(relay.db, relay.store, offload=offload)
    app = create_app(BlueprintServices(sync_blueprint(db=relay.db, host_supervisor=None, insecure=True, reads=reads),
                                       repo_blueprint(reads=reads)))  # fmt: skip
    client = app.test_client()
    calls = {**_data_requests(alice), "getRepoStatus": {"did": ALICE}, "listRepos": {}, "listHosts": {},
             "getHostStatus": {"hostname": "pds.example.com"}}  # fmt: skip
    for _ in range(3):
        for method, params in calls.items():
            resp = client.get(URL + method, query_string=params)
            assert resp.status_code == 200, (method, resp.get_data(as_text=True))
            resp.close()
    assert outside == []
    assert connects[0] == 1
