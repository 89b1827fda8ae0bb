"""The control plane's relay-wide policy: public requestCrawl switch and daily limit, trusted domains.

Kept in ``relay_state`` (read per request, so every process agrees; the settings give only
the defaults). Mixed into ``actors.relay_api.Relay``; per-host rate windows and throttling
belong here as they are built.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from typing import Any

from actors.control_errors import ControlError
from actors.crawl import CrawlRefused, is_banned
from store.hosts import count_hosts_created_since, get_host, get_state, list_hosts, set_hosts_trusted, set_state

log = logging.getLogger(__name__)
CRAWL_ENABLED_KEY = "public_crawl_enabled"
PER_DAY_KEY = "new_hosts_per_day"
TRUSTED_KEY = "trusted_domains"
DAY_SECONDS = 86400.0
_DOMAIN = re.compile(r"^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def check_domain(raw: object) -> str:
    """A lower-case domain name, or ``ControlError``."""
    if not isinstance(raw, str) or not raw.strip():
        raise ControlError("InvalidRequest", "domain is required")
    domain = raw.strip().lower().rstrip(".")
    if len(domain) > 253 or not _DOMAIN.match(domain):
        raise ControlError("InvalidRequest", f"{domain[:100]!r} is not a valid domain name")
    return domain


class PolicyOps:
    settings: Any
    db: Any
    clock: Callable[[], float]

    def _domain(self, raw: object) -> str:
        return check_domain(raw)

    def public_crawl_gate(self, hostname: str) -> None:
        """``CrawlRefused`` when public requestCrawl is off, or would add a host over the day's limit."""
        if not self.crawl_enabled():
            raise CrawlRefused("Forbidden", "requestCrawl is disabled on this relay")
        self.new_host_gate(hostname)

    def new_host_gate(self, hostname: str) -> None:
        """``CrawlRefused`` when ``hostname`` is new and the day's new-hosts limit is reached."""
        with self.db.connection_context():
            if get_host(self.db, hostname) is not None:
                return  # a known host: no new host is added
            added = count_hosts_created_since(self.db, self.clock() - DAY_SECONDS)
        if added >= self.per_day_limit():
            raise CrawlRefused("RateLimitExceeded", "this relay has added as many new hosts as it does in a day")

    # -- trusted domains ---------------------------------------------------------------------------
    def trusted_domains(self) -> list[str]:
        with self.db.connection_context():
            raw = get_state(self.db, TRUSTED_KEY)
        return list(json.loads(raw)) if raw else []

    def is_trusted(self, hostname: str) -> bool:
        """Whether ``hostname`` is in a trusted domain (hosts added later count too)."""
        return is_banned(hostname, self.trusted_domains())

    def set_trusted_domains(self, domains: list[object]) -> list[str]:
        """Replace the trusted domains; hosts in them are marked trusted (limits build on this)."""
        clean = sorted({self._domain(d) for d in domains})
        with self.db.connection_context(), self.db.atomic():
            set_state(self.db, TRUSTED_KEY, json.dumps(clean))
            # is_banned is the domain match: the host is one of the domains or below one
            ids = [r.id for r in list_hosts(self.db, limit=1_000_000) if is_banned(r.hostname, clean)]
            set_hosts_trusted(self.db, ids)
        log.info("admin set trusted domains count=%d hosts=%d", len(clean), len(ids))
        return clean

    # -- public requestCrawl -----------------------------------------------------------------------
    def crawl_enabled(self) -> bool:
        with self.db.connection_context():
            return get_state(self.db, CRAWL_ENABLED_KEY) != "false"

    def set_crawl_enabled(self, enabled: bool) -> None:
        with self.db.connection_context():
            set_state(self.db, CRAWL_ENABLED_KEY, "true" if enabled else "false")
        log.info("admin set public requestCrawl enabled=%s", enabled)

    def per_day_limit(self) -> int:
        with self.db.connection_context():
            raw = get_state(self.db, PER_DAY_KEY)
        return int(raw) if raw is not None else int(self.settings.new_hosts_per_day)

    def set_per_day_limit(self, limit: object) -> None:
        if not isinstance(limit, int) or isinstance(limit, bool) or not 0 <= limit <= 1_000_000:
            raise ControlError("InvalidRequest", "limit must be an integer from 0 to 1000000")
        with self.db.connection_context():
            set_state(self.db, PER_DAY_KEY, str(limit))
        log.info("admin set new hosts per day limit=%d", limit)
