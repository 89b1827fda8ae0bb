"""``tests.support.list_server`` in a subprocess, for tests."""

from __future__ import annotations

from tests.support.procs import http_json, spawn_reporting_port


class ListServer:
    def __init__(self, mode: str, hosts: str = "") -> None:
        self.proc, self.port = spawn_reporting_port(
            ["-m", "tests.support.list_server", "--mode", mode, "--hosts", hosts], "list server"
        )
        self.hostname = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.hostname}"

    def count(self) -> int:
        return int(http_json(f"{self.url}/control/count")["count"])

    def cursors(self) -> list[str]:
        return list(http_json(f"{self.url}/control/cursors")["cursors"])

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)
