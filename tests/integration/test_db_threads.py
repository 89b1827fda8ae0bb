"""A database handle used by greenlets and by the thread pool at once never parks a greenlet forever.

Regression test of the silent host stall (issue 7): peewee's connect/close lock was a gevent
lock, and a thread-pool thread releasing it did not wake the greenlets waiting for it (gevent
issue 2013). Subscribers resolving identities from SQL then stopped for good while the
sequencer's write-behind ran in the pool. With PostgreSQL the pool's own lock did the same,
the other way round too (thread-pool writes parked while greenlets used the pool).
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support.procs import REPO_ROOT

SECONDS = 4


def test_greenlets_and_the_thread_pool_keep_using_one_database(db_url: str) -> None:
    url = db_url
    out = subprocess.run(
        [sys.executable, "-m", "tests.support.db_threads_probe", url, str(SECONDS)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    history, threads = result["greenlet_rounds"], result["thread_rounds"]
    stuck = [i for i in range(len(history[0])) if history[-1][i] == history[1][i]]
    assert not stuck, f"greenlets {stuck} made no progress after the first second: {history}"
    assert threads[-1] > threads[1], f"the thread pool made no progress after the first second: {threads}"
