"""Chaos: the data directory fills up, or PostgreSQL restarts, in the middle of ingest.

The relay runs as a real subprocess fed by a frame-host subprocess; a real firehose client
reads it throughout. Every event that client was delivered (acknowledged) must still be in
the log afterwards, byte for byte; relay seqs stay contiguous, no upstream event is logged
twice, nothing is lost, and ingest resumes by itself once the disk or the database is back.
The relay reports the trouble meanwhile (a log line and ``skyrelay_infrastructure_*``).

The disk test mounts a small tmpfs (so it must run as root, as CI does) and fills it with a
ballast file. The PostgreSQL tests exist when TEST_DATABASE_URL is set: one kills the relay's
server processes (as a crash of the server would), one restarts the local server once
(``pg_ctlcluster``, as root), which other test runs on that server notice.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import libipld
import psycopg2
import pytest
import websocket

from protocol.crypto import PrivateKey
from store.db import TRANSIENT_DB_ERRORS, open_database
from tests.support.consumer import collect
from tests.support.fake_plc import FakePlc, make_did_doc, new_plc_did
from tests.support.procs import FrameHost, RelayProcess, http_json, wait_until

# the PostgreSQL tests exist only with TEST_DATABASE_URL, like the db_url fixture's PostgreSQL variants
PG_BASE = os.environ.get("TEST_DATABASE_URL", "")


class LiveConsumer:
    """A firehose client in a thread from cursor 0: every (seq, frame) it is delivered, in order."""

    def __init__(self, ws_url: str) -> None:
        self.ws = websocket.create_connection(f"{ws_url}/xrpc/com.atproto.sync.subscribeRepos?cursor=0", timeout=5)
        self.frames: list[tuple[int, bytes]] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except BaseException as exc:
                if not self._stop.is_set():
                    self.error = exc
                return
            if not isinstance(data, bytes) or not data:  # closed
                if not self._stop.is_set():
                    self.error = ConnectionError(f"firehose closed: {data!r}")
                return
            _, body = libipld.decode_dag_cbor_multi(data)
            self.frames.append((int(body["seq"]), bytes(data)))

    def close(self) -> None:
        self._stop.set()
        self.ws.close()
        self.thread.join(timeout=10)


def accounts_on(plc: FakePlc, host: FrameHost, n: int) -> list[dict[str, str]]:
    out = []
    for i in range(n):
        key = PrivateKey.generate("k256")
        did = new_plc_did()
        plc.put(did, make_did_doc(did, key.public_key().did_key(), host.url, handle=f"chaos{i}.test"))
        out.append({"did": did, "curve": "k256", "key_hex": key.to_bytes().hex()})
    return out


def check_log(relay: RelayProcess, consumer: LiveConsumer, total: int) -> None:
    """The log holds 1..total once each; everything the consumer was delivered is there unchanged."""
    wait_until(lambda: len(consumer.frames) >= total or consumer.error, 60, "the consumer to catch up")
    assert consumer.error is None, consumer.error
    replay = collect(relay.ws_url, cursor=0, count=total + 1, timeout=30)
    assert [b["seq"] for _, b in replay] == list(range(1, total + 1)), relay.log()
    upstream = [(b["repo"], b["rev"]) for _, b in replay]
    assert len(set(upstream)) == len(upstream)  # no upstream event logged twice
    encoded = {b["seq"]: libipld.encode_dag_cbor(b) for _, b in replay}
    seen = [s for s, _ in consumer.frames]
    assert seen == list(range(1, len(seen) + 1))  # delivered contiguous, no duplicate
    for seq, frame in consumer.frames:
        assert libipld.encode_dag_cbor(libipld.decode_dag_cbor_multi(frame)[1]) == encoded[seq], seq


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode:
        pytest.fail(f"this test mounts a tmpfs and must run as root: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Write a ballast file until the filesystem is full (ENOSPC); its path."""
    ballast = disk / "ballast"
    with ballast.open("wb", buffering=0) as f:
        for chunk in (1 << 20, 1 << 16, 1 << 12, 1 << 8, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError:
                continue
    return ballast


def test_data_dir_filling_up_stops_ingest_and_it_resumes(small_disk: Path, plc: FakePlc, host: FrameHost) -> None:
    accounts = accounts_on(plc, host, 4)
    relay = RelayProcess(small_disk / "data", database_url=f"sqlite:///{small_disk / 'data' / 'relay.sqlite'}",
                         plc_url=plc.url)  # fmt: skip
    relay.log_path = small_disk.parent / "relay.log"  # the relay's output must not need the full disk
    relay.start()
    consumer = None
    try:
        relay.request_crawl(host.hostname)
        wait_until(lambda: host.status()["subscribers"] == 1, 20, "relay to subscribe")
        consumer = LiveConsumer(relay.ws_url)
        first = host.generate(accounts, commits=200)
        wait_until(lambda: relay.metric("skyrelay_last_seq") >= first, 60, "ingest before the disk fills")

        ballast = fill(small_disk)
        more = host.generate(accounts, commits=300, start_seq=first + 1)
        failing = 'skyrelay_infrastructure_failing{operation="event_log_append"}'
        wait_until(lambda: relay.metric("skyrelay_infrastructure_failing", operation="event_log_append") == 1,
                   60, f"{failing} while the disk is full")  # fmt: skip
        wait_until(lambda: relay.metric("skyrelay_infrastructure_retries_total", operation="event_log_append") >= 4,
                   60, "a few retries while the disk stays full")  # fmt: skip
        stalled = relay.metric("skyrelay_last_seq")
        assert stalled < first + more  # ingest stopped
        assert "infrastructure failure: retrying operation=event_log_append" in relay.log()
        assert relay.proc is not None and relay.proc.poll() is None  # and the relay did not die
        assert len(consumer.frames) <= stalled

        ballast.unlink()  # space comes back
        wait_until(lambda: relay.metric("skyrelay_last_seq") >= first + more, 120, "ingest to resume")
        assert relay.metric("skyrelay_infrastructure_failing", operation="event_log_append") == 0
        assert relay.metric("skyrelay_infrastructure_retries_total", operation="event_log_append") >= 1
        check_log(relay, consumer, first + more)
    finally:
        if consumer is not None:
            consumer.close()
        status = relay.stop()
    assert status == 0, relay.log()
    relay.start()  # the log reopens without repair, with the same events
    try:
        replay = collect(relay.ws_url, cursor=0, count=first + more + 1, timeout=30)
        assert [b["seq"] for _, b in replay] == list(range(1, first + more + 1))
        assert "torn tail removed" not in relay.log()
    finally:
        assert relay.stop() == 0, relay.log()


def restart_postgresql(down_seconds: float = 3.0) -> None:
    """Stop the server, keep it down for ``down_seconds`` (longer than the relay's 1 s write-behind
    tick, so the relay meets it down instead of reconnecting unnoticed afterwards), start it again."""
    version = os.listdir("/etc/postgresql")[0]
    for action in ("stop", "start"):
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action], check=True,
                       capture_output=True, timeout=120)  # fmt: skip
        if action == "stop":
            time.sleep(down_seconds)  # the outage itself, not a wait for work
    deadline = time.monotonic() + 60
    while subprocess.run(["pg_isready", "-h", "127.0.0.1", "-p", "5432"], capture_output=True).returncode != 0:
        if time.monotonic() > deadline:
            raise TimeoutError("PostgreSQL did not come back")
        time.sleep(0.2)


