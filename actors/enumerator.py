"""Host enumeration: walk every added host's ``listRepos`` so its existing accounts are known and mirrored.

``HostEnumerator`` scans the host table on a timer (so a host added any way — admin crawl,
public requestCrawl, ``--crawl``, spidering, an import — is walked) and is also told
``EnumerateHost`` by the control plane for a prompt start. Each walk runs in its own greenlet,
at most ``concurrent_hosts`` at once, at most ``pages_per_second`` pages from one host, through
the outbound client (SSRF guard, deadlines, body cap). A page's new accounts and the cursor
after it are stored in one transaction (``store.enumeration``): a restart resumes there.

New active accounts are handed to the repo mirror (``RequestResync``), whose backfill fetches
``getRepo`` and verifies it whole, with its own bounds on fetches overall and per host; the
walk pauses while the mirror's backfill queue is longer than ``max_backfill_queue``.

Hostile hosts: a cursor seen before in the walk (a loop), more than ``max_pages`` pages, or
more accounts than the host's account limit stops the walk (``stopped``, not retried by
itself); a page that is not a listRepos answer stops it too; an unusable entry in a page is
skipped and counted. Network failures and HTTP errors are retried after ``retry_seconds``.
"""

from __future__ import annotations

import logging
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import gevent
import pykka
from prometheus_client import Counter

from actors.backoff import RetryPolicy, retry_db
from actors.crawl import CrawlRefused, normalize_hostname
from actors.messages_control import unknown_message
from actors.messages_discovery import EnumerateHost, HostEnumerated, ScanHosts
from actors.messages_mirror import RequestResync
from actors.mirror import queued_backfills
from actors.outbound import Limits, OutboundClient
from actors.outbound_errors import OutboundError
from actors.pages import BadPage, parse_list_repos
from store.enumeration import (
    ENUM_DONE,
    ENUM_RUNNING,
    ENUM_STOPPED,
    all_enumerations,
    finish_enumeration,
    known_dids,
    save_page,
    start_enumeration,
)
from store.hosts import HOST_ACTIVE, HOST_OFFLINE, banned_domains, ensure_host, get_host, list_hosts

log = logging.getLogger(__name__)
T = TypeVar("T")

PAGES = Counter("skyrelay_enumeration_pages_total", "listRepos pages walked")
ACCOUNTS = Counter("skyrelay_enumeration_accounts_total", "Accounts found by listRepos walks, by outcome", ["outcome"])
WALKS = Counter("skyrelay_enumeration_walks_total", "Finished listRepos walks, by result", ["result"])
SKIPPED = Counter("skyrelay_enumeration_entries_skipped_total", "Unusable listRepos entries skipped, by reason",
                  ["reason"])  # fmt: skip
SCANS = Counter("skyrelay_enumeration_scans_total", "Scans of the host table for hosts to walk")
PAGE_LIMITS = Limits(total_seconds=60.0, read_seconds=20.0, max_bytes=4 * 1024 * 1024)


@dataclass(frozen=True, slots=True)
class EnumeratorConfig:
    concurrent_hosts: int = 4
    pages_per_second: float = 2.0
    page_size: int = 1000
    max_pages: int = 100_000
    retry_seconds: float = 300.0
    scan_seconds: float = 10.0
    max_backfill_queue: int = 10_000
    default_account_limit: int = 100_000
    allow_insecure_hosts: bool = False

    @classmethod
    def from_settings(cls, s: Any) -> EnumeratorConfig:
        return cls(s.enumerate_concurrent_hosts, s.enumerate_pages_per_second, min(1000, s.enumerate_page_size),
                   s.enumerate_max_pages, s.enumerate_retry_seconds, s.enumerate_scan_seconds,
                   s.enumerate_max_backfill_queue, s.default_host_account_limit, s.allow_insecure_hosts)  # fmt: skip


