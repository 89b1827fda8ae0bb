"""``skyrelay admin ...``: operate a running relay through its admin API over HTTP.

Tables for people by default, ``--json`` for scripts. A refused request exits 1 with the
server's error name and message; an unusable invocation (no password) exits 2. The relay's URL
and password come from ``--url``/``--password`` or the environment (``config.admin_client``).
Only the standard library is used, so the command starts fast and needs no gevent.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

EXIT_REFUSED = 1
EXIT_USAGE = 2


class AdminClient:
    def __init__(self, url: str, password: str, timeout: float) -> None:
        self.url = url
        self.password = password
        self.timeout = timeout

    def open(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, Any] | None = None,
        data: bytes | None = None,
        content_type: str | None = None,
    ) -> Any:
        """The raw answer (read or stream it, then close it); ``Refused`` with the server's error on a 4xx/5xx."""
        url = self.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        if data is None and method == "POST":
            data = b""
        headers = {"Authorization": f"Bearer {self.password}", "Accept": "application/json"}
        if content_type is not None:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            raise Refused(exc.code, *_error_of(exc)) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise Refused(0, "Unreachable", f"cannot reach the relay at {self.url}: {reason}") from None

    def call(self, method: str, path: str, *, query: dict[str, Any] | None = None, body: Any = None) -> Any:
        """A JSON request (``body`` as JSON when given) and its decoded JSON answer."""
        data = json.dumps(body).encode() if body is not None else None
        content_type = "application/json" if body is not None else None
        with self.open(method, path, query=query, data=data, content_type=content_type) as resp:
            return json.loads(resp.read() or b"null")


class Refused(Exception):
    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error, self.message = status, error, message


