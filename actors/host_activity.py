"""Which upstream hosts are connected, and when each last sent a frame (for the ``idle`` host status).

Shared by the in-process subscribers (writers, from their own greenlets) and the web layer
(reader). A subscriber takes its host's ``HostLink`` when it connects and stamps
``last_frame`` with every frame it reads (one attribute store; no call on the hot path).
``is_idle`` says whether a host is connected but has sent nothing for ``idle_seconds``
(counted from the later of its connection and its last frame), which ``listHosts`` and
``getHostStatus`` report as status ``idle``, as the reference relay does. Hosts served by
ingest worker processes are never seen here, so they are never reported idle.
"""

from __future__ import annotations

import time


class HostLink:
    """One host's connection state; ``last_frame`` is written directly by its subscriber."""

    __slots__ = ("connected", "connected_at", "last_frame")

    def __init__(self) -> None:
        self.connected = False
        self.connected_at = 0.0
        self.last_frame = 0.0


class HostActivity:
    def __init__(self) -> None:
        self._links: dict[int, HostLink] = {}

    def connected(self, host_id: int) -> HostLink:
        """``host_id``'s firehose is open from now on; stamp ``last_frame`` on the returned link."""
        link = self._links.get(host_id)
        if link is None:
            link = self._links[host_id] = HostLink()
        link.connected = True
        link.connected_at = time.time()
        return link

    def disconnected(self, host_id: int) -> None:
        link = self._links.get(host_id)
        if link is not None:
            link.connected = False

    def is_idle(self, host_id: int, idle_seconds: float, now: float | None = None) -> bool:
        link = self._links.get(host_id)
        if link is None or not link.connected:
            return False
        now = time.time() if now is None else now
        return now - max(link.connected_at, link.last_frame) >= idle_seconds
