"""Process lifecycle: start-up refusals (exit 2, one line), database retries, a bounded exit after a fatal error.

Each test runs ``skyrelay serve`` as a real subprocess. A database "locked longer than its busy
timeout" is made the way it happens: another process holds SQLite's write lock.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import REPO_ROOT, FrameHost, RelayProcess, free_port, wait_until


def serve_once(data_dir: Path, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``skyrelay serve`` expected to refuse to start: its status and output."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SKYRELAY_") and "DATABASE_URL" not in k}
    base.update({"SKYRELAY_DATA_DIR": str(data_dir), "SKYRELAY_BIND": f"127.0.0.1:{free_port()}", **env})
    return subprocess.run(
        [sys.executable, "-m", "web.cli", "serve"], cwd=REPO_ROOT, env=base, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def test_second_instance_on_the_same_data_dir_is_refused_before_any_database(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'main.sqlite'}", plc_url="http://x")
    relay.start()
    try:
        other_db = tmp_path / "other.sqlite"
        proc = serve_once(tmp_path / "data", {"DATABASE_URL": f"sqlite:///{other_db}"})
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr.strip().count("\n") == 0, proc.stderr  # one line, no traceback
        assert "in use by another skyrelay process" in proc.stderr
        assert not other_db.exists()  # refused before it opened (let alone migrated) a database
        assert relay.proc is not None and relay.proc.poll() is None  # the first one is unharmed
    finally:
        assert relay.stop() == 0, relay.log()


def _pg_urls() -> Iterator[str]:
    base = os.environ.get("TEST_DATABASE_URL")
    if base:
        prefix, _, _ = base.rpartition("/")
        yield f"{prefix}/skyrelay_no_such_database"  # missing database
        scheme, _, rest = base.partition("://")
        yield f"{scheme}://skyrelay_no_such_role@{rest.partition('@')[2]}"  # refused user


@pytest.mark.parametrize(
    "url",
    [
        "mysql://relay@127.0.0.1/relay",  # wrong scheme
        f"postgresql://postgres@127.0.0.1:{free_port()}/relay",  # nothing listens there
        "sqlite:////proc/skyrelay/cannot/create.sqlite",  # a path that cannot be made
        *_pg_urls(),
    ],
)
def test_an_unusable_database_url_is_one_line_and_status_2(tmp_path: Path, url: str) -> None:
    for env in ({"DATABASE_URL": url}, {"CARSTORE_DATABASE_URL": url}):
        proc = serve_once(tmp_path / "data", env)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr.strip() and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().count("\n") <= 1, proc.stderr  # config errors: a heading and one item


def test_one_database_for_relay_and_carstore(tmp_path: Path, db_url: str) -> None:
    """DATABASE_URL and CARSTORE_DATABASE_URL may name the same database (PostgreSQL, or one SQLite file)."""
    relay = RelayProcess(tmp_path / "data", database_url=db_url, plc_url="http://x",
                         extra_env={"CARSTORE_DATABASE_URL": db_url})  # fmt: skip
    try:
        relay.start()
        assert relay.stop() == 0, relay.log()
        relay.start()  # and again, with both schemas in place
        assert relay.stop() == 0, relay.log()
    finally:
        if relay.proc is not None and relay.proc.poll() is None:
            relay.kill9()


def test_a_database_that_belongs_to_another_data_dir_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.sqlite'}"
    relay = RelayProcess(tmp_path / "one", database_url=url, plc_url="http://x").start()
    assert relay.stop() == 0, relay.log()
    proc = serve_once(tmp_path / "two", {"DATABASE_URL": url})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "belongs to another data directory" in proc.stderr and "Traceback" not in proc.stderr


class WriteLock:
    """Another process holding SQLite's write lock on ``path`` (what "database is locked" needs)."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, timeout=30)

    def __enter__(self) -> WriteLock:
        self.conn.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.execute("ROLLBACK")
        self.conn.close()


@pytest.fixture
def hosts() -> Iterator[list[FrameHost]]:
    started = [FrameHost(), FrameHost()]
    yield started
    for h in started:
        h.stop()


@pytest.mark.parametrize("workers", ["0", "2"])
def test_database_locked_while_a_host_starts_is_retried(tmp_path: Path, hosts: list[FrameHost], workers: str) -> None:
    first, second = hosts
    relay = RelayProcess(tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'main.sqlite'}", plc_url="http://x",
                         extra_env={"SKYRELAY_INGEST_WORKERS": workers})  # fmt: skip
    relay.start()
    try:
        relay.request_crawl(first.hostname)
        wait_until(lambda: first.status()["subscribers"] == 1, 20, "the first host")
        with WriteLock(tmp_path / "main.sqlite"):
            relay.request_crawl(second.hostname)
            wait_until(lambda: relay.metric("skyrelay_infrastructure_retries_total", operation="host_start") >= 1,
                       60, "a retried host start")  # fmt: skip
            assert relay.metric("skyrelay_infrastructure_failing", operation="host_start") == 1
        wait_until(lambda: second.status()["subscribers"] == 1, 60, "the second host once the lock is gone")
        assert relay.proc is not None and relay.proc.poll() is None
        assert relay.metric("skyrelay_infrastructure_failing", operation="host_start") == 0
    finally:
        assert relay.stop() == 0, relay.log()


