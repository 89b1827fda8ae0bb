"""The shared heartbeat keeps live, silent upstreams connected and lets dead ones be cut.

Two subscribers of one process share one ``SubscriberConfig`` (so one ``Heartbeat``) with a short
read timeout. Both upstreams (``tests.support.hostile_upstream``) send nothing; one answers pings,
the other answers nothing. The first must stay on its first connection for several read
timeouts (only the heartbeat's pings keep its reads alive); the second must be cut by the read
timeout and dialled again.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from tests.support.procs import REPO_ROOT, http_json, stop_process, wait_until

IDLE_TIMEOUT = 1.5

SUBSCRIBERS = textwrap.dedent(
    """
    from gevent import monkey

    monkey.patch_all()
    import logging
    import select
    import sys

    from actors.host_subscriber import HostSubscriber, SubscriberConfig
    from actors.verify import HostContext

    logging.basicConfig(stream=sys.stderr, level=logging.INFO)

    class Inbox:
        def qsize(self): return 0

    class Sequencer:
        actor_inbox = Inbox()
        def tell(self, message): pass

    class Parent:
        def tell(self, message): print("parent told", message, file=sys.stderr)

    idle = float(sys.argv[1])
    config = SubscriberConfig(max_frame_bytes=1 << 20, max_ops=200, max_queue=1000, cursor_flush_seconds=5,
                              idle_timeout_seconds=idle, ping_seconds=idle / 4, insecure=True)
    refs = [HostSubscriber.start(host=HostContext(i + 1, name), cursor=-1, account_count=0, events_per_second=None,
                                 verifier=None, sequencer=Sequencer(), parent=Parent(), config=config)
            for i, name in enumerate(sys.argv[2:])]
    print("started", flush=True)
    select.select([sys.stdin], [], [])  # cooperative (patched): until the test closes stdin
    for ref in refs:
        ref.stop()
    """
)


class Upstream:
    def __init__(self, script: list[list[dict[str, Any]]], work: Path, name: str) -> None:
        path = work / f"{name}.json"
        path.write_text(json.dumps({"connections": script}))
        cmd = [sys.executable, "-m", "tests.support.hostile_upstream", "--script", str(path)]
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.port = int(json.loads(self.proc.stdout.readline())["port"])

    def connections(self) -> list[float]:
        return [c["at"] for c in http_json(f"http://127.0.0.1:{self.port}/control/connections")["connections"]]


def test_one_heartbeat_pings_every_silent_upstream_and_a_dead_one_is_redialled(tmp_path: Path) -> None:
    live = Upstream([[{"hold": 60}]], tmp_path, "live")  # answers pings, sends nothing
    dead = Upstream([[{"stall": 60}], [{"hold": 60}]], tmp_path, "dead")  # answers nothing at all
    proc = subprocess.Popen(
        [sys.executable, "-c", SUBSCRIBERS, str(IDLE_TIMEOUT), f"127.0.0.1:{live.port}", f"127.0.0.1:{dead.port}"],
        cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "started"
        wait_until(lambda: live.connections() and len(dead.connections()) >= 2, 30, "the dead upstream redialled")
        first = live.connections()[0]
        wait_until(lambda: time.monotonic() - first > 3 * IDLE_TIMEOUT, 30, "three read timeouts")
        assert len(live.connections()) == 1  # never cut: the heartbeat's pings got answers
        cut_after = dead.connections()[1] - dead.connections()[0]
        assert IDLE_TIMEOUT <= cut_after < 3 * IDLE_TIMEOUT  # cut by the read timeout, dialled again
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        stop_process(proc)
        for upstream in (live, dead):
            stop_process(upstream.proc)
    assert proc.stderr is not None
    errors = proc.stderr.read()
    assert "parent told" not in errors, errors
