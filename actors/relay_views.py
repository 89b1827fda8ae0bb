"""The control plane's read side for the admin pages: dashboard figures and the host table, cheap to ask often.

Mixed into ``actors.relay_api.Relay``. Counters come from the Prometheus registry (summed
over ingest workers in multiprocess mode); rates are differences between the snapshots this
object keeps (one per second at most, a minute of them), so the first view after start-up has
none yet. A host's events per second is its upstream cursor's advance between two snapshots
(cursors are flushed every ``cursor_flush_seconds``, so it is a smoothed figure). Disk use of
the repo mirror is a SQL scan, cached for ``DISK_CACHE_SECONDS``.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from actors.blocking import off_loop
from store.hosts import HOST_ACTIVE, HOST_BANNED
from store.hosts import list_hosts as all_hosts

log = logging.getLogger(__name__)
SNAPSHOT_MIN_SECONDS = 1.0
SNAPSHOT_KEEP = 60
DISK_CACHE_SECONDS = 60.0
HOST_SORTS = ("hostname", "status", "cursor", "rate", "accounts", "drops")
HOST_FILTERS = ("all", "connected", "active", "offline", "blocked", "errors", "at_limit")


@dataclass(frozen=True, slots=True)
class _Snapshot:
    at: float
    received: float
    accepted: float
    sent: float
    cursors: dict[str, int] = field(default_factory=dict)


def metric_samples(multiprocess: bool) -> Iterable[Any]:
    """Every sample of the relay's registry (or, with ingest workers, of all processes summed)."""
    if multiprocess:
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        families = registry.collect()
    else:
        families = REGISTRY.collect()
    for family in families:
        yield from family.samples


