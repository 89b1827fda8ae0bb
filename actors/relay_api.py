"""The control plane: ``Relay``, the one API every operator operation goes through (admin API, CLI, tests).

Each change is written to SQL first, then told to the actors that hold it in memory: the host
supervisor (or, with ingest workers, ``IngestPool``, which passes it over the link to every
worker), the sequencer, the repo mirror and the caches. Workers and restarted actors read the
same state from SQL when they start, so a change is not lost while one of them is down.
Messages: ``actors.messages_control``. Account operations: ``actors.relay_accounts``; relay-wide
policy (requestCrawl switch and daily limit, trusted domains): ``actors.relay_policy``; the
admin pages' read side (dashboard figures, the host table): ``actors.relay_views``.

Host status ``banned`` is a blocked host: not subscribed, refused by requestCrawl, kept across
restarts. A banned domain refuses its hosts and their sub-domains' likewise. Public
requestCrawl has an on/off switch and a new-hosts-per-day limit (``relay_state`` keys); an
admin crawl bypasses both, never a block or a ban.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from actors.control_errors import ControlError
from actors.crawl import CrawlRefused, CrawlTarget, is_banned, normalize_hostname, probe_pds
from actors.crawl_check import check_crawl
from actors.host_rate import WindowLimits, window_limits, with_overrides
from actors.messages import StartHost, StopHost
from actors.messages_control import ApplyHostLimits, RestartHost
from actors.messages_discovery import EnumerateHost
from actors.metrics import HOSTS_AT_ACCOUNT_LIMIT
from actors.relay_accounts import AccountOps
from actors.relay_imports import ImportOps
from actors.relay_policy import PolicyOps
from actors.relay_views import ViewOps
from store.accounts import throttled_counts
from store.enumeration import EnumerationRow, all_enumerations
from store.hosts import (
    HOST_ACTIVE,
    HOST_BANNED,
    HostRow,
    add_domain_ban,
    banned_domains,
    get_host,
    hosts_at_account_limit,
    list_hosts,
    remove_domain_ban,
    set_host_limits,
    set_host_status,
)

log = logging.getLogger(__name__)
ASK_TIMEOUT_SECONDS = 10.0
MAX_ACCOUNT_LIMIT = 1 << 40
MAX_EVENTS_PER_SECOND = 1_000_000.0


def _enumeration_fields(row: EnumerationRow | None) -> dict[str, Any]:
    """A host's listRepos walk: accounts found so far, state (none, running, done, stopped), last error."""
    if row is None:
        return {"EnumeratedAccounts": 0, "EnumerationState": "none", "EnumerationError": None}
    return {"EnumeratedAccounts": row.accounts, "EnumerationState": row.state, "EnumerationError": row.error}


