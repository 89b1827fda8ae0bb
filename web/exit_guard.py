"""The last resort of a stopping relay: exit hard (``os._exit``) once the shutdown deadline has passed.

Stopping is done properly first (``web.server.serve``: front end, then the actor tree in
reverse, then every actor pykka still knows). But a stuck greenlet, an actor blocked in a
retry or a non-daemon thread must not keep the process alive: a service manager restarts a
relay only once its process is gone. ``ExitGuard.arm`` starts the clock; at the deadline a
greenlet logs what is still alive and exits. In case the event loop itself is blocked, a real
OS thread (not a greenlet) exits a few seconds later without it. A second SIGTERM/SIGINT
during the shutdown exits at once.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections import Counter

import gevent
import pykka
from gevent import monkey

log = logging.getLogger(__name__)

LOOP_BLOCKED_GRACE_SECONDS = 5.0  # the OS thread's margin after the greenlet's deadline


def still_alive() -> str:
    """Actors and non-daemon threads still running, as ``Name*count`` (for the last log line)."""
    actors = Counter(ref.actor_class.__name__ for ref in pykka.ActorRegistry.get_all())
    threads = Counter(
        t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()
    )
    parts = [f"{name}*{n}" for name, n in sorted(actors.items())]
    parts += [f"thread:{name}*{n}" for name, n in sorted(threads.items())]
    return ",".join(parts) or "nothing known"


def _flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:
            pass
    sys.stderr.flush()


class ExitGuard:
    def __init__(self, timeout_seconds: float) -> None:
        self.timeout_seconds = timeout_seconds
        self.status = 1
        self.armed = False

    def arm(self, status: int) -> None:
        """From now on the process ends within ``timeout_seconds``, with ``status`` if it ends by itself."""
        if self.armed:
            return
        self.armed = True
        self.status = status
        gevent.spawn_later(self.timeout_seconds, self._expire)
        start_new_thread = monkey.get_original("_thread", "start_new_thread")
        start_new_thread(self._backstop, ())

    def exit_now(self, reason: str) -> None:
        log.error("exiting at once reason=%s still_alive=%s", reason, still_alive())
        _flush_logs()
        os._exit(self.status or 1)

    def _expire(self) -> None:
        log.error(
            "shutdown deadline passed: exiting hard timeout=%.0fs still_alive=%s", self.timeout_seconds, still_alive()
        )
        _flush_logs()
        os._exit(self.status or 1)  # the shutdown failed: never report success

    def _backstop(self) -> None:
        """In an OS thread: exit even when the event loop cannot run ``_expire``."""
        real_sleep = monkey.get_original("time", "sleep")
        real_sleep(self.timeout_seconds + LOOP_BLOCKED_GRACE_SECONDS)
        os.write(2, b"skyrelay: shutdown deadline passed and the event loop is blocked: exiting hard\n")
        os._exit(self.status or 1)