def kill_backends(base: str, application_name: str) -> int:
    """Terminate every server process of one client (what a crash of the server does to it)."""
    conn = psycopg2.connect(base)
    try:
        conn.autocommit = True
        cur = conn.cursor()
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
                    (application_name,))  # fmt: skip
        return len(cur.fetchall())
    finally:
        conn.close()


def run_sql(base: str, statement: str) -> None:
    conn = psycopg2.connect(base)
    try:
        conn.autocommit = True
        conn.cursor().execute(statement)
    finally:
        conn.close()


@contextlib.contextmanager
def own_schema(base: str) -> Iterator[tuple[str, str]]:
    """(URL, application name) of a fresh schema; dropped afterwards over a new connection (the server restarts)."""
    name = "chaos_" + uuid.uuid4().hex[:12]
    run_sql(base, f"CREATE SCHEMA {name}")
    try:
        yield f"{base}?options={quote('-csearch_path=' + name)}&application_name={name}", name
    finally:
        run_sql(base, f"DROP SCHEMA {name} CASCADE")


def connection_closed_by_the_server_is_not_reused() -> None:
    """A statement run outside connection_context (the event log's metadata does) after a server crash."""
    base = PG_BASE
    with own_schema(base) as (url, name):
        db = open_database(url)
        assert db.execute_sql("SELECT 1").fetchone() == (1,)
        assert kill_backends(base, name) == 1
        with pytest.raises(TRANSIENT_DB_ERRORS):
            db.execute_sql("SELECT 1")
        assert db.execute_sql("SELECT 1").fetchone() == (1,)  # it used to say "connection already closed" forever
        db.close()


