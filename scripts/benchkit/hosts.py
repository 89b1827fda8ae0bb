"""Upstream hosts for the realistic benchmark: ``tests/support/frame_host.py`` processes serving made frames.

Each host starts with its traffic file held back (``--held``) and keeps its port for the whole
run (the DID documents name it); before each measurement it is rewound, then told to release a
number of frames at an even pace, recording when each frame is handed to the relay's socket.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TypeVar

from tests.support.procs import http_json, stop_process

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")
R = TypeVar("R")


class HeldFrameHost:
    """One frame host process holding the frames of ``frames_path``."""

    def __init__(self, frames_path: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.frame_host", "--port", "0", "--held", str(frames_path)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"frame host for {frames_path} did not start")
        self.port = int(json.loads(line)["port"])
        self.hostname = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.hostname}"

    def status(self) -> dict[str, Any]:
        return dict(http_json(f"{self.url}/control/status"))

    def rewind(self) -> int:
        return int(http_json(f"{self.url}/control/rewind", {})["held"])

    def release(self, count: int, rate: float) -> None:
        http_json(f"{self.url}/control/release", {"count": count, "rate": rate, "record_sends": True})

    def sends(self) -> dict[int, float]:
        """seq -> when the frame was first handed to a subscriber's socket (``time.monotonic``)."""
        rows = http_json(f"{self.url}/control/sends", timeout=120)["sends"]
        return {int(seq): float(t) for seq, _, _, t in rows}

    def stop(self) -> None:
        stop_process(self.proc)


def start_hosts(paths: list[Path], stack: ExitStack) -> list[HeldFrameHost]:
    """Start a host per file, a few at once (each parses its file at start-up); ``stack`` stops them."""

    def one(path: Path) -> HeldFrameHost:
        host = HeldFrameHost(path)
        stack.callback(host.stop)
        return host

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, paths))


def on_every(items: list[T], call: Callable[[T], R]) -> list[R]:
    """``call(item)`` for every item (a host, or a host and its share) at once; the results in order."""
    with ThreadPoolExecutor(max(1, len(items))) as pool:
        return list(pool.map(call, items))
