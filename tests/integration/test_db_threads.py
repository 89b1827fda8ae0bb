"""A database handle used by greenlets and by the thread pool at once never parks a greenlet forever.

Regression test of the silent host stall (issue 7): peewee's connect/close lock was a gevent
lock, and a thread-pool thread releasing it did not wake the greenlets waiting for it (gevent
issue 2013). Subscribers resolving identities from SQL then stopped for good while the
sequencer's write-behind ran in the pool.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support.procs import REPO_ROOT

SECONDS = 4


def test_greenlets_keep_using_the_database_while_the_thread_pool_does(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'probe.sqlite'}"
    out = subprocess.run(
        [sys.executable, "-m", "tests.support.db_threads_probe", url, str(SECONDS)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    history = result["greenlet_rounds"]
    assert result["thread_rounds"] > 0
    stuck = [i for i in range(len(history[0])) if history[-1][i] == history[1][i]]
    assert not stuck, f"greenlets {stuck} made no progress after the first second: {history}"