@pytest.mark.parametrize("outage", ["backends_killed", "server_restarted"])
def database_outage_during_ingest_loses_nothing(tmp_path: Path, plc: FakePlc, host: FrameHost, outage: str) -> None:
    base = PG_BASE
    accounts = accounts_on(plc, host, 4)
    with own_schema(base) as (url, name):
        relay = RelayProcess(tmp_path / "data", database_url=url, plc_url=plc.url,
                             extra_env={"CARSTORE_DATABASE_URL": url})  # one database for both  # fmt: skip
        relay.start()
        consumer = None
        try:
            relay.request_crawl(host.hostname)
            wait_until(lambda: host.status()["subscribers"] == 1, 20, "relay to subscribe")
            consumer = LiveConsumer(relay.ws_url)
            first = host.generate(accounts, commits=100)
            wait_until(lambda: relay.metric("skyrelay_last_seq") >= first, 60, "ingest before the outage")
            body: dict[str, Any] = {"accounts": accounts, "commits": 2000, "start_seq": first + 1, "hold": True}
            more = int(http_json(f"{host.url}/control/generate", body, timeout=600)["frames"])
            http_json(f"{host.url}/control/release", {"rate": 200})  # ~10 s of ingest ...
            wait_until(lambda: relay.metric("skyrelay_last_seq") >= first + 200, 30, "ingest under way")
            if outage == "server_restarted":  # ... with the database gone in the middle of it
                restart_postgresql()
            else:
                for _ in range(3):
                    kill_backends(base, name)
                    time.sleep(0.5)
            last_upstream = first + more
            wait_until(lambda: relay.metric("skyrelay_last_seq") >= last_upstream, 120, "ingest to finish")
            if outage == "server_restarted":  # write-behind runs every second: it met the server down
                assert relay.metric("skyrelay_infrastructure_retries_total", operation="write_behind") >= 1
            else:  # killed connections are met by whatever used them next (mirror, metadata, write-behind)
                assert relay.metric("skyrelay_infrastructure_retries_total") >= 1 or (
                    "event log metadata update failed" in relay.log()
                ), relay.log()
            assert relay.proc is not None and relay.proc.poll() is None
            status_url = f"{relay.url}/xrpc/com.atproto.sync.getHostStatus?hostname={host.hostname}"
            wait_until(lambda: host_seq(status_url) >= last_upstream, 30, "cursors written behind again")
            check_log(relay, consumer, last_upstream)
        finally:
            if consumer is not None:
                consumer.close()
            status = relay.stop()
        assert status == 0, relay.log()


def host_seq(url: str) -> int:
    """The host's upstream cursor as SQL has it (-1 while the read fails: a request may meet a dead connection)."""
    try:
        return int(http_json(url)["seq"])
    except OSError:
        return -1


if PG_BASE:
    test_a_connection_the_server_closed_is_not_reused = connection_closed_by_the_server_is_not_reused
    test_database_outage_during_ingest_loses_nothing = database_outage_during_ingest_loses_nothing
