"""`skyrelay serve` starts on SQLite, answers the health check and XRPC errors, stops on SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.support.procs import free_port


def wait_http(url: str, deadline_s: float = 20.0) -> bytes:
    end = time.monotonic() + deadline_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.read()
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > end:
                raise
            time.sleep(0.1)


def serve(data_dir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """``skyrelay serve`` on SQLite under ``data_dir``, on a free loopback port."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "web.cli", "serve", "--bind", f"127.0.0.1:{port}", "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    return proc, port


def test_serve_health_and_clean_stop(tmp_path: Path) -> None:
    proc, port = serve(tmp_path)
    try:
        body = json.loads(wait_http(f"http://127.0.0.1:{port}/xrpc/_health"))
        assert body["database"] == "ok"
        assert (tmp_path / "relay.sqlite").exists()
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/xrpc/com.example.nothing", timeout=5)
            raise AssertionError("expected 404")
        except urllib.error.HTTPError as err:
            assert err.code == 404
            assert json.loads(err.read())["error"] == "NotFound"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out.decode(errors="replace")


def test_stop_with_a_consumer_attached_exits_promptly(tmp_path: Path) -> None:
    import websocket

    proc, port = serve(tmp_path)
    try:
        wait_http(f"http://127.0.0.1:{port}/xrpc/_health")
        ws = websocket.create_connection(f"ws://127.0.0.1:{port}/xrpc/com.atproto.sync.subscribeRepos", timeout=20)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)  # a consumer must not keep the relay alive
        assert proc.returncode == 0, out.decode(errors="replace")
        opcode, _ = ws.recv_data(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_CLOSE
        ws.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
