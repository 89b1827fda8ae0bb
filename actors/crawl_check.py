"""The requestCrawl checks, in one function shared by public and admin crawl, DID-list import and spidering.

Order: a usable host name (``normalize_hostname``); not banned (the host, or a domain it is
in); not a new host past ``max_hosts``; the caller's ``gate`` (the public requestCrawl switch
and new-hosts-per-day limit, or that limit alone); then the ``describeServer`` probe, which
goes through the outbound client and so checks every address it connects to. ``CrawlRefused``
names the first check that fails.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from actors.crawl import CrawlRefused, CrawlTarget, is_banned, normalize_hostname
from store.hosts import HOST_BANNED, banned_domains, count_hosts, get_host


def check_crawl(
    db: Any,
    raw: object,
    *,
    insecure: bool,
    probe: Callable[[CrawlTarget], Any],
    gate: Callable[[str], None] | None = None,
    max_hosts: int | None = None,
) -> CrawlTarget:
    """The target to subscribe to once every check passed; ``CrawlRefused`` otherwise."""
    target = normalize_hostname(raw, insecure=insecure)
    with db.connection_context():
        bans = banned_domains(db)
        existing = get_host(db, target.hostname)
        known_hosts = count_hosts(db) if existing is None and max_hosts is not None else 0
    if is_banned(target.hostname, bans) or (existing is not None and existing.status == HOST_BANNED):
        raise CrawlRefused("HostBanned", "this host is banned from the relay")
    if max_hosts is not None and existing is None and known_hosts >= max_hosts:
        raise CrawlRefused("HostLimitReached", f"this relay follows its maximum of {max_hosts} hosts")
    if gate is not None:
        gate(target.hostname)
    probe(target)
    return target