def test_a_database_error_that_outlasts_the_retries_ends_the_process(tmp_path: Path, hosts: list[FrameHost]) -> None:
    """The supervisor escalates, the relay stops, and the process exits non-zero (it used to hang)."""
    first, second = hosts
    env = {"SKYRELAY_INFRA_RETRY_SECONDS": "1", "SKYRELAY_SHUTDOWN_TIMEOUT_SECONDS": "20"}
    relay = RelayProcess(tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'main.sqlite'}", plc_url="http://x",
                         extra_env=env)  # fmt: skip
    relay.start()
    assert relay.proc is not None
    try:
        relay.request_crawl(first.hostname)
        wait_until(lambda: first.status()["subscribers"] == 1, 20, "a running subscriber")
        with WriteLock(tmp_path / "main.sqlite"):
            relay.request_crawl(second.hostname)
            status = relay.proc.wait(timeout=120)  # two busy timeouts, then at most the shutdown deadline
        assert status == 1, relay.log()
        assert "essential actor died actor=hosts" in relay.log()
    finally:
        if relay.proc.poll() is None:
            relay.kill9()


def test_an_ingest_worker_whose_supervisor_fails_exits_and_is_restarted(tmp_path: Path, hosts: list[FrameHost]) -> None:
    first, second = hosts
    env = {"SKYRELAY_INGEST_WORKERS": "1", "SKYRELAY_INFRA_RETRY_SECONDS": "1"}
    relay = RelayProcess(tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'main.sqlite'}", plc_url="http://x",
                         extra_env=env)  # fmt: skip
    relay.start()
    try:
        relay.request_crawl(first.hostname)
        wait_until(lambda: first.status()["subscribers"] == 1, 20, "a running subscriber")
        with WriteLock(tmp_path / "main.sqlite"):
            relay.request_crawl(second.hostname)
            wait_until(lambda: "ingest worker died index=0" in relay.log(), 90, "the worker to exit")
        # started again with its hosts, it subscribes to both once the database is free
        wait_until(lambda: second.status()["subscribers"] == 1, 90, "the second host after the restart")
        wait_until(lambda: first.status()["subscribers"] >= 1, 30, "the first host after the restart")
        assert relay.proc is not None and relay.proc.poll() is None
    finally:
        assert relay.stop() == 0, relay.log()


@pytest.mark.parametrize("signals", [1, 2])
def test_sigterm_while_an_actor_is_stuck_still_ends_the_process(
    tmp_path: Path, hosts: list[FrameHost], signals: int
) -> None:
    """The host supervisor retries a locked database when SIGTERM comes: the deadline (or a second signal) ends it."""
    second = hosts[1]
    env = {"SKYRELAY_SHUTDOWN_TIMEOUT_SECONDS": "5"}
    relay = RelayProcess(tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'main.sqlite'}", plc_url="http://x",
                         extra_env=env)  # fmt: skip
    relay.start()
    assert relay.proc is not None
    try:
        with WriteLock(tmp_path / "main.sqlite"):
            relay.request_crawl(second.hostname)
            wait_until(lambda: relay.metric("skyrelay_infrastructure_retries_total", operation="host_start") >= 1,
                       60, "the supervisor busy retrying")  # fmt: skip
            started = time.monotonic()
            relay.proc.send_signal(signal.SIGTERM)
            if signals == 2:
                wait_until(lambda: "relay stopping" in relay.log(), 10, "the shutdown to begin")
                relay.proc.send_signal(signal.SIGTERM)
            status = relay.proc.wait(timeout=60)
            elapsed = time.monotonic() - started
        assert status == 1, relay.log()  # a forced exit is never a success
        if signals == 2:
            assert "exiting at once reason=second signal" in relay.log()
            assert elapsed < 5 + 10
        else:
            assert "shutdown deadline passed: exiting hard timeout=5s still_alive=" in relay.log()
            assert "HostSupervisor*1" in relay.log()
    finally:
        if relay.proc.poll() is None:
            relay.kill9()


GUARD_SCRIPT = textwrap.dedent(
    """
    from gevent import monkey

    monkey.patch_all()
    import logging
    import sys
    import threading
    import time

    from web.exit_guard import ExitGuard

    logging.basicConfig(level=logging.INFO)
    stuck = threading.Thread(target=time.sleep, args=(3600,), name="stuck", daemon=False)
    stuck.start()
    ExitGuard(float(sys.argv[1])).arm(0)
    sys.exit(0)  # the interpreter would wait for "stuck" for an hour
    """
)


def test_exit_guard_ends_a_process_a_thread_keeps_alive() -> None:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", GUARD_SCRIPT, "1"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert proc.returncode == 1, proc.stderr  # a forced exit is never a success
    assert "shutdown deadline passed" in proc.stderr and "thread:stuck*1" in proc.stderr, proc.stderr
    assert time.monotonic() - started < 30
