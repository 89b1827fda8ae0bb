"""``skyrelay hosts pull --from URL``: seed a running relay's hosts from another relay's ``listHosts``.

Reads every page of the source's ``com.atproto.sync.listHosts`` (a cursor that comes back or
more than ``MAX_PAGES`` pages stop it; a page that is not a listHosts answer stops it with
exit status 1), skips hosts with no accounts, hosts the source itself reports banned and
hosts in a domain this relay bans, and asks this relay (admin API, ``/admin/pds/requestCrawl``:
bans, the probe) to follow each of the others. A progress line on a terminal, a summary at the end.

The source is read through the relay's one outbound client (``actors.outbound``): each page
under a deadline (``--timeout``) and a size cap, no redirects, no proxy. The operator names
the source, so its address is trusted (as the PLC directory is), but its URL must be https
unless ``--allow-http`` (tests, a source on a private network).
"""

from __future__ import annotations

import argparse
import sys
import urllib.parse
from collections import Counter
from typing import TYPE_CHECKING, Any

from actors.outbound_errors import BadUrl, OutboundError
from actors.pages import BadPage, parse_list_hosts
from web.admin_cli import EXIT_REFUSED, EXIT_USAGE, AdminClient, Refused

if TYPE_CHECKING:  # imported when pulling: the CLI parser must not load prometheus_client before serve sets it up
    from actors.outbound import OutboundClient

MAX_PAGES = 10_000
MAX_PAGE_BYTES = 4 * 1024 * 1024
MAX_READ_SECONDS = 30.0  # the longest wait for any one read of a page (the page's deadline is --timeout)


def add_hosts_parser(sub: Any) -> None:
    hosts = sub.add_parser("hosts", help="seed the relay's hosts from another relay")
    hosts.add_argument("--url", help="this relay's base URL (env SKYRELAY_ADMIN_URL; default http://127.0.0.1:2470)")
    hosts.add_argument("--password", help="an admin password (env SKYRELAY_ADMIN_PASSWORD)")
    hosts.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for one answer")
    acts = hosts.add_subparsers(dest="action", metavar="ACTION", required=True)
    pull = acts.add_parser("pull", help="follow every host with accounts that another relay lists")
    pull.add_argument("--from", dest="source", required=True, help="the other relay's base URL (https)")
    pull.add_argument("--allow-http", action="store_true", help="accept an http:// source URL (tests)")


def source_client(source: str, allow_http: bool) -> OutboundClient:
    """The outbound client for an operator-named source: its host trusted, its scheme https unless ``allow_http``."""
    from actors.outbound import OutboundClient

    scheme = urllib.parse.urlsplit(source).scheme
    if scheme != "https" and not (allow_http and scheme == "http"):
        raise BadUrl("the source URL must be https:// (or http:// with --allow-http)")
    return OutboundClient.for_settings(insecure=False).trusting(source)


def _source_page(client: OutboundClient, source: str, cursor: str | None, timeout: float) -> bytes:
    from actors.outbound import Limits

    query = {"limit": "1000", **({"cursor": cursor} if cursor else {})}
    url = f"{source.rstrip('/')}/xrpc/com.atproto.sync.listHosts?{urllib.parse.urlencode(query)}"
    limits = Limits(total_seconds=timeout, read_seconds=min(timeout, MAX_READ_SECONDS), max_bytes=MAX_PAGE_BYTES)
    return client.get(url, limits, headers={"Accept": "application/json"}).body


def run_hosts(args: argparse.Namespace) -> int:
    from config.admin_client import admin_client_config

    config = admin_client_config(args.url, args.password)
    if not config.password:
        print("skyrelay hosts: no admin password: pass --password or set SKYRELAY_ADMIN_PASSWORD", file=sys.stderr)
        return EXIT_USAGE
    client = AdminClient(config.url, config.password.reveal(), args.timeout)
    counts: Counter[str] = Counter()
    status = 0
    try:
        bans = client.call("GET", "/admin/subs/listDomainBans")["banned_domains"]
        status = _pull(client, args.source, args.allow_http, args.timeout, list(bans), counts)
    except Refused as exc:
        print(f"skyrelay hosts: {exc.error}: {exc.message}", file=sys.stderr)
        status = EXIT_REFUSED
    if sys.stderr.isatty():
        print(file=sys.stderr)
    print("hosts pulled: " + (", ".join(f"{k} {v:,}" for k, v in sorted(counts.items()) if v) or "none"))
    return status


def _pull(client: AdminClient, source: str, allow_http: bool, timeout: float, bans: list[str],
          counts: Counter[str]) -> int:  # fmt: skip
    try:
        outbound = source_client(source, allow_http)
    except BadUrl as exc:
        print(f"skyrelay hosts: {exc}", file=sys.stderr)
        return EXIT_USAGE
    cursor: str | None = None
    seen: set[str] = set()
    for _ in range(MAX_PAGES):
        try:
            hosts, nxt, skipped = parse_list_hosts(_source_page(outbound, source, cursor, timeout))
        except (BadPage, OutboundError, ValueError) as exc:
            print(f"skyrelay hosts: the source's listHosts is unusable: {exc}", file=sys.stderr)
            return EXIT_REFUSED
        if skipped:
            counts["skipped_bad_entry"] += len(skipped)
        for hostname, accounts, source_status in hosts:
            counts[_one(client, hostname, accounts, source_status, bans)] += 1
            if sys.stderr.isatty():
                print(f"\rhosts {sum(counts.values()):,}  added {counts['added']:,}", end="", file=sys.stderr)
        if nxt is None or not hosts:
            return 0
        if nxt in seen:
            print("skyrelay hosts: the source's cursor came back: stopped", file=sys.stderr)
            return EXIT_REFUSED
        seen.add(nxt)
        cursor = nxt
    print(f"skyrelay hosts: more than {MAX_PAGES} pages: stopped", file=sys.stderr)
    return EXIT_REFUSED


def _one(client: AdminClient, hostname: str, accounts: int | None, source_status: str, bans: list[str]) -> str:
    """Ask this relay to follow one listed host; the summary key of what happened."""
    if not accounts:
        return "skipped_no_accounts"
    if source_status == "banned":
        return "skipped_banned_at_source"
    bare = hostname.rsplit(":", 1)[0].lower()
    if any(bare == d or bare.endswith("." + d) for d in bans):
        return "skipped_banned"
    try:
        client.call("POST", "/admin/pds/requestCrawl", body={"hostname": hostname})
    except Refused as exc:
        if exc.status == 0:
            raise
        return f"failed_{exc.error}"
    return "added"
