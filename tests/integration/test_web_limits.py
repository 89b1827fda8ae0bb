"""The front end under attack by anonymous clients: the relay as a subprocess, raw sockets against it.

Each test acts as a hostile client would (bad parameters, long request lines, garbage, chunked
bodies that never end, silent connections, floods of connections) and checks the relay answers
with a 4xx/503 XRPC JSON body, frees what the client held, and keeps answering ``_health``.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT
from tests.support.procs import FrameHost, free_port, wait_until

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


# -- item 10: request lines, malformed requests, getBlocks ---------------------------------

CID = "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"


def get_blocks_line(count: int) -> bytes:
    query = "did=did:plc:aaaaaaaaaaaaaaaaaaaaaaaa" + f"&cids={CID}" * count
    return f"GET /xrpc/com.atproto.sync.getBlocks?{query} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


def test_get_blocks_takes_up_to_1000_cids_and_refuses_more_with_json(shared_relay: Relay) -> None:
    # 1000 CIDs reach the handler (the DID is unknown: RepoNotFound, not a bare 414)
    assert_xrpc_error(raw_exchange(shared_relay.port, get_blocks_line(1000)), 400, "RepoNotFound")
    assert_xrpc_error(raw_exchange(shared_relay.port, get_blocks_line(1001)), 400, "InvalidRequest")
    assert_xrpc_error(raw_exchange(shared_relay.port, get_blocks_line(3000)), 414, "RequestTooLong")


@pytest.mark.parametrize(
    ("raw", "status", "error"),
    [
        (b"GET /" + b"a" * 200_000 + b" HTTP/1.1\r\n\r\n", 414, "RequestTooLong"),
        (b"GARBAGE\r\n\r\n", 400, "InvalidRequest"),
        (b"GET / HTTP/9.9\r\n\r\n", 400, "InvalidRequest"),
        (b"GET / HTTP/1.1\r\nContent-Length: -5\r\n\r\n", 400, "InvalidRequest"),
        (b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400, "InvalidRequest"),
        (b"GET / HTTP/1.1\r\n" + b"X-A: a\r\n" * 200 + b"\r\n", 400, "InvalidRequest"),
        (b"GET / HTTP/1.1\r\n" + b"X-Long: " + b"a" * 70_000 + b"\r\n\r\n", 431, "HeadersTooLarge"),
        (
            b"GET / HTTP/1.1\r\n" + (b"X-A: " + b"a" * 2000 + b"\r\n") * 40 + b"\r\n",
            431,
            "HeadersTooLarge",
        ),
        (
            b"POST /xrpc/com.atproto.sync.requestCrawl HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            400,
            "InvalidRequest",
        ),
        (
            b"GET /xrpc/_health HTTP/1.0\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            400,
            "InvalidRequest",
        ),
    ],
)
def test_malformed_requests_get_xrpc_json(shared_relay: Relay, raw: bytes, status: int, error: str) -> None:
    assert_xrpc_error(raw_exchange(shared_relay.port, raw), status, error)


# -- item 5: body limits hold for chunked bodies -------------------------------------------


def test_chunked_50mb_body_is_refused_early_with_bounded_memory(shared_relay: Relay) -> None:
    before = shared_relay.rss_bytes()
    sent = [0]
    with socket.create_connection(("127.0.0.1", shared_relay.port), WAIT_S) as sock:
        sock.sendall(
            b"POST /xrpc/com.atproto.sync.requestCrawl HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"10000\r\n" + b" " * 0x10000 + b"\r\n"  # 64 KiB of JSON whitespace per chunk

        def send_body() -> None:
            try:
                while sent[0] < 50 * 1024 * 1024:
                    sock.sendall(chunk)
                    sent[0] += 0x10000
                sock.sendall(b"0\r\n\r\n")
            except OSError:
                pass  # the relay stopped reading: what we want

        sender = threading.Thread(target=send_body, daemon=True)
        sender.start()
        response = read_response(sock)
        sender.join(WAIT_S)
    assert_xrpc_error(response, 413, "PayloadTooLarge")
    assert sent[0] < 50 * 1024 * 1024, "the relay read the whole body"
    assert shared_relay.rss_bytes() - before < 20 * 1024 * 1024


def test_a_content_length_over_the_cap_is_413_before_the_body_is_read(shared_relay: Relay) -> None:
    with socket.create_connection(("127.0.0.1", shared_relay.port), WAIT_S) as sock:
        sock.sendall(
            b"POST /xrpc/com.atproto.sync.requestCrawl HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 5000000\r\n\r\n"
        )

        def send_body() -> None:
            try:
                sock.sendall(b" " * 5_000_000)
            except OSError:
                pass

        sender = threading.Thread(target=send_body, daemon=True)
        sender.start()
        response = read_response(sock)
        sender.join(WAIT_S)
    assert_xrpc_error(response, 413, "PayloadTooLarge")


def test_a_body_that_drips_in_gets_408(tmp_path: Path) -> None:
    with relay(tmp_path, {"SKYRELAY_HTTP_BODY_TIMEOUT_SECONDS": "1"}) as server:
        with socket.create_connection(("127.0.0.1", server.port), WAIT_S) as sock:
            sock.sendall(
                b"POST /xrpc/com.atproto.sync.requestCrawl HTTP/1.1\r\nHost: x\r\n"
                b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"hostname": '
            )  # and never the rest
            assert_xrpc_error(read_response(sock), 408, "RequestTimeout")
        assert server.get("/xrpc/_health")[0] == 200


# -- item 6: timeouts, the connection cap, no EMFILE storm ---------------------------------


def closed_by_server(sock: socket.socket, within_s: float) -> bool:
    """Whether the server closes ``sock`` (EOF, nothing sent) within ``within_s`` seconds."""
    sock.settimeout(within_s)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_silent_and_slow_connections_are_closed_after_the_header_timeout(tmp_path: Path) -> None:
    env = {"SKYRELAY_HTTP_HEADER_TIMEOUT_SECONDS": "1", "SKYRELAY_HTTP_IDLE_TIMEOUT_SECONDS": "1"}
    with relay(tmp_path, env) as server:
        silent = socket.create_connection(("127.0.0.1", server.port), WAIT_S)
        dripping = socket.create_connection(("127.0.0.1", server.port), WAIT_S)
        dripping.sendall(b"GET /xrpc/_health HTTP/1.1\r\n")  # and never the end of the headers
        kept_alive = socket.create_connection(("127.0.0.1", server.port), WAIT_S)
        kept_alive.sendall(b"GET /xrpc/_health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(kept_alive)[0] == 200
        with silent, dripping, kept_alive:
            assert closed_by_server(silent, 10)
            assert_xrpc_error(read_response(dripping), 408, "RequestTimeout")
            assert closed_by_server(kept_alive, 10)
        assert server.get("/xrpc/_health")[0] == 200


def test_connections_over_the_cap_get_503_and_no_emfile_storm(tmp_path: Path) -> None:
    """File limit 256: the cap is lowered to fit; of 300 connections the extra ones get 503, the admitted work."""
    with relay(tmp_path, {"SKYRELAY_HTTP_HEADER_TIMEOUT_SECONDS": "60"}, nofile=256) as server:
        found = re.search(r"connection cap lowered .* max_connections=(\d+)", server.log())
        assert found, server.log()
        cap = int(found.group(1))
        assert 50 <= cap < 256
        admitted: list[socket.socket] = []
        refused = 0
        try:
            for _ in range(cap):
                admitted.append(socket.create_connection(("127.0.0.1", server.port), WAIT_S))
            wait_until(lambda: connections(admitted[0]) >= cap, WAIT_S, "every connection admitted")
            for _ in range(300 - cap):
                with socket.create_connection(("127.0.0.1", server.port), WAIT_S) as extra:
                    extra.sendall(b"GET /xrpc/_health HTTP/1.1\r\nHost: x\r\n\r\n")
                    assert_xrpc_error(read_response(extra), 503, "ServiceUnavailable")
                    refused += 1
            for sock in admitted[1:30]:  # connections already admitted are served
                sock.sendall(b"GET /xrpc/_health HTTP/1.1\r\nHost: x\r\n\r\n")
                assert read_response(sock)[0] == 200
        finally:
            for sock in admitted:
                sock.close()
        assert refused == 300 - cap
        wait_until(lambda: server.get("/xrpc/_health", timeout=5)[0] == 200, WAIT_S, "health after the flood")
    log = server.log()
    assert "Too many open files" not in log and "Traceback" not in log, log[-3000:]


def connections(sock: socket.socket) -> int:
    """The relay's ``skyrelay_http_connections`` gauge, asked over ``sock`` (an admitted connection)."""
    sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    _status, _headers, body = read_response(sock)
    for line in body.decode().splitlines():
        if line.startswith("skyrelay_http_connections "):
            return int(float(line.split()[1]))
    raise AssertionError("no skyrelay_http_connections metric")