class ViewOps:
    settings: Any
    supervisor: Any
    db: Any
    clock: Callable[[], float]

    def _init_views(self) -> None:
        self._views_lock = threading.Lock()
        self._snapshots: deque[_Snapshot] = deque(maxlen=SNAPSHOT_KEEP)
        self._mirror_bytes: tuple[float, int | None] = (0.0, None)

    def upstream_conns(self) -> list[str]:  # pragma: no cover - provided by Relay
        raise NotImplementedError

    def list_hosts(self) -> list[dict[str, Any]]:  # pragma: no cover - provided by Relay
        raise NotImplementedError

    def _counters(self) -> dict[str, Any]:
        host_drops: defaultdict[str, defaultdict[str, float]] = defaultdict(lambda: defaultdict(float))
        out: dict[str, Any] = {"received": 0.0, "accepted": 0.0, "sent": 0.0, "last_seq": 0, "connected": 0,
                               "drops": defaultdict(float), "host_drops": host_drops}  # fmt: skip
        for s in metric_samples(self.settings.ingest_workers > 0):
            if s.name == "skyrelay_events_received_total":
                out["received"] += s.value
            elif s.name == "skyrelay_events_accepted_total":
                out["accepted"] += s.value
            elif s.name == "skyrelay_consumer_frames_sent_total":
                out["sent"] += s.value
            elif s.name == "skyrelay_last_seq":
                out["last_seq"] = max(out["last_seq"], int(s.value))
            elif s.name == "skyrelay_upstream_hosts_connected":
                out["connected"] += int(s.value)
            elif s.name == "skyrelay_events_dropped_total" and s.value:
                reason, host = s.labels.get("reason", "?"), s.labels.get("host", "")
                out["drops"][reason] += s.value
                out["host_drops"][host][reason] += s.value
        return out

    def _snapshot(self, counters: dict[str, Any], cursors: dict[str, int]) -> tuple[_Snapshot | None, _Snapshot]:
        """Record a snapshot (at most one a second); the oldest kept one to compare it with."""
        now = self.clock()
        snap = _Snapshot(now, counters["received"], counters["accepted"], counters["sent"], cursors)
        with self._views_lock:
            snaps = self._snapshots
            if not snaps or now - snaps[-1].at >= SNAPSHOT_MIN_SECONDS:
                snaps.append(snap)
            oldest = snaps[0] if snaps and now - snaps[0].at >= SNAPSHOT_MIN_SECONDS else None
        return oldest, snap

    def _host_cursors(self) -> dict[str, int]:
        with self.db.connection_context():
            return {r.hostname: r.last_seq for r in all_hosts(self.db, limit=1_000_000)}

    def disk_use(self) -> dict[str, int | None]:
        """Bytes of the event log's files and of the repo mirror's live slices (None: mirror off)."""
        directory = self.supervisor.event_log.directory
        log_bytes = sum(p.stat().st_size for p in directory.glob("*") if p.is_file()) if directory.exists() else 0
        with self._views_lock:
            at, mirror = self._mirror_bytes
        if self.supervisor.carstore is not None and (mirror is None or self.clock() - at > DISK_CACHE_SECONDS):
            store = self.supervisor.carstore
            mirror = int(off_loop(lambda: store.stats())["bytes"])
            with self._views_lock:
                self._mirror_bytes = (self.clock(), mirror)
        return {"event_log_bytes": log_bytes, "mirror_bytes": mirror}

    def dashboard(self) -> dict[str, Any]:
        """Figures for the dashboard: rates (None until two snapshots a second apart), totals, drops, disk."""
        counters = self._counters()
        oldest, snap = self._snapshot(counters, self._host_cursors())
        span = snap.at - oldest.at if oldest else 0.0
        rates = {
            k: (getattr(snap, k) - getattr(oldest, k)) / span if oldest else None
            for k in ("received", "accepted", "sent")
        }
        return {
            "events_in_per_second": rates["accepted"],
            "frames_received_per_second": rates["received"],
            "events_out_per_second": rates["sent"],
            "rate_window_seconds": span,
            "events_accepted_total": int(counters["accepted"]),
            "frames_sent_total": int(counters["sent"]),
            "hosts_connected": len(self.upstream_conns()),
            "consumers": len(self.supervisor.registry),
            "drops_by_reason": dict(sorted(counters["drops"].items(), key=lambda kv: -kv[1])),
            "last_seq": counters["last_seq"],
            **self.disk_use(),
        }  # fmt: skip

    def host_table(self, *, query: str = "", status: str = "all", sort: str = "hostname", descending: bool = False,
                   page: int = 1, per_page: int = 50) -> dict[str, Any]:  # fmt: skip
        """One page of hosts, filtered and sorted over the cheap in-memory list (fine for thousands)."""
        hosts = self.list_hosts()
        counters = self._counters()
        cursors = {h["Host"]: h["Cursor"] for h in hosts}
        oldest, snap = self._snapshot(counters, cursors)
        span = snap.at - oldest.at if oldest else 0.0
        for h in hosts:
            before = oldest.cursors.get(h["Host"]) if oldest else None
            h["EventsPerSecond"] = max(0.0, (h["Cursor"] - before) / span) if before is not None and span else None
            h["Listing"] = listing_progress(h)
            h["Drops"] = dict(counters["host_drops"].get(h["Host"], {}))
            h["DropTotal"] = int(sum(h["Drops"].values()))
            h["AtAccountLimit"] = h.get("RepoLimit") is not None and h["RepoCount"] >= h["RepoLimit"]
        needle = query.strip().lower()
        keep = {
            "all": lambda h: True,
            "connected": lambda h: h["HasActiveConnection"],
            "active": lambda h: h["Status"] == HOST_ACTIVE,
            "offline": lambda h: h["Status"] not in (HOST_ACTIVE, HOST_BANNED),
            "blocked": lambda h: h["Blocked"],
            "errors": lambda h: bool(h["LastError"]),
            "at_limit": lambda h: h["AtAccountLimit"],
        }.get(status, lambda h: True)
        rows = [h for h in hosts if keep(h) and (not needle or needle in h["Host"])]
        key = {
            "hostname": lambda h: h["Host"],
            "status": lambda h: (h["Status"], h["Host"]),
            "cursor": lambda h: h["Cursor"],
            "rate": lambda h: h["EventsPerSecond"] or 0.0,
            "accounts": lambda h: h["RepoCount"],
            "drops": lambda h: h["DropTotal"],
        }.get(sort, lambda h: h["Host"])
        rows.sort(key=key, reverse=descending)
        per_page = max(1, min(per_page, 500))
        pages = max(1, -(-len(rows) // per_page))
        page = max(1, min(page, pages))
        return {"hosts": rows[(page - 1) * per_page : page * per_page], "total": len(hosts), "matching": len(rows),
                "page": page, "pages": pages, "per_page": per_page}  # fmt: skip

    def host_detail(self, hostname: str) -> dict[str, Any] | None:
        """One host's row of the host table (None: unknown)."""
        table = self.host_table(query=hostname, per_page=500)
        return next((h for h in table["hosts"] if h["Host"] == hostname), None)


_LISTING = {"running": "listing", "done": "listed", "stopped": "listing stopped"}


def listing_progress(host: dict[str, Any]) -> str | None:
    """The host's listRepos walk for the pages: e.g. ``listing: 1,234 accounts`` (None: never walked)."""
    state = _LISTING.get(host.get("EnumerationState") or "none")
    if state is None:
        return None
    error = host.get("EnumerationError")
    return f"{state}: {int(host.get('EnumeratedAccounts') or 0):,} accounts" + (f" ({error})" if error else "")
