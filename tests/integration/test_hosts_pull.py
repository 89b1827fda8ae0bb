"""``skyrelay hosts pull --from URL`` against real processes: a source relay's listHosts, good and garbage.

The source lists four hosts over two pages: one with accounts (followed), one with none
(skipped), one in a domain this relay bans (skipped) and one that does not answer (failed,
by reason). A source whose listHosts is garbage stops the pull with status 1 and a message.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.hostile_http import HostileServer
from tests.support.list_proc import ListServer
from tests.support.procs import REPO_ROOT, RelayProcess, free_port

PASSWORD = "hosts-pull-password"


@pytest.fixture
def relay(tmp_path: Path, db_url: str) -> Iterator[RelayProcess]:
    env = {"SKYRELAY_ADMIN_PASSWORD": PASSWORD, "SKYRELAY_MIRROR_ENABLED": "false", "SKYRELAY_SPIDER_ENABLED": "false"}
    process = RelayProcess(tmp_path / "relay", database_url=db_url, plc_url="http://127.0.0.1:9", extra_env=env)
    process.start()
    try:
        yield process
    finally:
        assert process.stop() == 0, process.log()


def pull(relay: RelayProcess, source: str, *, allow_http: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYRELAY_")}
    flags = ["--allow-http"] if allow_http else []
    return subprocess.run([sys.executable, "-m", "web.cli", "hosts", "--url", relay.url, "--password", PASSWORD,
                           "--timeout", "10", "pull", "--from", source, *flags], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def admin(relay: RelayProcess, path: str, body: dict[str, str]) -> None:
    import json
    import urllib.request

    req = urllib.request.Request(
        relay.url + path,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {PASSWORD}", "Content-Type": "application/json"},
    )
    urllib.request.urlopen(req, timeout=10).read()  # fmt: skip


def test_pull_follows_hosts_with_accounts_and_skips_the_rest(relay: RelayProcess) -> None:
    good, empty, banned = ListServer("loop"), ListServer("loop"), ListServer("loop")
    dead = f"127.0.0.1:{free_port()}"
    listed = f"{good.hostname}=5,{empty.hostname}=0,localhost:{banned.port}=3,{dead}=2"
    source = ListServer("hosts", hosts=listed)
    try:
        admin(relay, "/admin/subs/banDomain", {"domain": "localhost"})
        out = pull(relay, source.url)
        assert out.returncode == 0, out.stderr + relay.log()
        assert out.stdout.strip() == (
            "hosts pulled: added 1, failed_HostUnreachable 1, skipped_banned 1, skipped_no_accounts 1"
        ), out.stdout
        assert source.count() == 2  # both pages read
        assert f"crawl requested host={good.hostname}" in relay.log()
        assert empty.hostname not in relay.log()
    finally:
        for server in (good, empty, banned, source):
            server.stop()


def test_pull_from_a_garbage_source_stops_with_a_message(relay: RelayProcess) -> None:
    source = ListServer("hosts-garbage")
    try:
        out = pull(relay, source.url)
        assert out.returncode == 1
        assert "the source's listHosts is unusable" in out.stderr
        assert out.stdout.strip() == "hosts pulled: none"
    finally:
        source.stop()


def test_pull_needs_https_unless_told(relay: RelayProcess) -> None:
    source = ListServer("hosts", hosts="pds.example.com=1")
    try:
        out = pull(relay, source.url, allow_http=False)
        assert out.returncode == 2, out.stderr
        assert "must be https://" in out.stderr
        assert source.count() == 0
    finally:
        source.stop()


@pytest.mark.parametrize("mode", ["redirect", "chunked-flood", "silent"])
def test_pull_from_a_hostile_source_stops_within_its_bounds(relay: RelayProcess, mode: str) -> None:
    """A redirect is not followed (to a listHosts that would be usable), a flood is capped, silence times out."""
    target = ListServer("hosts", hosts="pds.example.com=1")
    options = {"location": f"{target.url}/xrpc/com.atproto.sync.listHosts"} if mode == "redirect" else {}
    source = HostileServer(mode, **options)
    try:
        out = pull(relay, f"http://127.0.0.1:{source.port}")
        assert target.count() == 0
    finally:
        source.stop()
        target.stop()
    assert out.returncode == 1, out.stderr
    assert "the source's listHosts is unusable" in out.stderr
    assert out.stdout.strip() == "hosts pulled: none"


def test_the_cli_parser_does_not_load_prometheus_client() -> None:
    """``serve`` sets up multiprocess metrics after parsing; an early import broke the ingest workers' metrics."""
    code = "import sys, web.cli, web.hosts_pull; print(any(m.startswith('prometheus_client') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