def _error_of(exc: urllib.error.HTTPError) -> tuple[str, str]:
    try:
        body = json.loads(exc.read())
        return str(body.get("error", f"HTTP {exc.code}")), str(body.get("message", ""))
    except (ValueError, AttributeError):
        return f"HTTP {exc.code}", str(exc.reason)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Left-aligned columns ``(key, title)``; numbers right-aligned with thousands separators."""
    if not rows:
        return "(none)"

    def cell(value: Any) -> str:
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, int):
            return f"{value:,}"
        if isinstance(value, float):
            return f"{value:,.1f}"
        return "-" if value is None else str(value)

    cells = [[cell(row.get(key)) for key, _ in columns] for row in rows]
    numeric = [all(isinstance(row.get(key), int | float) and not isinstance(row.get(key), bool) for row in rows)
               for key, _ in columns]  # fmt: skip
    widths = [max(len(title), *(len(c[i]) for c in cells)) for i, (_, title) in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    return "\n".join([line([t for _, t in columns]), line(["-" * w for w in widths]), *(line(c) for c in cells)])


HOST_COLUMNS = [("Host", "HOST"), ("Status", "STATUS"), ("HasActiveConnection", "CONNECTED"), ("Cursor", "CURSOR"),
                ("RepoCount", "ACCOUNTS"), ("RepoLimit", "ACCOUNT LIMIT"), ("EventsPerSecond", "EVENTS/S"),
                ("EnumeratedAccounts", "LISTED"), ("EnumerationState", "LISTING"),
                ("LastError", "LAST ERROR")]  # fmt: skip


def _hosts(result: Any) -> str:
    rows = [{**r, "EventsPerSecond": r["PerSecondEventRate"]["Max"]} for r in result]
    return table(rows, HOST_COLUMNS)


def _tree(node: dict[str, Any], depth: int = 0) -> list[str]:
    extra = f" restarts={node['restarts']}" if node.get("restarts") else ""
    error = f" last_error={node['last_error']}" if node.get("last_error") else ""
    lines = [f"{'  ' * depth}{node['name']} ({node['kind']}) {node['state']}{extra}{error}"]
    for child in node.get("children", []):
        lines.extend(_tree(child, depth + 1))
    return lines


def _ok(summary: str) -> Callable[[Any], str]:
    return lambda result: summary.format(**result) if isinstance(result, dict) else summary


# command -> (method, path, how to build query/body from args, how to show the result)
Builder = Callable[[argparse.Namespace], dict[str, Any]]
COMMANDS: dict[tuple[str, str], tuple[str, str, Builder, Callable[[Any], str]]] = {
    ("hosts", "list"): ("GET", "/admin/pds/list", lambda a: {}, _hosts),
    ("hosts", "add"): ("POST", "/admin/pds/requestCrawl", lambda a: {"body": {"hostname": a.target}},
                       _ok("subscribed to {hostname}")),
    ("hosts", "block"): ("POST", "/admin/pds/block", lambda a: {"query": {"host": a.target}}, _ok("blocked")),
    ("hosts", "unblock"): ("POST", "/admin/pds/unblock", lambda a: {"query": {"host": a.target}}, _ok("unblocked")),
    ("hosts", "kill"): ("POST", "/admin/subs/killUpstream",
                        lambda a: {"query": {"host": a.target, "block": str(bool(a.block)).lower()}},
                        _ok("connection killed")),
    ("hosts", "limits"): ("POST", "/admin/pds/changeLimits", lambda a: {"body": {
        "host": a.target, **({"repo_limit": a.repo_limit} if a.repo_limit is not None else {}),
        **({"per_second": a.per_second} if a.per_second is not None else {}),
        **({"per_hour": a.per_hour} if a.per_hour is not None else {}),
        **({"per_day": a.per_day} if a.per_day is not None else {})}},
        _ok("{host}: account limit {repo_limit}, {per_second} events/s, {per_hour} per hour, {per_day} per day,"
            " {released} throttled released")),
    ("hosts", "resync"): ("POST", "/admin/pds/resync", lambda a: {"query": {"host": a.target}},
                          _ok("{queued} accounts queued for re-sync")),
    ("domains", "list"): ("GET", "/admin/subs/listDomainBans", lambda a: {},
                          lambda r: "\n".join(r["banned_domains"]) or "(none)"),
    ("domains", "ban"): ("POST", "/admin/subs/banDomain", lambda a: {"body": {"domain": a.target}},
                         lambda r: f"banned; hosts disconnected: {', '.join(r['hosts_disconnected']) or 'none'}"),
    ("domains", "unban"): ("POST", "/admin/subs/unbanDomain", lambda a: {"body": {"domain": a.target}},
                           _ok("unbanned")),
    ("accounts", "list"): ("GET", "/admin/repo/takedowns", lambda a: {"query": {"cursor": a.cursor}},
                           lambda r: "\n".join(r["dids"]) or "(none)"),
    ("accounts", "takedown"): ("POST", "/admin/repo/takeDown", lambda a: {"body": {"did": a.target}},
                               _ok("taken down; announced at seq {seq}")),
    ("accounts", "reverse"): ("POST", "/admin/repo/reverseTakedown", lambda a: {"body": {"did": a.target}},
                              _ok("takedown reversed; announced at seq {seq}")),
    ("consumers", "list"): ("GET", "/admin/consumers/list", lambda a: {}, lambda r: table(r, [
        ("id", "ID"), ("remote_addr", "ADDRESS"), ("events_consumed", "EVENTS SENT"),
        ("connected_at", "CONNECTED SINCE"), ("cut_reason", "CUT")])),
    ("actors", "list"): ("GET", "/admin/tree", lambda a: {}, lambda r: "\n".join(_tree(r))),
    ("actors", "restart"): ("POST", "/admin/actors/restart", lambda a: {"body": {"name": a.target}},
                            _ok("{name} restarting")),
    ("repo", "resync"): ("POST", "/admin/repo/resync", lambda a: {"body": {"did": a.target}}, _ok("re-sync queued")),
    ("repo", "compact"): ("POST", "/admin/repo/compact", lambda a: {"body": {"did": a.target}},
                          lambda r: " ".join(f"{k}={v}" for k, v in r["stats"].items())),
    ("repo", "reset"): ("POST", "/admin/repo/reset", lambda a: {"body": {"did": a.target}},
                        _ok("mirror copy deleted; re-fetch queued")),
    ("repo", "verify"): ("POST", "/admin/repo/verify", lambda a: {"body": {"did": a.target}},
                         lambda r: f"ok: rev {r['rev']}, {r['records']:,} records" if r["success"] == "true"
                         else f"INVALID: {r['error']}: {r['message']}"),
    ("crawl", "status"): ("GET", "/admin/subs/getEnabled", lambda a: {},
                          lambda r: "public requestCrawl " + ("enabled" if r["enabled"] else "disabled")),
    ("crawl", "enable"): ("POST", "/admin/subs/setEnabled", lambda a: {"query": {"enabled": "true"}}, _ok("enabled")),
    ("crawl", "disable"): ("POST", "/admin/subs/setEnabled", lambda a: {"query": {"enabled": "false"}},
                           _ok("disabled")),
    ("crawl", "per-day"): ("POST", "/admin/subs/setPerDayLimit", lambda a: {"query": {"limit": a.target}},
                           _ok("new hosts per day set")),
}  # fmt: skip
TARGETS = {"hosts": "HOST", "domains": "DOMAIN", "accounts": "DID", "actors": "NAME", "repo": "DID", "crawl": "N"}


def add_admin_parser(sub: Any) -> None:
    admin = sub.add_parser("admin", help="operate a running relay through its admin API")
    admin.add_argument("--url", help="the relay's base URL (env SKYRELAY_ADMIN_URL; default http://127.0.0.1:2470)")
    admin.add_argument("--password", help="an admin password (env SKYRELAY_ADMIN_PASSWORD)")
    admin.add_argument("--json", action="store_true", help="print the server's JSON answer")
    admin.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for an answer")
    groups = admin.add_subparsers(dest="group", metavar="GROUP", required=True)
    by_group: dict[str, list[str]] = {}
    for group, action in COMMANDS:
        by_group.setdefault(group, []).append(action)
    for group, actions in by_group.items():
        g = groups.add_parser(group, help=f"{group}: {', '.join(actions)}")
        acts = g.add_subparsers(dest="action", metavar="ACTION", required=True)
        for action in actions:
            a = acts.add_parser(action)
            a.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the JSON answer")
            if action not in ("list", "status", "enable", "disable"):
                a.add_argument("target", metavar=TARGETS[group])
            if (group, action) == ("hosts", "kill"):
                a.add_argument("--block", action="store_true", help="also block the host")
            if (group, action) == ("hosts", "limits"):
                a.add_argument("--repo-limit", type=int, help="most accounts the host may have")
                a.add_argument("--per-second", type=float, help="events per second read from the host")
                a.add_argument("--per-hour", type=int, help="events per hour read from the host (its own)")
                a.add_argument("--per-day", type=int, help="events per day read from the host (its own)")
            if (group, action) == ("accounts", "list"):
                a.add_argument("--cursor", type=int, default=0)


def run_admin(args: argparse.Namespace) -> int:
    from config.admin_client import admin_client_config

    config = admin_client_config(args.url, args.password)
    if not config.password:
        print("skyrelay admin: no admin password: pass --password or set SKYRELAY_ADMIN_PASSWORD", file=sys.stderr)
        return EXIT_USAGE
    method, path, build, show = COMMANDS[(args.group, args.action)]
    client = AdminClient(config.url, config.password.reveal(), args.timeout)
    try:
        result = client.call(method, path, **build(args))
    except Refused as exc:
        print(f"skyrelay admin: {exc.error}: {exc.message}", file=sys.stderr)
        return EXIT_REFUSED
    print(json.dumps(result, indent=2) if args.json else show(result))
    return 0
