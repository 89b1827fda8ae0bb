"""Run blocking I/O (fsync, SQLite, file reads) in gevent's thread pool, off the event loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import gevent
from gevent import monkey

T = TypeVar("T")


def off_loop(fn: Callable[[], T]) -> T:
    """``fn()`` in the thread pool when gevent is patched in (other greenlets keep running), else inline."""
    if monkey.is_module_patched("threading"):
        return gevent.get_hub().threadpool.apply(fn)
    return fn()
