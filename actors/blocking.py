"""Run blocking I/O (fsync, SQLite, file reads) in gevent's thread pool, off the event loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import gevent
from gevent import monkey

T = TypeVar("T")


def _outcome(fn: Callable[[], T]) -> tuple[bool, T | BaseException]:
    try:
        return True, fn()
    except Exception as exc:
        return False, exc


def off_loop(fn: Callable[[], T]) -> T:
    """``fn()`` in the thread pool when gevent is patched in (other greenlets keep running), else inline.

    An exception is raised in the caller, and only there: gevent would also print the traceback
    of an exception escaping a pool task (a retried database error is not worth one).
    """
    if not monkey.is_module_patched("threading"):
        return fn()
    ok, value = gevent.get_hub().threadpool.apply(_outcome, (fn,))
    if not ok:
        assert isinstance(value, BaseException)
        raise value
    return value
