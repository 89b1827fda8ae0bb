"""Start the relay and the synthetic frame host as real subprocesses on loopback, for tests and benchmarks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.framing import pack_frames

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_json(url: str, body: Any = None, *, timeout: float = 30.0, raw: bytes | None = None) -> Any:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": "application/json" if raw is None else "application/octet-stream"}
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data is not None else "GET")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


def wait_until(check: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def spawn_reporting_port(args: list[str], what: str) -> tuple[subprocess.Popen[str], int]:
    """``python args...`` from the repository root; it prints ``{"port": N}`` on its first line once listening."""
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"{what} did not start")
    return proc, int(json.loads(line)["port"])


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 10.0) -> int:
    """SIGTERM, then SIGKILL after ``timeout`` s; waits for the process either way; its exit status."""
    if proc is None:
        return 0
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


class FrameHost:
    """``tests.support.frame_host`` in a subprocess."""

    def __init__(self) -> None:
        self.proc, self.port = spawn_reporting_port(["-m", "tests.support.frame_host", "--port", "0"], "frame host")
        self.hostname = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.hostname}"

    def push(self, frames: list[bytes]) -> None:
        http_json(f"{self.url}/control/frames", raw=pack_frames(frames))

    def generate(self, accounts: list[dict[str, str]], commits: int, start_seq: int = 1) -> int:
        body = {"accounts": accounts, "commits": commits, "start_seq": start_seq}
        return int(http_json(f"{self.url}/control/generate", body, timeout=600)["frames"])

    def upload_repo(self, did: str, car: bytes) -> None:
        """Make the host's getRepo serve ``car`` for ``did`` (what a backfill will fetch)."""
        http_json(f"{self.url}/control/repo?did={did}", raw=car)

    def repo_fetches(self) -> list[str]:
        return list(http_json(f"{self.url}/control/repo_fetches")["fetches"])

    def status(self) -> dict[str, Any]:
        return dict(http_json(f"{self.url}/control/status"))

    def close_subscribers(self) -> None:
        http_json(f"{self.url}/control/close", {})

    def stop(self) -> None:
        stop_process(self.proc)


class RelayProcess:
    """``skyrelay serve`` in a subprocess with a data dir, database URL and PLC of the test's choosing."""

    def __init__(self, data_dir: Path, *, database_url: str, plc_url: str, extra_env: dict[str, str] | None = None,
                 args: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.data_dir = data_dir
        self.database_url = database_url
        self.plc_url = plc_url
        self.extra_env = extra_env or {}
        self.args = args
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / "relay.log"

    def start(self, timeout: float = 30.0) -> RelayProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SKYRELAY_") and k != "DATABASE_URL"}
        env.update(
            {
                "DATABASE_URL": self.database_url,
                "SKYRELAY_PLC_URL": self.plc_url,
                "SKYRELAY_ALLOW_INSECURE_HOSTS": "true",
                "SKYRELAY_DATA_DIR": str(self.data_dir),
                "SKYRELAY_BIND": f"127.0.0.1:{self.port}",
                "SKYRELAY_CURSOR_FLUSH_SECONDS": "0.5",
                "SKYRELAY_DEFAULT_HOST_EVENTS_PER_SECOND": "1000000",
                "SKYRELAY_DEFAULT_HOST_EVENTS_PER_HOUR": "1000000000",  # hour and day windows out of the way
                "SKYRELAY_DEFAULT_HOST_EVENTS_PER_DAY": "1000000000",
                # the relay must survive bad frames even where Rust backtraces are on (HACKING.md)
                "RUST_BACKTRACE": "1",
                **self.extra_env,
            }
        )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "web.cli", "serve", *self.args], cwd=REPO_ROOT, env=env, stdout=log, stderr=log
        )
        wait_until(self._healthy, timeout, "relay health")
        return self

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"relay exited with {self.proc.returncode}:\n{self.log()}")
        try:
            with urllib.request.urlopen(f"{self.url}/xrpc/_health", timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-8000:]

    def request_crawl(self, hostname: str) -> Any:
        return http_json(f"{self.url}/xrpc/com.atproto.sync.requestCrawl", {"hostname": hostname})

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as resp:
            return str(resp.read().decode())

    def metric(self, name: str, **labels: str) -> float:
        total = 0.0
        for line in self.metrics().splitlines():
            if not line.startswith(name):
                continue
            head, _, value = line.rpartition(" ")
            if head == name or (head.startswith(name + "{") and all(f'{k}="{v}"' in head for k, v in labels.items())):
                total += float(value)
        return total

    def stop(self, timeout: float = 30.0) -> int:
        return stop_process(self.proc, timeout)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