def test_accept_out_of_file_descriptors_backs_off_quietly_and_recovers(tmp_path: Path) -> None:
    """With the cap forced past the file limit, accept() fails with EMFILE: paused, logged once, resumed later."""
    stderr_path = tmp_path / "server.stderr"
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.http_server", "--nofile", "64", "--force-max-connections", "1000"],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    assert proc.stdout is not None
    held: list[socket.socket] = []
    try:
        port = int(proc.stdout.readline().split()[1])
        first = socket.create_connection(("127.0.0.1", port), WAIT_S)  # admitted before the descriptors run out
        held.append(first)
        first.sendall(b"GET /xrpc/_health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(first)[0] == 200
        for _ in range(150):  # far more than 64 descriptors: the kernel queues the rest in the backlog
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            held.append(sock)
        wait_until(lambda: accept_errors(first) >= 4, WAIT_S, "the paused listener to fail a few more times")
        for sock in held:
            sock.close()
        held.clear()

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/xrpc/_health", timeout=2) as resp:
                    return bool(resp.status == 200)
            except (OSError, urllib.error.URLError):
                return False

        wait_until(healthy, WAIT_S, "the server to accept again")
    finally:
        for sock in held:
            sock.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=WAIT_S)
    log = stderr_path.read_text()
    assert "Traceback" not in log and log.count("accept failed") == 1, log[-3000:]


