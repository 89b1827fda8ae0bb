"""The front end under attack by anonymous clients: the relay as a subprocess, raw sockets against it.

Each test acts as a hostile client would (bad parameters, long request lines, garbage, chunked
bodies that never end, silent connections, floods of connections) and checks the relay answers
with a 4xx/503 XRPC JSON body, frees what the client held, and keeps answering ``_health``.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT
from tests.support.procs import free_port, wait_until

WAIT_S = 30.0


class Relay:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, timeout: float = WAIT_S) -> tuple[int, Any]:
        """(status, JSON body) of a GET of ``path`` on a new connection."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            assert err.headers.get("Content-Type") == "application/json", (err.code, err.headers)
            return err.code, json.loads(err.read())

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


@contextmanager
def relay(tmp_path: Path, env: dict[str, str] | None = None, nofile: int | None = None) -> Iterator[Relay]:
    """``skyrelay serve`` on SQLite under ``tmp_path`` (``env``: extra settings; ``nofile``: its file limit)."""
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SKYRELAY_") and k != "DATABASE_URL"}
    environ.update(
        {
            "SKYRELAY_BIND": f"127.0.0.1:{port}",
            "SKYRELAY_DATA_DIR": str(tmp_path / "data"),
            "SKYRELAY_ALLOW_INSECURE_HOSTS": "true",
            "SKYRELAY_PLC_URL": "http://127.0.0.1:9",
            "SKYRELAY_MIRROR_ENABLED": "false",
            **(env or {}),
        }
    )

    def limit_files() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    log_path = tmp_path / "relay.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "web.cli", "serve"],
            cwd=REPO_ROOT,
            env=environ,
            stdout=log,
            stderr=log,
            preexec_fn=limit_files,
        )
    server = Relay(proc, port, log_path)
    try:

        def healthy() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"relay exited with {proc.returncode}:\n{server.log()}")
            try:
                return server.get("/xrpc/_health", timeout=2)[0] == 200
            except (OSError, urllib.error.URLError):
                return False

        wait_until(healthy, WAIT_S, "relay health")
        yield server
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def shared_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    with relay(tmp_path_factory.mktemp("relay")) as server:
        yield server


def raw_exchange(port: int, data: bytes, timeout: float = WAIT_S) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` on a new connection, read until the server closes: (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout) as sock:
        sock.sendall(data)
        return read_response(sock)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response from ``sock``, its body read by Content-Length."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {buf!r}"
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed inside the body: {body!r}"
        body += chunk
    return status, headers, body[:length]


def assert_xrpc_error(response: tuple[int, dict[str, str], bytes], status: int, error: str) -> None:
    got_status, headers, body = response
    assert got_status == status, response
    assert headers.get("content-type") == "application/json", response
    assert json.loads(body)["error"] == error, response


# -- item 8: integer and cursor parameters ------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "com.atproto.sync.listHosts?limit=%C2%B2",  # superscript two
        "com.atproto.sync.listHosts?limit=%D9%A3",  # Arabic-Indic three
        "com.atproto.sync.listHosts?cursor=" + "9" * 5000,
        "com.atproto.sync.listHosts?cursor=%C2%B2",
        "com.atproto.sync.listHosts?limit=1&limit=2",
        "com.atproto.sync.listRepos?limit=%C2%B2",
        "com.atproto.sync.listRepos?limit=%EF%BC%95",  # fullwidth five
        "com.atproto.sync.listRepos?cursor=" + "x" * 5000,
        "com.atproto.sync.getHostStatus?hostname=" + "a" * 5000,
        "com.atproto.sync.subscribeRepos?cursor=%C2%B2",
        "com.atproto.sync.subscribeRepos?cursor=" + "1" * 5000,
    ],
)
def test_malformed_integer_parameters_are_400_xrpc_json(shared_relay: Relay, query: str) -> None:
    status, body = shared_relay.get("/xrpc/" + query)
    assert (status, body["error"]) == (400, "InvalidRequest"), body
    assert "Traceback" not in shared_relay.log()


def test_well_formed_integer_parameters_still_work(shared_relay: Relay) -> None:
    assert shared_relay.get("/xrpc/com.atproto.sync.listHosts?limit=5&cursor=0") == (200, {"hosts": []})
    assert shared_relay.get("/xrpc/com.atproto.sync.listHosts?limit=1000&cursor=" + "9" * 18)[0] == 200