def _window_limit(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_ACCOUNT_LIMIT:
        raise ControlError("InvalidRequest", f"{name} must be an integer from 1 to {MAX_ACCOUNT_LIMIT}")
    return value


class Relay(AccountOps, PolicyOps, ViewOps, ImportOps):
    """Operator operations over a running ``RelaySupervisor``; raises ``ControlError`` on a refusal."""

    def __init__(self, supervisor: Any, *, probe: Callable[[CrawlTarget], Any] | None = None,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        self.supervisor = supervisor
        self.settings = supervisor.settings
        self.db = supervisor.db
        self.probe = probe or (lambda target: probe_pds(target, client=supervisor.outbound))
        self.clock = clock
        self._init_views()

    # -- hosts -------------------------------------------------------------------------------------
    def _hostname(self, raw: object) -> str:
        try:
            return normalize_hostname(raw, insecure=self.settings.allow_insecure_hosts).hostname
        except CrawlRefused as exc:
            raise ControlError("InvalidRequest", exc.message) from None

    def _host(self, raw: object) -> HostRow:
        hostname = self._hostname(raw)
        with self.db.connection_context():
            row = get_host(self.db, hostname)
        if row is None:
            raise ControlError("HostNotFound", f"host {hostname} is not known to this relay", 404)
        return row

    def upstream_conns(self) -> list[str]:
        """Hostnames with a running subscriber (in this process or an ingest worker)."""
        found: list[str] = []

        def walk(node: dict[str, Any]) -> None:
            if node.get("kind") == "HostSubscriber" and node.get("state") == "running":
                found.append(str(node["name"]))
            for child in node.get("children", []):
                walk(child)

        walk(self.tree())
        return sorted(found)

    def list_hosts(self) -> list[dict[str, Any]]:
        """Every host with its status and limits (the reference relay's ``/admin/pds/list`` fields)."""
        with self.db.connection_context():
            rows = list_hosts(self.db, limit=1_000_000)
            walks = all_enumerations(self.db)
            throttled = throttled_counts(self.db)
        running = set(self.upstream_conns())
        trusted = self.trusted_domains()
        out = []
        for row in rows:
            limit = row.account_limit if row.account_limit is not None else self.settings.default_host_account_limit
            rate = row.events_per_second or self.settings.default_host_events_per_second
            is_trusted = row.trusted or is_banned(row.hostname, trusted)
            windows = self._window_limits(row, limit, row.events_per_hour, row.events_per_day)
            out.append({
                "ID": row.id, "Host": row.hostname, "Cursor": row.last_seq, "Registered": row.status == HOST_ACTIVE,
                "Blocked": row.status == HOST_BANNED, "RepoCount": row.account_count, "RepoLimit": limit,
                "UserCount": row.account_count, "HasActiveConnection": row.hostname in running,
                "PerSecondEventRate": {"Max": rate, "Window": 1}, "Status": row.status,
                "PerHourEventRate": {"Max": windows.per_hour, "Window": 3600},
                "PerDayEventRate": {"Max": windows.per_day, "Window": 86400},
                "Trusted": is_trusted, "ThrottledCount": throttled.get(row.id, 0),
                # admitted accounts past a limit lowered below them: kept active, reported
                "OverLimit": row.account_count - throttled.get(row.id, 0) > limit,
                "LastError": row.last_error, **_enumeration_fields(walks.get(row.id)),
            })  # fmt: skip
        return out

    def request_crawl(self, raw: object, *, admin: bool = True) -> str:
        """Subscribe to a host after the checks requestCrawl makes; an admin crawl skips the public gate."""
        try:
            target = self.check_crawl(raw, public=not admin, new_host_limit=False)
        except CrawlRefused as exc:
            raise ControlError(exc.error, exc.message) from None
        self.subscribe(target.hostname)
        log.info("crawl requested host=%s admin=%s", target.hostname, admin)
        return target.hostname

    def check_crawl(self, raw: object, *, public: bool, new_host_limit: bool) -> CrawlTarget:
        """The requestCrawl checks, shared by admin and public crawl, DID-list import and spidering.

        A usable host name, not banned (host or domain); for ``public`` the requestCrawl switch and
        the new-hosts-per-day limit, for ``new_host_limit`` that limit alone; then the
        ``describeServer`` probe through the outbound client (which checks every address it
        connects to). ``CrawlRefused`` says why not.
        """
        gate = self.public_crawl_gate if public else self.new_host_gate if new_host_limit else None
        max_hosts = self.settings.max_hosts if public or new_host_limit else None  # an admin may go past it
        return check_crawl(self.db, raw, insecure=self.settings.allow_insecure_hosts, probe=self.probe, gate=gate,
                           max_hosts=max_hosts)  # fmt: skip

    def subscribe(self, hostname: str) -> None:
        """Follow a host that passed ``check_crawl``: subscribe to it and walk its listRepos."""
        self.supervisor.hosts.tell(StartHost(hostname))
        if getattr(self.supervisor, "enumerator", None) is not None:
            self.supervisor.enumerator.tell(EnumerateHost(hostname))

    def kill_upstream(self, raw: object, *, block: bool = False) -> None:
        row = self._host(raw)
        if block:
            self.block_host(row.hostname)
            return
        if row.hostname not in self.upstream_conns():
            raise ControlError("HostInactive", "no active connection to the given host")
        self.supervisor.hosts.tell(StopHost(row.hostname, "admin_kill"))
        log.info("admin killed upstream host=%s", row.hostname)

    def block_host(self, raw: object) -> None:
        row = self._host(raw)
        with self.db.connection_context():
            set_host_status(self.db, row.id, HOST_BANNED, "blocked by an operator")
        self.supervisor.hosts.tell(StopHost(row.hostname, "admin_block"))
        log.info("admin blocked host=%s", row.hostname)

    def unblock_host(self, raw: object) -> None:
        row = self._host(raw)
        with self.db.connection_context():
            set_host_status(self.db, row.id, HOST_ACTIVE)
            banned = is_banned(row.hostname, banned_domains(self.db))
        if not banned:
            self.supervisor.hosts.tell(StartHost(row.hostname))
        log.info("admin unblocked host=%s", row.hostname)

    def change_limits(self, raw: object, *, repo_limit: object = None, per_second: object = None,
                      per_hour: object = None, per_day: object = None) -> dict[str, Any]:  # fmt: skip
        """Set a host's account limit, events per second, per hour and/or per day (given ones only).

        Throttled accounts that fit under a raised account limit are released (``release_throttled``).
        """
        row = self._host(raw)
        if repo_limit is None and per_second is None and per_hour is None and per_day is None:
            raise ControlError("InvalidRequest", "give repo_limit, per_second, per_hour and/or per_day")
        limit, rate = row.account_limit, row.events_per_second
        hour = row.events_per_hour if per_hour is None else _window_limit("per_hour", per_hour)
        day = row.events_per_day if per_day is None else _window_limit("per_day", per_day)
        if repo_limit is not None:
            ok = isinstance(repo_limit, int) and not isinstance(repo_limit, bool)
            if not ok or not 0 <= repo_limit <= MAX_ACCOUNT_LIMIT:  # type: ignore[operator]
                raise ControlError("InvalidRequest", f"repo_limit must be an integer from 0 to {MAX_ACCOUNT_LIMIT}")
            limit = repo_limit  # type: ignore[assignment]
        if per_second is not None:
            ok = isinstance(per_second, int | float) and not isinstance(per_second, bool)
            if not ok or not 0 < float(per_second) <= MAX_EVENTS_PER_SECOND:  # type: ignore[arg-type]
                raise ControlError("InvalidRequest", f"per_second must be in (0, {MAX_EVENTS_PER_SECOND:g}]")
            rate = float(per_second)  # type: ignore[arg-type]
        with self.db.connection_context():
            set_host_limits(self.db, row.id, account_limit=limit, events_per_second=rate, events_per_hour=hour,
                            events_per_day=day)  # fmt: skip
        effective_limit = limit if limit is not None else self.settings.default_host_account_limit
        effective_rate = rate or self.settings.default_host_events_per_second
        self.supervisor.hosts.tell(ApplyHostLimits(row.hostname, effective_limit, effective_rate, hour, day))
        log.info("admin changed host limits host=%s account_limit=%s events_per_second=%s per_hour=%s per_day=%s",
                 row.hostname, limit, rate, hour, day)  # fmt: skip
        released = self.release_throttled(row, effective_limit)
        with self.db.connection_context():
            HOSTS_AT_ACCOUNT_LIMIT.set(hosts_at_account_limit(self.db, self.settings.default_host_account_limit))
        windows = self._window_limits(row, effective_limit, hour, day)
        return {"host": row.hostname, "repo_limit": effective_limit, "per_second": effective_rate,
                "per_hour": windows.per_hour, "per_day": windows.per_day, "released": len(released)}  # fmt: skip

    def _window_limits(self, row: HostRow, limit: int, per_hour: int | None, per_day: int | None) -> WindowLimits:
        """The host's hour and day limits in effect: its own where set, else the defaults scaled."""
        s = self.settings
        is_trusted = row.trusted or is_banned(row.hostname, self.trusted_domains())
        scaled = window_limits(s.default_host_events_per_hour, s.default_host_events_per_day, limit,
                               trusted=is_trusted, trusted_multiplier=s.trusted_host_rate_multiplier)  # fmt: skip
        return with_overrides(scaled, WindowLimits(per_hour, per_day))

    # -- domains -----------------------------------------------------------------------------------
    def list_domain_bans(self) -> list[str]:
        with self.db.connection_context():
            return banned_domains(self.db)

    def ban_domain(self, raw: object) -> list[str]:
        """Ban a domain and its sub-domains; disconnects their hosts. The hostnames stopped."""
        domain = self._domain(raw)
        with self.db.connection_context():
            add_domain_ban(self.db, domain)
            hosts = [r.hostname for r in list_hosts(self.db, limit=1_000_000) if is_banned(r.hostname, [domain])]
        for hostname in hosts:
            self.supervisor.hosts.tell(StopHost(hostname, "domain_ban"))
        log.info("admin banned domain domain=%s hosts_stopped=%d", domain, len(hosts))
        return hosts

    def unban_domain(self, raw: object) -> None:
        domain = self._domain(raw)
        with self.db.connection_context():
            removed = remove_domain_ban(self.db, domain)
        if not removed:
            raise ControlError("DomainNotFound", f"{domain} is not banned", 404)
        log.info("admin unbanned domain domain=%s", domain)

    # -- consumers and actors ----------------------------------------------------------------------
    def consumers(self) -> list[dict[str, Any]]:
        return [
            {
                "id": i,
                "remote_addr": c.remote,
                "events_consumed": c.frames_sent,
                "user_agent": c.user_agent,
                "cursor": c.cursor,
                "queued_frames": c.queued,
                "cut_reason": c.cut_reason,
                "connected_at": datetime.fromtimestamp(c.connected_at, UTC).isoformat().replace("+00:00", "Z"),
            }
            for i, c in enumerate(self.supervisor.registry.consumers(), start=1)
        ]

    def tree(self) -> dict[str, Any]:
        return dict(self.supervisor.tree())

    def restart_actor(self, name: object) -> str:
        """Restart ``identity``, ``mirror``, ``worker-N`` (an ingest worker) or ``hosts/<hostname>``."""
        if not isinstance(name, str) or not name:
            raise ControlError("InvalidRequest", "name is required")
        if name.startswith("hosts/"):
            row = self._host(name.removeprefix("hosts/"))
            if row.hostname not in self.upstream_conns():
                raise ControlError("HostInactive", "that host has no running subscriber")
            self.supervisor.hosts.tell(RestartHost(row.hostname))
        elif name.startswith("worker-") and name.removeprefix("worker-").isdigit():
            pool = self.supervisor.hosts
            if not hasattr(pool, "restart_worker") or not pool.restart_worker(int(name.removeprefix("worker-"))):
                raise ControlError("ActorNotFound", f"no ingest worker {name}", 404)
        elif name in ("identity", "mirror"):
            if not self.supervisor.restart(name):
                raise ControlError("ActorNotRunning", f"{name} is not running now", 409)
        elif name in ("relay", "sequencer", "broadcaster", "hosts"):
            raise ControlError("NotRestartable", f"{name} is essential; restart the relay process instead")
        else:
            raise ControlError("ActorNotFound", f"no actor named {name!r}", 404)
        log.warning("admin restarted actor name=%s", name)
        return name
