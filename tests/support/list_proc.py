"""``tests.support.list_server`` in a subprocess, for tests."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support.procs import REPO_ROOT, http_json


class ListServer:
    def __init__(self, mode: str, hosts: str = "") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.list_server", "--mode", mode, "--hosts", hosts],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("list server did not start")
        self.port = int(json.loads(line)["port"])
        self.hostname = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.hostname}"

    def count(self) -> int:
        return int(http_json(f"{self.url}/control/count")["count"])

    def cursors(self) -> list[str]:
        return list(http_json(f"{self.url}/control/cursors")["cursors"])

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)
