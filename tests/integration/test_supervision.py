"""Supervision: an essential actor that dies stops the relay with a non-zero status; others restart."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    from gevent import monkey

    monkey.patch_all()
    import sys

    import gevent
    import gevent.event

    from config import load_settings
    from store.db import open_database
    from store.migrations import apply_migrations
    from actors.supervisor import RelaySupervisor

    settings = load_settings(environ={"SKYRELAY_DATA_DIR": sys.argv[1]})
    db = open_database(settings.effective_database_url())
    apply_migrations(db)
    relay = RelaySupervisor(settings, db)
    relay.start()
    victim = sys.argv[2]
    if victim == "identity":  # not essential: restarted, the relay keeps running
        old = relay.identity
        old.stop()
        for _ in range(200):
            gevent.sleep(0.05)
            if relay.identity is not None and relay.identity is not old and relay.identity.is_alive():
                break
        print("identity restarted" if relay.identity is not old else "identity not restarted", flush=True)
        relay.stop()
        sys.exit(0)
    getattr(relay, victim).stop()  # the actor is gone as if it had crashed
    stop = gevent.event.Event()
    gevent.spawn_later(20, stop.set)  # a deadline: wait() must return long before it
    status = relay.wait(stop)
    print(f"status={status} reason={relay.fatal_reason}", flush=True)
    relay.stop()
    sys.exit(status)
    """
)


def run(tmp_path: Path, victim: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "data"), victim],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )


def test_sequencer_death_stops_the_relay_with_status_1(tmp_path: Path) -> None:
    proc = run(tmp_path, "sequencer")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "status=1 reason=sequencer stopped unexpectedly" in proc.stdout


def test_broadcaster_death_stops_the_relay_with_status_1(tmp_path: Path) -> None:
    proc = run(tmp_path, "broadcaster")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "reason=broadcaster stopped unexpectedly" in proc.stdout


def test_identity_resolver_death_is_restarted(tmp_path: Path) -> None:
    proc = run(tmp_path, "identity")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "identity restarted" in proc.stdout