class WalkStopped(Exception):
    """The host's listRepos cannot be walked further; ``reason`` is a metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class HostEnumerator(pykka.ThreadingActor):
    def __init__(
        self,
        db: Any,
        outbound: OutboundClient,
        mirror: Any,
        config: EnumeratorConfig,
        retry_policy: RetryPolicy | None = None,
    ) -> None:
        super().__init__()
        self.db = db
        self.retry_policy = retry_policy or RetryPolicy()
        self.outbound = outbound
        self.mirror = mirror  # a Forwarder to the repo mirror, or None when the mirror is off
        self.config = config
        self._active: set[str] = set()
        self._waiting: list[str] = []
        self._timer: gevent.Greenlet | None = None

    def on_start(self) -> None:
        self._timer = gevent.spawn(self._tick)

    def on_stop(self) -> None:
        if self._timer is not None:
            self._timer.kill(block=False)

    def _tick(self) -> None:
        while True:
            self.actor_ref.tell(ScanHosts())
            gevent.sleep(self.config.scan_seconds)

    def on_receive(self, message: Any) -> Any:
        match message:
            case EnumerateHost():
                self._queue(message.hostname)
            case ScanHosts():
                SCANS.inc()
                for hostname in self._due():
                    self._queue(hostname)
            case HostEnumerated():
                self._active.discard(message.hostname)
                self._pump()
            case _:
                unknown_message("host_enumerator", message)
        return None

    def _db(self, operation: str, fn: Callable[[], T]) -> T:
        return retry_db(self.db, fn, operation=operation, policy=self.retry_policy)

    def _due(self) -> list[str]:
        """Hosts followed (active or offline, not banned) whose walk is new, unfinished or due a retry."""
        now = time.time()
        hosts, progress, bans = self._db(
            "enumeration_scan",
            lambda: (list_hosts(self.db, limit=1_000_000), all_enumerations(self.db), banned_domains(self.db)),
        )
        due = []
        for host in hosts:
            if host.status not in (HOST_ACTIVE, HOST_OFFLINE) or _in_domains(host.hostname, bans):
                continue
            row = progress.get(host.id)
            if row is None or (
                row.state == ENUM_RUNNING and (row.error is None or now - row.updated_at >= self.config.retry_seconds)
            ):
                due.append(host.hostname)
        return due

    def _queue(self, hostname: str) -> None:
        if hostname not in self._active and hostname not in self._waiting:
            self._waiting.append(hostname)
        self._pump()

    def _pump(self) -> None:
        while self._waiting and len(self._active) < self.config.concurrent_hosts:
            hostname = self._waiting.pop(0)
            self._active.add(hostname)
            gevent.spawn(self._walk, hostname)

    # -- one host's walk (in its own greenlet) ------------------------------------------------
    def _walk(self, hostname: str) -> None:
        try:
            self._walk_host(hostname)
        except Exception:  # a bug: logged with its traceback; the host is tried again on a later scan
            log.exception("host enumeration failed host=%s", hostname)
        finally:
            try:
                self.actor_ref.tell(HostEnumerated(hostname))
            except pykka.ActorDeadError:
                pass

    def _walk_host(self, hostname: str) -> None:
        cfg = self.config
        try:
            base_url = normalize_hostname(hostname, insecure=cfg.allow_insecure_hosts).base_url
        except CrawlRefused:
            return

        def begin() -> tuple[Any, Any]:
            host = get_host(self.db, hostname) or ensure_host(
                self.db, hostname, account_limit=cfg.default_account_limit
            )
            if host.status not in (HOST_ACTIVE, HOST_OFFLINE):
                return host, None
            return host, start_enumeration(self.db, host.id)

        host, row = self._db("enumeration_start", begin)
        if row is None or row.state != ENUM_RUNNING:
            return
        limit = host.account_limit if host.account_limit is not None else cfg.default_account_limit
        cursor, pages, accounts = row.cursor, row.pages, row.accounts
        seen: set[str] = {cursor} if cursor else set()
        log.info("host enumeration started host=%s cursor=%s accounts=%d", hostname, cursor, accounts)
        result, error = ENUM_DONE, None
        try:
            while True:
                started = time.monotonic()
                if pages >= cfg.max_pages:
                    raise WalkStopped("too_many_pages", f"more than {cfg.max_pages} pages")
                entries, nxt, skipped = self._page(base_url, cursor)
                for reason in skipped:
                    SKIPPED.labels(reason).inc()
                if nxt is not None and nxt in seen:
                    raise WalkStopped("cursor_loop", f"cursor {nxt[:64]!r} came back")
                accounts += len(entries)
                if accounts > limit:
                    raise WalkStopped("over_account_limit", f"more than the host's account limit {limit}")
                self._store(host.id, entries, nxt)
                pages += 1
                PAGES.inc()
                if nxt is None or not entries:
                    break
                seen.add(nxt)
                cursor = nxt
                self._wait_for_mirror()
                gevent.sleep(max(0.0, 1.0 / cfg.pages_per_second - (time.monotonic() - started)))
        except WalkStopped as exc:
            result, error = ENUM_STOPPED, f"{exc.reason}: {exc}"
            WALKS.labels(exc.reason).inc()
        except BadPage as exc:
            result, error = ENUM_STOPPED, f"bad_page: {exc}"
            WALKS.labels("bad_page").inc()
        except OutboundError as exc:  # unreachable, timed out, HTTP error: tried again later
            result, error = ENUM_RUNNING, f"{type(exc).__name__}: {exc}"
            WALKS.labels("retry").inc()
        else:
            WALKS.labels("done").inc()
        self._db("enumeration_finish", lambda: finish_enumeration(self.db, host.id, result, error))
        log.info("host enumeration finished host=%s state=%s accounts=%d pages=%d error=%s",
                 hostname, result, accounts, pages, error)  # fmt: skip

    def _page(self, base_url: str, cursor: str | None) -> tuple[list[tuple[str, str]], str | None, list[str]]:
        query = {"limit": str(self.config.page_size)}
        if cursor:
            query["cursor"] = cursor
        url = f"{base_url}/xrpc/com.atproto.sync.listRepos?{urllib.parse.urlencode(query)}"
        body = self.outbound.get(url, PAGE_LIMITS, headers={"Accept": "application/json"}).body
        return parse_list_repos(body)

    def _store(self, host_id: int, entries: list[tuple[str, str]], cursor: str | None) -> None:
        dids = list(dict.fromkeys(did for did, _ in entries))

        def store() -> list[tuple[str, str]]:
            known = known_dids(self.db, dids)
            new = [(did, status) for did, status in dict(entries).items() if did not in known]
            save_page(self.db, host_id, new, cursor, found=len(entries))
            return new

        new = self._db("enumeration_page", store)
        ACCOUNTS.labels("known").inc(len(dids) - len(new))
        ACCOUNTS.labels("new").inc(len(new))
        if self.mirror is not None:
            for did, status in new:
                if status == "active":
                    self.mirror.tell(RequestResync(did, "enumerate"))

    def _wait_for_mirror(self) -> None:
        """Let the mirror's backfill queue drain below the bound before handing it more accounts."""
        while self.mirror is not None and queued_backfills() > self.config.max_backfill_queue:
            gevent.sleep(1.0)


def _in_domains(hostname: str, domains: list[str]) -> bool:
    host = hostname.rsplit(":", 1)[0]
    return any(host == d or host.endswith("." + d) for d in domains)
