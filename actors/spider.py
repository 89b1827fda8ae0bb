"""Spidering: DIDs the relay meets lead it to PDS hosts it does not follow yet, which it then crawls.

``offer_durable(batch)`` is called by the sequencer with every durable batch (``#commit``,
``#sync``, ``#identity``, ``#account``: each counts as meeting its DID; a commit's blocks are
walked too), whether or not the repo mirror runs; ``offer(did, None, blocks)`` by the repo
mirror with every fetched repo. Neither blocks: an offer goes to a bounded queue, or is
dropped and counted when the queue is full; frames are decoded by the worker, not the caller.
A worker greenlet takes offers one at a time, off the verification path: it reads every
block of ``car`` as DAG-CBOR and walks the decoded values (no Lexicon) for strings of the
form ``did:plc:...`` or ``did:web:...``; each DID not seen recently and not a known account is resolved (at most
``lookups_per_second``); a PDS host that the relay does not know goes through the shared requestCrawl checks (bans, the
new-hosts-per-day limit, the probe through the outbound client) and is subscribed to.

A host refused once (banned, private, not https, unreachable, not a PDS) is remembered,
counted and logged once, and not probed again in this process: no retry loop.
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import gevent
import gevent.queue
import libipld
from prometheus_client import Counter

from actors.crawl import CrawlRefused, normalize_hostname
from protocol.car import read_car
from store.enumeration import known_dids
from store.hosts import get_host

log = logging.getLogger(__name__)

STEPS = Counter("skyrelay_spider_steps_total", "Spider steps, by outcome", ["outcome"])
_DID = re.compile(r"^did:(plc:[a-z2-7]{24}|web:[a-zA-Z0-9._%:-]{1,253})$")
MAX_WALK_DEPTH = 32
MAX_DIDS_PER_OFFER = 256
_Offer = tuple[str, bytes | None, tuple[bytes, ...]]  # did (or a durable frame's kind), a CAR or frame, blocks
_FRAME_KINDS = frozenset({"#commit", "#sync", "#identity", "#account"})


@dataclass(frozen=True, slots=True)
class SpiderConfig:
    queue_size: int = 10_000
    lookups_per_second: float = 5.0
    remember_dids: int = 1_000_000
    remember_hosts: int = 100_000
    allow_insecure_hosts: bool = False


def dids_in(value: Any, depth: int = 0) -> Iterator[str]:
    """Every string of the form ``did:plc:...``/``did:web:...`` anywhere in a decoded DAG-CBOR value."""
    if depth > MAX_WALK_DEPTH:
        return
    if isinstance(value, str):
        if value.startswith("did:") and _DID.match(value):
            yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from dids_in(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            yield from dids_in(item, depth + 1)


def frame_did_and_car(frame: bytes) -> tuple[str, bytes | None]:
    """The DID a durable frame is about and its CAR (commits and syncs), or ``("", None)``."""
    try:
        body = libipld.decode_dag_cbor_multi(frame)[1]
    except Exception:  # our own re-encoded frame; unreadable means a bug elsewhere, not an input
        STEPS.labels("frame_unreadable").inc()
        return "", None
    did = body.get("repo") or body.get("did") if isinstance(body, dict) else None
    if not isinstance(did, str) or not _DID.match(did):
        return "", None
    car = body.get("blocks")
    return did, car if isinstance(car, bytes) else None


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


class Spider:
    def __init__(self, db: Any, directory: Any, check: Callable[[str], None], subscribe: Callable[[str], None],
                 config: SpiderConfig) -> None:  # fmt: skip
        self.db = db
        self.directory = directory
        self.check = check  # the requestCrawl checks; raises CrawlRefused
        self.subscribe = subscribe
        self.config = config
        self._queue: gevent.queue.Queue[_Offer] = gevent.queue.Queue(config.queue_size)
        self._dids = _Lru(config.remember_dids)
        self._hosts = _Lru(config.remember_hosts)  # hosts seen: followed, known or refused
        self._worker: gevent.Greenlet | None = None
        self._next_lookup = 0.0

    def start(self) -> Spider:
        self._worker = gevent.spawn(self._run)
        return self

    def stop(self) -> None:
        if self._worker is not None:
            self._worker.kill(block=False)

    def offer(self, did: str, car: bytes | None = None, blocks: tuple[bytes, ...] = ()) -> None:
        """Never blocks: queued, or dropped and counted when the queue is full (``blocks``: a fetched repo's)."""
        try:
            self._queue.put_nowait((did, car, blocks))
            STEPS.labels("offered").inc()
        except gevent.queue.Full:
            STEPS.labels("dropped_queue_full").inc()

    def offer_durable(self, batch: Sequence[Any]) -> None:
        """Never blocks: each durable event (``PersistEvent``) of ``batch`` queued as its frame, or dropped."""
        for item in batch:
            if item.kind in _FRAME_KINDS:
                self.offer(item.kind, item.frame)

    def _run(self) -> None:
        while True:
            did, car, blocks = self._queue.get()
            try:
                if did in _FRAME_KINDS:  # a durable event's frame, decoded here, off the sequencer
                    did, car = frame_did_and_car(car or b"")
                    if not did:
                        continue
                self.handle(did, car, blocks)
            except Exception:  # a bug: logged; the spider goes on with the next offer
                log.exception("spider step failed did=%s", did)
            gevent.sleep(0)  # let ingest run between offers

    def handle(self, did: str, car: bytes | None, blocks: tuple[bytes, ...] = ()) -> None:
        found = dict.fromkeys([did, *self._dids_of(car, blocks)])
        fresh = [d for d in found if self._dids.add(d)][:MAX_DIDS_PER_OFFER]
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
        out: list[str] = []
        for block in blocks:
            try:
                value = libipld.decode_dag_cbor(block)
            except Exception:
                continue
            out.extend(dids_in(value))
        return out

    def _follow_did(self, did: str) -> None:
        wait = self._next_lookup - time.monotonic()
        if wait > 0:
            gevent.sleep(wait)
        self._next_lookup = time.monotonic() + 1.0 / self.config.lookups_per_second
        STEPS.labels("did_resolved").inc()
        try:
            endpoint = self.directory.resolve(did).pds_endpoint
        except Exception as exc:  # no identity (huge, redirected, unreachable...): counted and logged once per DID
            STEPS.labels("did_unresolved").inc()  # (remembered: tried again only once forgotten by the LRU)
            log.info("spider did unresolved did=%s error=%s", did, type(exc).__name__)
            return
        if not endpoint:
            STEPS.labels("no_pds_endpoint").inc()
            return
        try:
            hostname = normalize_hostname(endpoint, insecure=self.config.allow_insecure_hosts).hostname
        except CrawlRefused as exc:
            if self._hosts.add(endpoint):
                STEPS.labels("host_refused").inc()
                log.info("spider host refused endpoint=%.200s did=%s error=InvalidRequest reason=%s",
                         endpoint, did, exc.message)  # fmt: skip
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
            log.info("spider host refused host=%s did=%s error=%s", hostname, did, exc.error)
            return
        self.subscribe(hostname)
        STEPS.labels("host_subscribed").inc()
        log.info("spider discovered host host=%s did=%s", hostname, did)
