"""Fan-out nodes and HAProxy as real subprocesses on loopback, and a raw firehose reader, for tests and benchmarks."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import websocket

from tests.support.procs import REPO_ROOT, free_port, stop_process, wait_until

HAPROXY_CONFIG = REPO_ROOT / "config" / "haproxy.cfg.example"


class FanoutProcess:
    """``skyrelay fanout --upstream ...`` in a subprocess; ``start()`` again after a kill keeps port and data."""

    def __init__(self, data_dir: Path, upstream: str, *, extra_env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.upstream = upstream
        self.extra_env = extra_env or {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / "fanout.log"

    def start(self, timeout: float = 30.0, *, wait_healthy: bool = True) -> FanoutProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SKYRELAY_") and k != "DATABASE_URL"}
        env.update({"SKYRELAY_UPSTREAM_IDLE_TIMEOUT_SECONDS": "10", "SKYRELAY_FANOUT_UPSTREAM_POLL_SECONDS": "0.5",
                    **self.extra_env})  # fmt: skip
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        args = [
            "fanout",
            "--upstream",
            self.upstream,
            "--bind",
            f"127.0.0.1:{self.port}",
            "--data-dir",
            str(self.data_dir),
        ]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "web.cli", *args], cwd=REPO_ROOT, env=env, stdout=log, stderr=log
        )
        wait_until(self._listening if not wait_healthy else self._healthy, timeout, "fan-out node to start")
        return self

    def health(self) -> tuple[int, dict[str, Any]]:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"fan-out node exited with {self.proc.returncode}:\n{self.log()}")
        import json

        try:
            with urllib.request.urlopen(f"{self.url}/xrpc/_health", timeout=2) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def _healthy(self) -> bool:
        try:
            return self.health()[0] == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def _listening(self) -> bool:
        try:
            self.health()
            return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def last_seq(self) -> int:
        return int(self.health()[1]["seq"])

    def metric(self, name: str, **labels: str) -> float:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        total = 0.0
        for line in text.splitlines():
            head, _, value = line.rpartition(" ")
            if head == name or (head.startswith(name + "{") and all(f'{k}="{v}"' in head for k, v in labels.items())):
                total += float(value)
        return total

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-8000:]

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout: float = 30.0) -> int:
        return stop_process(self.proc, timeout)


def haproxy_binary() -> str:
    """The haproxy executable (``scripts/system-deps.sh`` installs it); missing is a failure, not a skip."""
    found = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy",) if Path(p).exists()), None)
    if found is None:
        raise RuntimeError("haproxy not found: run scripts/system-deps.sh (as root it installs the Debian package)")
    return found


class HaproxyProcess:
    """HAProxy in the foreground with the shipped example config, in front of the given nodes."""

    def __init__(self, work_dir: Path, nodes: list[str]) -> None:
        if len(nodes) != 2:
            raise ValueError("the example config has two servers")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.env = {**os.environ, "FANOUT_BIND": f"127.0.0.1:{self.port}", "FANOUT_NODE1": nodes[0],
                    "FANOUT_NODE2": nodes[1]}  # fmt: skip
        work_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = work_dir / "haproxy.log"
        check = subprocess.run([haproxy_binary(), "-c", "-f", str(HAPROXY_CONFIG)], env=self.env, capture_output=True)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy rejects the config: {check.stdout!r} {check.stderr!r}")
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([haproxy_binary(), "-db", "-f", str(HAPROXY_CONFIG)], env=self.env, stdout=log,
                                     stderr=log)  # fmt: skip
        wait_until(self._up, 20, "haproxy to listen")

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"haproxy exited: {self.log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{self.url}/xrpc/_health", timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def stop(self) -> None:
        stop_process(self.proc)


class RawStream:
    """A subscribeRepos connection returning raw frames (bytes), and the server that answered the upgrade."""

    def __init__(self, ws_url: str, cursor: int | None, timeout: float = 30.0) -> None:
        query = "" if cursor is None else f"?cursor={cursor}"
        self.ws = websocket.create_connection(f"{ws_url}/xrpc/com.atproto.sync.subscribeRepos{query}", timeout=timeout)
        self.node = (self.ws.getheaders() or {}).get("x-fanout-node", "")

    def recv(self, timeout: float) -> bytes | None:
        """The next frame, or None when the connection ends or nothing came in ``timeout``."""
        self.ws.settimeout(timeout)
        try:
            data = self.ws.recv()
        except (websocket.WebSocketTimeoutException, websocket.WebSocketConnectionClosedException, OSError):
            return None
        return data if isinstance(data, bytes) and data else None

    def close(self) -> None:
        self.ws.close()


def raw_frames(ws_url: str, cursor: int | None, count: int, timeout: float = 30.0) -> list[bytes]:
    """Up to ``count`` raw frames from ``cursor``, or what came before ``timeout``."""
    stream = RawStream(ws_url, cursor, timeout)
    out: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < count and (left := deadline - time.monotonic()) > 0:
            frame = stream.recv(left)
            if frame is None:
                break
            out.append(frame)
    finally:
        stream.close()
    return out