def accept_errors(sock: socket.socket) -> float:
    """``skyrelay_http_accept_errors_total`` (EMFILE), asked over ``sock``, an admitted connection."""
    sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    body = read_response(sock)[2].decode()
    found = re.search(r'^skyrelay_http_accept_errors_total\{reason="EMFILE"\} (\S+)$', body, re.M)
    return float(found.group(1)) if found else 0.0


# -- requestCrawl: a rate limit per client address, a cap on hosts -------------------------


def post_crawl(server: Relay, hostname: str) -> tuple[int, dict[str, str], Any]:
    body = json.dumps({"hostname": hostname}).encode()
    req = urllib.request.Request(
        server.url + "/xrpc/com.atproto.sync.requestCrawl", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=WAIT_S) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as err:
        assert err.headers.get("Content-Type") == "application/json"
        return err.code, dict(err.headers), json.loads(err.read())


def test_request_crawl_is_rate_limited_per_client_address(tmp_path: Path) -> None:
    with relay(tmp_path, {"SKYRELAY_CRAWL_REQUESTS_PER_MINUTE": "3"}) as server:
        for _ in range(3):  # refused hosts (nothing listens there) still count
            status, _headers, body = post_crawl(server, f"127.0.0.1:{free_port()}")
            assert status == 400, body
        status, headers, body = post_crawl(server, f"127.0.0.1:{free_port()}")
        assert (status, body["error"]) == (429, "RateLimitExceeded"), body
        assert int(headers["Retry-After"]) >= 1
        assert server.get("/xrpc/_health")[0] == 200


def test_request_crawl_beyond_the_host_cap_is_refused(tmp_path: Path, host: FrameHost) -> None:
    with relay(tmp_path, {"SKYRELAY_MAX_HOSTS": "1"}) as server:
        assert post_crawl(server, host.hostname)[0] == 200
        wait_until(
            lambda: server.get("/xrpc/com.atproto.sync.listHosts")[1]["hosts"], WAIT_S, "the first host to be known"
        )
        status, _headers, body = post_crawl(server, f"127.0.0.1:{free_port()}")
        assert (status, body["error"]) == (403, "HostLimitReached"), body
        assert post_crawl(server, host.hostname)[0] == 200  # a host already known is not refused
