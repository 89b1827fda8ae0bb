"""Operator aid: on SIGUSR1, log the stack of every greenlet and thread of this process.

``kill -USR1 <pid>`` (the relay, or an ingest worker) writes one WARNING record holding
gevent's run info: every live greenlet with its stack and spawning tree, and every OS thread
(the thread pool that runs blocking I/O). It answers "where is it waiting?" for a process
that is alive but not progressing, without stopping it.
"""

from __future__ import annotations

import gc
import logging
import signal

import gevent
import gevent.util

log = logging.getLogger(__name__)


def stacks_text() -> str:
    """Every greenlet's and thread's stack, as gevent formats them.

    gevent finds greenlets through ``gc.get_objects()``, which skips objects frozen by
    ``gc.freeze()`` (the relay freezes its start-up objects, greenlets included): they are
    unfrozen for the dump and frozen again after it.
    """
    frozen = gc.get_freeze_count() > 0
    if frozen:
        gc.unfreeze()
    try:
        return "\n".join(gevent.util.format_run_info(thread_stacks=True, greenlet_stacks=True, limit=40))
    finally:
        if frozen:
            gc.freeze()


def dump_stacks() -> None:
    log.warning("stack dump requested\n%s", stacks_text())


def install_stack_dump(signum: int = signal.SIGUSR1) -> None:
    """Log every stack on ``signum``; the handler runs in a greenlet, so the dump is consistent."""
    gevent.signal_handler(signum, dump_stacks)
