"""Spidering: DIDs the relay meets lead it to PDS hosts it does not follow yet, which it then crawls.

Three ways in, none of which blocks or does per-event work for its caller:

- ``offer_durable(batch)``: the sequencer's hook, called with every durable batch. It only
  appends the batch to a bounded backlog (dropped and counted past ``scan_backlog_events``).
  The scanner greenlet joins the frames of waiting batches and finds every DID in them with
  one byte scan (``actors.spider_scan``: whole CBOR text strings ``did:plc:...``/``did:web:...``,
  in the event itself and in every block of its CAR, without decoding anything and without
  a Lexicon); DIDs it has seen recently (a bounded two-generation set) are skipped, new ones
  go to the bounded DID queue (``dropped_queue_full`` when full). The DID of each
  ``#identity`` event is also a *moved* hint (below).
- ``offer(did, car, blocks)``: the repo mirror's, with every fetched repo (scanned by the worker).
- ``offer_moved(did)``: a hint that a known account may have moved: its events were dropped as
  ``wrong_host`` (the sender is not its PDS any more), or it sent an ``#identity``. A second,
  lower-priority queue; each DID is re-resolved (fresh, not from the cache) at most once per
  ``recheck_moved_seconds``.

A worker greenlet takes DIDs off the queues (the DID queue first): a DID not known as an
account is resolved (at most ``lookups_per_second`` look-ups, moved hints included); a PDS
host that the relay does not know goes through the shared requestCrawl checks (bans, the
new-hosts-per-day limit, the probe through the outbound client) and is subscribed to. A
host refused once (banned, private, not https, unreachable, not a PDS) is remembered,
counted and logged once, and not probed again in this process: no retry loop.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

import gevent
import gevent.event
from prometheus_client import Counter

from actors.crawl import CrawlRefused, normalize_hostname
from actors.spider_scan import scan_dids
from protocol.car import read_car
from store.enumeration import known_dids
from store.hosts import get_host

log = logging.getLogger(__name__)

STEPS = Counter("skyrelay_spider_steps_total", "Spider steps, by outcome", ["outcome"])
MAX_DIDS_PER_OFFER = 256
_frame = attrgetter("frame")
_kind = attrgetter("kind")


@dataclass(frozen=True, slots=True)
class SpiderConfig:
    queue_size: int = 10_000
    lookups_per_second: float = 5.0
    remember_dids: int = 1_000_000
    remember_hosts: int = 100_000
    allow_insecure_hosts: bool = False
    recheck_moved_seconds: float = 60.0
    moved_queue_size: int = 1_000
    scan_backlog_events: int = 20_000


class _Lru:
    def __init__(self, size: int) -> None:
        self.size = size
        self.items: OrderedDict[str, None] = OrderedDict()

    def add(self, key: str) -> bool:
        """True when ``key`` is new (and remember it)."""
        if key in self.items:
            self.items.move_to_end(key)
            return False
        self.items[key] = None
        if len(self.items) > self.size:
            self.items.popitem(last=False)
        return True


class _Seen:
    """DIDs met recently, in two generations (set operations only, no per-DID bookkeeping)."""

    def __init__(self, size: int) -> None:
        self.half = max(1, size // 2)
        self.current: set[bytes] = set()
        self.previous: set[bytes] = set()

    def fresh(self, found: set[bytes]) -> set[bytes]:
        """Those of ``found`` not met recently; the others are kept in the current generation."""
        fresh = found.difference(self.current, self.previous)
        self.current |= found & self.previous
        return fresh

    def add(self, did: bytes) -> None:
        self.current.add(did)
        if len(self.current) >= self.half:
            self.previous, self.current = self.current, set()


class Spider:
    def __init__(self, db: Any, directory: Any, check: Callable[[str], None], subscribe: Callable[[str], None],
                 config: SpiderConfig) -> None:  # fmt: skip
        self.db = db
        self.directory = directory
        self.check = check  # the requestCrawl checks; raises CrawlRefused
        self.subscribe = subscribe
        self.config = config
        self._batches: deque[Sequence[Any]] = deque()  # durable batches waiting for the scanner
        self._backlog = 0  # events in _batches
        self._queue: deque[tuple[str, bytes | None, tuple[bytes, ...]]] = deque()  # did, a CAR, blocks
        self._moved: deque[str] = deque()
        self._moved_at: OrderedDict[str, float] = OrderedDict()  # did -> when last offered as moved
        self._seen = _Seen(config.remember_dids)
        self._dids = _Lru(config.remember_dids)  # DIDs the worker handled (known, resolved or not)
        self._hosts = _Lru(config.remember_hosts)  # hosts seen: followed, known or refused
        self._scan_wake = gevent.event.Event()
        self._work = gevent.event.Event()
        self._greenlets: list[gevent.Greenlet] = []
        self._next_lookup = 0.0

    def start(self) -> Spider:
        self._greenlets = [gevent.spawn(self._scan_loop), gevent.spawn(self._run)]
        return self

    def stop(self) -> None:
        for greenlet in self._greenlets:
            greenlet.kill(block=False)

    # -- offers (never block) --------------------------------------------------------------------
    def offer_durable(self, batch: Sequence[Any]) -> None:
        """The sequencer's hook: keep a reference to the batch for the scanner, or drop it when the backlog is full."""
        if self._backlog + len(batch) > self.config.scan_backlog_events:
            STEPS.labels("dropped_scan_backlog").inc(len(batch))
            return
        self._backlog += len(batch)
        self._batches.append(batch)
        self._scan_wake.set()

    def offer(self, did: str, car: bytes | None = None, blocks: tuple[bytes, ...] = ()) -> None:
        """Queued, or dropped and counted when the queue is full (``blocks``: a fetched repo's)."""
        if len(self._queue) >= self.config.queue_size:
            STEPS.labels("dropped_queue_full").inc()
            return
        self._queue.append((did, car, blocks))
        STEPS.labels("offered").inc()
        self._work.set()

    def offer_moved(self, did: str, reason: str = "wrong_host") -> None:
        """``did`` may have moved to another PDS: look again, at most once per ``recheck_moved_seconds``.

        ``reason``: ``wrong_host`` (an event dropped) or ``identity`` (an ``#identity`` sequenced).
        """
        STEPS.labels(f"moved_hint_{reason}").inc()
        now = time.monotonic()
        last = self._moved_at.get(did)
        if last is not None and now - last < self.config.recheck_moved_seconds:
            STEPS.labels("moved_recent").inc()
            return
        if len(self._moved) >= self.config.moved_queue_size:
            STEPS.labels("moved_dropped_queue_full").inc()
            return
        self._moved_at[did] = now
        self._moved_at.move_to_end(did)
        while len(self._moved_at) > self.config.remember_hosts:
            self._moved_at.popitem(last=False)
        self._moved.append(did)
        STEPS.labels("moved_offered").inc()
        self._work.set()

    # -- the scanner -------------------------------------------------------------------------------
    def _scan_loop(self) -> None:
        while True:
            self._scan_wake.wait()
            self._scan_wake.clear()
            try:
                self.scan_pending()
            except Exception:  # a bug: logged; the scanner goes on with the next batches
                log.exception("spider scan failed")

    def scan_pending(self) -> None:
        """Scan every waiting batch: new DIDs to the DID queue, ``#identity`` DIDs to the moved queue."""
        batches, self._batches, self._backlog = self._batches, deque(), 0
        if not batches:
            return
        for batch in batches:
            if "#identity" in map(_kind, batch):
                for item in batch:
                    if item.kind == "#identity" and item.account is not None:
                        self.offer_moved(item.account.did, "identity")
        fresh = self._seen.fresh(scan_dids(b"".join(b"".join(map(_frame, batch)) for batch in batches)))
        if not fresh:
            return
        queued = 0
        for did in itertools.islice(fresh, max(0, self.config.queue_size - len(self._queue))):
            self._seen.add(did)  # the others are not remembered: offered again when met again
            self._queue.append((did.decode(), None, ()))
            queued += 1
        if queued:
            STEPS.labels("offered").inc(queued)
            self._work.set()
        if queued < len(fresh):
            STEPS.labels("dropped_queue_full").inc(len(fresh) - queued)

    # -- the worker --------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            if not self._queue and not self._moved:
                self._work.clear()
                self._work.wait()
            try:
                if self._queue:
                    self._handle_queued()
                elif self._moved:
                    self.recheck_moved(self._moved.popleft())
            except Exception:  # a bug: logged; the spider goes on with the next offer
                log.exception("spider step failed")
            gevent.sleep(0)  # let ingest run between steps

    def _handle_queued(self) -> None:
        """Up to ``MAX_DIDS_PER_OFFER`` plain DIDs at once (one SQL look-up), or one offer with blocks."""
        did, car, blocks = self._queue.popleft()
        if car or blocks:
            self.handle(did, car, blocks)
            return
        dids = [did]
        while self._queue and len(dids) < MAX_DIDS_PER_OFFER and not (self._queue[0][1] or self._queue[0][2]):
            dids.append(self._queue.popleft()[0])
        self._handle_dids(dids)

    def handle(self, did: str, car: bytes | None, blocks: tuple[bytes, ...] = ()) -> None:
        self._handle_dids([did, *self._dids_of(car, blocks)])

    def _handle_dids(self, dids: list[str]) -> None:
        fresh = [d for d in dict.fromkeys(dids) if self._dids.add(d)][:MAX_DIDS_PER_OFFER]
        if not fresh:
            return
        with self.db.connection_context():
            known = known_dids(self.db, fresh)
        STEPS.labels("did_known").inc(len(known))
        for candidate in fresh:
            if candidate not in known:
                self._follow_did(candidate)

    def _dids_of(self, car: bytes | None, blocks: tuple[bytes, ...]) -> list[str]:
        if car:
            try:
                blocks = (*blocks, *read_car(car).blocks.values())
            except Exception:  # verified upstream already; a CAR we cannot read gives no DIDs
                STEPS.labels("car_unreadable").inc()
        return [did.decode() for did in scan_dids(b"".join(blocks))]

    def _wait_for_lookup(self) -> None:
        wait = self._next_lookup - time.monotonic()
        if wait > 0:
            gevent.sleep(wait)
        self._next_lookup = time.monotonic() + 1.0 / self.config.lookups_per_second

    def _follow_did(self, did: str) -> None:
        self._resolve_and_follow(did, moved=False)

    def recheck_moved(self, did: str) -> None:
        """A moved hint: fetch ``did``'s document again; a PDS we do not follow is crawled as usual."""
        self._resolve_and_follow(did, moved=True)

    def _resolve_and_follow(self, did: str, *, moved: bool) -> None:
        """Resolve ``did`` (a fresh fetch for a moved hint) and follow the PDS its document names."""
        kind = "moved" if moved else "did"
        self._wait_for_lookup()
        STEPS.labels(f"{kind}_resolved").inc()
        try:
            ident = self.directory.refresh(did) if moved else self.directory.resolve(did)
        except Exception as exc:  # no identity (huge, redirected, unreachable...): counted and logged once per
            # DID (remembered: tried again only once forgotten by the LRU; a moved hint once per recheck window)
            STEPS.labels(f"{kind}_unresolved").inc()
            log.info("spider %sdid unresolved did=%s error=%s", "moved " if moved else "", did, type(exc).__name__)
            return
        if not ident.pds_endpoint:
            STEPS.labels("moved_no_pds_endpoint" if moved else "no_pds_endpoint").inc()
            return
        self._follow_endpoint(did, ident.pds_endpoint, " via=moved" if moved else "")

    def _follow_endpoint(self, did: str, endpoint: str, via: str) -> None:
        try:
            hostname = normalize_hostname(endpoint, insecure=self.config.allow_insecure_hosts).hostname
        except CrawlRefused as exc:
            if self._hosts.add(endpoint):
                STEPS.labels("host_refused").inc()
                log.info("spider host refused endpoint=%.200s did=%s error=InvalidRequest reason=%s%s",
                         endpoint, did, exc.message, via)  # fmt: skip
            return
        if not self._hosts.add(hostname):
            STEPS.labels("host_seen").inc()
            return
        with self.db.connection_context():
            if get_host(self.db, hostname) is not None:
                STEPS.labels("host_known").inc()
                return
        try:
            self.check(hostname)
        except CrawlRefused as exc:
            STEPS.labels("host_refused").inc()
            log.info("spider host refused host=%s did=%s error=%s%s", hostname, did, exc.error, via)
            return
        self.subscribe(hostname)
        STEPS.labels("host_subscribed").inc()
        log.info("spider discovered host host=%s did=%s%s", hostname, did, via)
