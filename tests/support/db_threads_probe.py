"""Probe for tests: greenlets and gevent's thread pool using one ``open_database`` handle at once.

Run as ``python -m tests.support.db_threads_probe URL SECONDS``; prints one JSON line
``{"greenlet_rounds": [...], "thread_rounds": [...]}``: how many connect/query/close rounds each
greenlet, and the thread pool in all, had completed after each second. A greenlet (or the pool)
parked forever on a lock shows as a flat count.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402

from store.db import open_database  # noqa: E402

GREENLETS = 10
THREADS = 3


def main() -> int:
    db = open_database(sys.argv[1])
    seconds = int(sys.argv[2])
    rounds = [0] * GREENLETS
    threads = [0]

    def green(i: int) -> None:
        while True:
            with db.connection_context():
                db.execute_sql("SELECT 1").fetchone()
            rounds[i] += 1
            gevent.sleep(0)

    def in_thread() -> None:
        with db.connection_context():
            db.execute_sql("SELECT 1").fetchone()
        threads[0] += 1

    stopping = [False]

    def offload() -> None:
        pool = gevent.get_hub().threadpool
        while not stopping[0]:
            pool.apply(in_thread)

    workers = [gevent.spawn(green, i) for i in range(GREENLETS)]
    offloaders = [gevent.spawn(offload) for _ in range(THREADS)]
    history = []
    thread_history: list[int] = []
    for _ in range(seconds):
        gevent.sleep(1)
        history.append(list(rounds))
        thread_history.append(threads[0])
    stopping[0] = True
    gevent.joinall(offloaders, timeout=10)  # no thread is left inside the driver
    gevent.killall(workers, timeout=5)
    print(json.dumps({"greenlet_rounds": history, "thread_rounds": thread_history}), flush=True)
    os._exit(0)  # the pool's idle threads need no interpreter finalization


if __name__ == "__main__":
    sys.exit(main())
