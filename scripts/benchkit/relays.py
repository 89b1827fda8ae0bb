"""One fresh relay per measurement: ``skyrelay serve`` as a subprocess on a new data folder and database."""

from __future__ import annotations

import sys
import uuid
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import quote

from scripts.benchkit.procfs import descendants, proc_cpu_seconds, proc_status_kib
from tests.support.procs import RelayProcess


def fresh_database_url(url: str, folder: Path, stack: ExitStack, keep: bool) -> str:
    """SQLite in ``folder`` when ``url`` is empty; else a new PostgreSQL schema, dropped on exit unless ``keep``."""
    if not url:
        return f"sqlite:///{folder / 'relay.sqlite'}"
    import psycopg2

    schema = "bench_" + uuid.uuid4().hex[:12]
    with psycopg2.connect(url) as conn:
        conn.autocommit = True
        conn.cursor().execute(f"CREATE SCHEMA {schema}")
    if not keep:

        def drop() -> None:
            with psycopg2.connect(url) as conn:
                conn.autocommit = True
                conn.cursor().execute(f"DROP SCHEMA {schema} CASCADE")

        stack.callback(drop)
    return f"{url}{'&' if '?' in url else '?'}options={quote('-csearch_path=' + schema)}"


def start_relay(
    folder: Path, database_url: str, plc_url: str, env: dict[str, str], args: tuple[str, ...]
) -> RelayProcess:
    relay = RelayProcess(folder, database_url=database_url, plc_url=plc_url, extra_env=env, args=args)
    relay.start(timeout=90)
    return relay


def stop_relay(relay: RelayProcess) -> None:
    status = relay.stop()
    if status != 0:
        print(f"warning: relay exited with status {status}; log tail:\n{relay.log()[-2000:]}", file=sys.stderr)


def relay_pids(relay: RelayProcess) -> list[int]:
    """The relay process and its ingest workers."""
    assert relay.proc is not None
    return [relay.proc.pid, *descendants(relay.proc.pid)]


def relay_cpu_seconds(relay: RelayProcess) -> dict[int, float]:
    """pid -> user + system CPU seconds so far, for the relay and each ingest worker."""
    out: dict[int, float] = {}
    for pid in relay_pids(relay):
        try:
            out[pid] = sum(proc_cpu_seconds(pid))
        except OSError:  # it just exited
            pass
    return out


def relay_kib(relay: RelayProcess, key: str) -> int:
    """A /proc/PID/status figure (``VmHWM``, ``VmRSS``) summed over the relay and its ingest workers."""
    total = 0
    for pid in relay_pids(relay):
        try:
            total += proc_status_kib(pid, key)
        except OSError:
            pass
    return total
