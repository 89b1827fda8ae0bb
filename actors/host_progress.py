"""Per-host progress of a subscriber's reader, and the watchdog's verdict on it.

A ``HostProgress`` is written by one ``HostSubscriber``'s reader greenlet and read by its
``HostSupervisor`` in the same process (no message, no ask: a status board). It counts frames
read and frames processed and says what the reader is doing with the frame in hand
(``phase``) and since when. Waiting for the upstream to send is not being busy: an idle host
is healthy (its connection has its own ping and read timeout). A reader busy with one frame
for longer than the stall limit is stuck; ``where()`` shows the reader greenlet's stack.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field

import gevent
from prometheus_client import Counter

HOST_STALLS = Counter(
    "skyrelay_host_stalls_total", "Connected hosts whose reader was stuck on one frame, by phase", ["phase"]
)

# phases of the frame in hand; "backpressure" waits for the sequencer, which a reconnect cannot help
PHASES = ("decode", "rate_limit", "verify", "backpressure")


@dataclass(slots=True)
class HostProgress:
    read: int = 0  # frames received from the upstream
    processed: int = 0  # frames handled to the end (sequenced, dropped or skipped)
    phase: str = "idle"
    busy_since: float | None = None  # monotonic time the frame in hand was received
    last_progress: float = field(default_factory=time.monotonic)
    reader: gevent.Greenlet | None = None

    def begin(self) -> None:
        self.read += 1
        self.phase = "decode"
        self.busy_since = time.monotonic()

    def enter(self, phase: str) -> None:
        self.phase = phase

    def done(self) -> None:
        self.processed += 1
        self.phase = "idle"
        self.busy_since = None
        self.last_progress = time.monotonic()

    def stuck_for(self, now: float | None = None) -> float:
        """Seconds spent on the frame in hand (0 while waiting for the upstream)."""
        if self.busy_since is None:
            return 0.0
        return (time.monotonic() if now is None else now) - self.busy_since

    def where(self, limit: int = 12) -> str:
        """The reader greenlet's innermost frames (empty when it is not suspended)."""
        frame = getattr(self.reader, "gr_frame", None)
        if frame is None:
            return ""
        return "".join(traceback.format_stack(frame)[-limit:])

    def summary(self) -> dict[str, object]:
        return {
            "read": self.read,
            "processed": self.processed,
            "phase": self.phase,
            "busy_seconds": round(self.stuck_for(), 3),
            "since_progress_seconds": round(time.monotonic() - self.last_progress, 3),
        }
