"""Host lifecycle log lines: one structured line per change, rate-limited where they can repeat.

Every upstream host's life shows in the log as ``host <change> host=<name> key=value...``, with
``change`` one of ``added`` (first subscription), ``blocked`` (refused: banned), ``offline``
(gave up after repeated failures), ``reconnected`` (connected again after failed attempts),
``disconnected`` (a connection ended, with its reason). A change that can repeat is logged at
most once per ``INTERVAL_SECONDS`` per (change, host, reason); the next line that gets through
says how many were held back (``suppressed=N``). At most ``MAX_KEYS`` keys are remembered
(least recently logged forgotten), so a flood of host names cannot grow memory.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any

log = logging.getLogger(__name__)

INTERVAL_SECONDS = 60.0
MAX_KEYS = 10_000
_LEVELS = {"offline": logging.WARNING, "blocked": logging.INFO}

_last: OrderedDict[tuple[str, str, str], tuple[float, int]] = OrderedDict()


def host_changed(change: str, hostname: str, *, reason: str = "", limited: bool = True, **context: Any) -> bool:
    """Log one lifecycle change; False when it was held back by the rate limit."""
    suppressed = 0
    if limited:
        key = (change, hostname, reason)
        now = time.monotonic()
        seen = _last.get(key)
        if seen is not None and now - seen[0] < INTERVAL_SECONDS:
            _last[key] = (seen[0], seen[1] + 1)
            return False
        suppressed = seen[1] if seen is not None else 0
        _last[key] = (now, 0)
        _last.move_to_end(key)
        while len(_last) > MAX_KEYS:
            _last.popitem(last=False)
    fields = {"reason": reason or None, **context, "suppressed": suppressed or None}
    extra = "".join(f" {k}={v}" for k, v in fields.items() if v is not None)
    log.log(_LEVELS.get(change, logging.INFO), "host %s host=%s%s", change, hostname, extra)
    return True


def reset() -> None:
    """Forget the rate-limit state (tests)."""
    _last.clear()
