"""Identity resolution for verification: a DID's signing key and PDS from memory, SQL or the network.

``IdentityDirectory`` is a plain object that verification greenlets call inline. A look-up
tries, in order: a bounded in-memory LRU, the ``identity`` table, then a fetch of the DID
document (``GET {plc_url}/{did}`` for did:plc, ``https://{host}/.well-known/did.json`` for
did:web). Non-obvious rules:

- Table reads of many greenlets' misses are batched into one query (``actors.batch_lookup``).
- Fresh for ``ttl_seconds``. An older entry is still served, and a background re-fetch is
  started (at most one per DID per ``failure_retry_seconds``); if the directory is down the
  old entry keeps being served, counted as ``result="stale"``.
- Concurrent look-ups of one DID share one fetch (a map of in-flight futures).
- A DID with nothing to serve whose fetch failed is remembered for ``failure_retry_seconds``
  and fails fast meanwhile, so a stream of events for an unresolvable DID costs one fetch.
- A 404/410 or an invalid document evicts the DID (memory and table): the authority has
  answered and its answer is not a usable identity. Timeouts, 5xx and refused connections
  never evict.
- ``refresh`` forces a fetch at most once per DID per ``refresh_min_interval_seconds``; within
  that window it answers like ``resolve``, so a forger cannot make us storm the directory.
- Fetched identities are written behind, in batches, by ``flush`` (the ``IdentityResolver``
  actor calls it every few seconds), so a restart starts from the table, not from the PLC.

Synchronisation uses ``threading`` primitives: plain threads in tests, greenlets once gevent
has monkey-patched the process. No lock is held across I/O. HTTP goes through the outbound
client (``actors.outbound``): did:web hosts under its address policy, the configured PLC
directory trusted as operator configuration; no proxy, no redirect; the whole fetch must end
within ``fetch_timeout_seconds`` and the body fit in ``max_doc_bytes``. Without
``allow_insecure_hosts`` a PDS endpoint that is not ``https://`` is dropped from the identity
(counted): the account then has no PDS, so its events fail the host check.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, NamedTuple

import peewee
import pykka
from playhouse.pool import MaxConnectionsExceeded

from actors.batch_lookup import BatchLookup
from actors.messages_identity import FlushIdentities, RefreshIdentity
from actors.metrics_identity import (
    FETCH_SECONDS,
    FETCH_SHARED_TOTAL,
    FETCH_TOTAL,
    INSECURE_ENDPOINTS_TOTAL,
    REFRESH_LIMITED_TOTAL,
    RESOLVE_RESULTS,
    RESOLVE_TOTAL,
    WRITES_DROPPED_TOTAL,
)
from actors.outbound import Limits, OutboundClient
from actors.outbound_errors import BadStatus, OutboundError
from protocol.diddoc import Identity, decode_did_document, did_document_url
from protocol.identity_errors import DidDocumentInvalid, IdentityError, IdentityNotFound, IdentityUnavailable
from protocol.syntax import Did, Handle
from store.identities import IdentityRow, delete_identities, load_identities, save_identities

log = logging.getLogger(__name__)

Fetcher = Callable[[str], bytes]
Spawner = Callable[[Callable[[], None]], object]

USER_AGENT = "skyrelay (identity resolver)"
_ACCEPT = "application/did+ld+json, application/json"
_MAX_REMEMBERED_FAILURES = 100_000
_UNAVAILABLE_LOG_INTERVAL_SECONDS = 30.0
_RESOLVED = {result: RESOLVE_TOTAL.labels(result) for result in RESOLVE_RESULTS}


def http_fetch(client: OutboundClient, url: str, *, timeout_seconds: float = 5.0, max_bytes: int = 64 * 1024) -> bytes:
    """The body of a 200 answer to ``GET url`` through the outbound client (no redirect followed).

    The connection is kept alive for the next fetch from the same host (the PLC directory
    answers one small document per request: a TLS handshake each would cost more than it).

    ``IdentityNotFound`` on 404/410; ``IdentityUnavailable`` on any other status, a refused
    address, a network error, a body over ``max_bytes`` or one still arriving after
    ``timeout_seconds``.
    """
    limits = Limits(total_seconds=timeout_seconds, read_seconds=timeout_seconds, max_bytes=max_bytes)
    try:
        headers = {"Accept": _ACCEPT, "User-Agent": USER_AGENT}
        return client.request("GET", url, limits, headers=headers, keep_alive=True).body
    except BadStatus as exc:
        if exc.status in (404, 410):
            raise IdentityNotFound(f"{url} answered {exc.status}") from None
        raise IdentityUnavailable(f"{url} answered {exc.status}") from None
    except OutboundError as exc:
        raise IdentityUnavailable(f"fetching {url} failed: {exc.kind}: {exc}") from None


def _spawn_thread(target: Callable[[], None]) -> object:
    thread = threading.Thread(target=target, name="identity-fetch", daemon=True)
    thread.start()
    return thread


class _Entry(NamedTuple):
    identity: Identity
    fetched_at: float  # unix seconds; -inf once a refresh was asked for and could not start


class IdentityDirectory:
    """DID -> ``Identity`` with an LRU cache, a write-behind table and shared fetches."""

    def __init__(
        self,
        db: peewee.Database | None,
        *,
        plc_url: str = "https://plc.directory",
        allow_insecure_hosts: bool = False,
        ttl_seconds: float = 24 * 3600.0,
        max_entries: int = 200_000,  # ~570 bytes each (scripts/bench_account_lookup.py)
        refresh_min_interval_seconds: float = 10.0,
        failure_retry_seconds: float = 60.0,
        fetch_timeout_seconds: float = 5.0,
        max_doc_bytes: int = 64 * 1024,
        max_background_fetches: int = 16,
        max_pending_writes: int = 100_000,
        fetch: Fetcher | None = None,
        outbound: OutboundClient | None = None,
        clock: Callable[[], float] = time.time,
        spawn: Spawner = _spawn_thread,
    ) -> None:
        self._db = db
        self._lookup = BatchLookup(db, load_identities) if db is not None else None
        self._plc_url = plc_url.rstrip("/")
        self._allow_insecure = allow_insecure_hosts
        self._ttl = ttl_seconds
        self._max_entries = max_entries
        self._refresh_min_interval = refresh_min_interval_seconds
        self._failure_retry = failure_retry_seconds
        self._wait_timeout = 3 * fetch_timeout_seconds + 1.0
        self._max_pending = max_pending_writes
        client = outbound or OutboundClient.for_settings(allow_insecure_hosts)
        plc_client = client.trusting(self._plc_url)  # operator configuration, not upstream input
        self._fetch: Fetcher = fetch or (
            lambda url: http_fetch(
                plc_client if url.startswith(self._plc_url + "/") else client,
                url,
                timeout_seconds=fetch_timeout_seconds,
                max_bytes=max_doc_bytes,
            )
        )
        self._clock = clock
        self._spawn = spawn
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._background_slots = threading.BoundedSemaphore(max_background_fetches)
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._inflight: dict[str, Future[Identity]] = {}
        self._attempts: OrderedDict[str, float] = OrderedDict()  # last fetch start, oldest first
        self._failures: OrderedDict[str, tuple[float, IdentityError]] = OrderedDict()
        self._pending: dict[str, IdentityRow | None] = {}  # None: delete the stored row
        self._flushing: dict[str, IdentityRow | None] = {}
        self._unavailable_unlogged = 0
        self._unavailable_logged_at = float("-inf")

    # -- public surface ------------------------------------------------------------------------
    def resolve(self, did: str) -> Identity:
        """The identity of ``did``; raises an ``IdentityError`` (``IdentityUnavailable`` when none)."""
        now = self._clock()
        with self._lock:
            entry = self._cache.get(did)
            if entry is not None:
                self._cache.move_to_end(did)
        if entry is None:
            return self._resolve_uncached(did, now)
        return self._serve(did, entry, now, "hit")

    def refresh(self, did: str) -> Identity:
        """Fetch ``did`` again now unless it was fetched within the rate-limit window.

        When the directory cannot be reached, the known (stale) identity is returned; a
        404/410 or invalid document raises and evicts the DID.
        """
        now = self._clock()
        with self._lock:
            future = self._inflight.get(did)
            leader = future is None and not self._recently_attempted(did, now, self._refresh_min_interval)
            if leader:
                future = self._claim(did, now)
        if future is None:
            REFRESH_LIMITED_TOTAL.inc()
            return self.resolve(did)
        try:
            identity = self._run_fetch(did, future) if leader else self._join(did, future)
        except (IdentityNotFound, DidDocumentInvalid):
            _RESOLVED["error"].inc()
            raise
        except IdentityUnavailable:
            fallback = self._known_entry(did)
            if fallback is None:
                _RESOLVED["error"].inc()
                raise
            _RESOLVED["stale"].inc()
            return fallback.identity
        except IdentityError:
            _RESOLVED["error"].inc()
            raise
        _RESOLVED["fetched"].inc()
        return identity

    def request_refresh(self, did: str) -> None:
        """Start a background re-fetch of ``did`` (rate-limited like ``refresh``); never blocks.

        When no fetch can start now, a cached entry is marked expired so the next look-up
        starts one.
        """
        now = self._clock()
        if self._start_background_fetch(did, now, self._refresh_min_interval):
            return
        with self._lock:
            entry = self._cache.get(did)
            if did not in self._inflight and entry is not None:
                self._cache[did] = entry._replace(fetched_at=float("-inf"))

    def invalidate(self, did: str) -> None:
        """Forget ``did`` in memory and (at the next flush) in the table; the next look-up fetches."""
        with self._lock:
            self._cache.pop(did, None)
            self._failures.pop(did, None)
            self._queue_write(did, None)

    def peek(self, did: str) -> Identity | None:
        """The in-memory identity of ``did``, fresh or not, without any I/O or side effect."""
        with self._lock:
            entry = self._cache.get(did)
        return entry.identity if entry is not None else None

    def __len__(self) -> int:
        return len(self._cache)

    @property
    def pending_writes(self) -> int:
        return len(self._pending)

    def flush(self) -> int:
        """Write queued identities (and deletions) to the table; return how many DIDs.

        On a database error the batch is queued again (newer entries win) and the error raised.
        """
        if self._db is None:
            return 0
        with self._flush_lock:
            with self._lock:
                if not self._pending:
                    return 0
                batch, self._pending = self._pending, {}
                self._flushing = batch
            try:
                save_identities(self._db, (row for row in batch.values() if row is not None))
                delete_identities(self._db, (did for did, row in batch.items() if row is None))
            except BaseException:
                with self._lock:
                    for did, row in batch.items():
                        if did not in self._pending:
                            self._queue_write(did, row)
                raise
            finally:
                with self._lock:
                    self._flushing = {}
            return len(batch)

    # -- look-up steps -------------------------------------------------------------------------
    def _serve(self, did: str, entry: _Entry, now: float, fresh_result: str) -> Identity:
        if now - entry.fetched_at < self._ttl:
            _RESOLVED[fresh_result].inc()
        else:
            asked = entry.fetched_at == float("-inf")  # a refresh was requested and could not start
            self._start_background_fetch(did, now, self._refresh_min_interval if asked else self._failure_retry)
            _RESOLVED["stale"].inc()
        return entry.identity

    def _resolve_uncached(self, did: str, now: float) -> Identity:
        entry = self._load_persisted(did)
        if entry is not None:
            return self._serve(did, entry, now, "sql")
        failure = self._recent_failure(did, now)
        if failure is not None:
            _RESOLVED["error"].inc()
            raise type(failure)(str(failure), reason=failure.reason)
        with self._lock:
            cached = self._cache.get(did)  # a concurrent fetch may have landed meanwhile
            future = self._inflight.get(did)
            leader = cached is None and future is None
            if leader:
                future = self._claim(did, now)
        if cached is not None:
            return self._serve(did, cached, now, "hit")
        assert future is not None
        try:
            identity = self._run_fetch(did, future) if leader else self._join(did, future)
        except IdentityError:
            _RESOLVED["error"].inc()
            raise
        _RESOLVED["fetched"].inc()
        return identity

    def _known_entry(self, did: str) -> _Entry | None:
        with self._lock:
            entry = self._cache.get(did)
        return entry if entry is not None else self._load_persisted(did)

    def _load_persisted(self, did: str) -> _Entry | None:
        """The queued or stored entry of ``did``, now also cached in memory (unless one landed)."""
        entry = self._read_persisted(did)
        if entry is None:
            return None
        with self._lock:
            entry = self._cache.setdefault(did, entry)  # a concurrent fetch is newer
            self._evict_overflow()
        return entry

    def _read_persisted(self, did: str) -> _Entry | None:
        with self._lock:
            queued = did in self._pending or did in self._flushing
            row = self._pending.get(did, self._flushing.get(did))
        if not queued:
            if self._lookup is None:
                return None
            try:
                row = self._lookup.get(did)  # misses of every verification greenlet, one query
            except (peewee.PeeweeException, MaxConnectionsExceeded) as exc:
                log.warning("identity load failed did=%s error=%s", did, type(exc).__name__)
                return None
        if row is None:
            return None
        identity = Identity(
            did=Did(row.did),
            handle=Handle(row.handle) if row.handle else None,
            signing_key=row.signing_key,
            pds_endpoint=sys.intern(row.pds_endpoint) if row.pds_endpoint else None,
        )
        return _Entry(self._secure_endpoint(identity), row.fetched_at)

    def _secure_endpoint(self, identity: Identity) -> Identity:
        """``identity`` without its PDS endpoint when that is plaintext http in production (counted)."""
        endpoint = identity.pds_endpoint
        if self._allow_insecure or endpoint is None or endpoint.startswith("https://"):
            return identity
        INSECURE_ENDPOINTS_TOTAL.inc()
        log.info("identity pds endpoint refused did=%s reason=not_https", identity.did)
        return dataclasses.replace(identity, pds_endpoint=None)

    # -- fetching ------------------------------------------------------------------------------
    def _claim(self, did: str, now: float) -> Future[Identity]:
        """Register a fetch of ``did`` as in flight; the lock must be held."""
        future: Future[Identity] = Future()
        self._inflight[did] = future
        self._attempts[did] = now
        self._attempts.move_to_end(did)
        horizon = now - max(self._refresh_min_interval, self._failure_retry)
        while self._attempts and next(iter(self._attempts.values())) < horizon:
            self._attempts.popitem(last=False)
        return future

    def _recently_attempted(self, did: str, now: float, interval: float) -> bool:
        last = self._attempts.get(did)
        return last is not None and now - last < interval

    def _join(self, did: str, future: Future[Identity]) -> Identity:
        FETCH_SHARED_TOTAL.inc()
        try:
            return future.result(timeout=self._wait_timeout)
        except TimeoutError:
            raise IdentityUnavailable(f"timed out waiting for the fetch of {did}") from None

    def _run_fetch(self, did: str, future: Future[Identity]) -> Identity:
        try:
            identity = self._fetch_and_record(did)
        except IdentityError as exc:
            future.set_exception(exc)
            raise
        except BaseException:
            future.set_exception(IdentityUnavailable(f"the fetch of {did} was interrupted"))
            raise
        else:
            future.set_result(identity)
            return identity
        finally:
            with self._lock:
                if self._inflight.get(did) is future:
                    del self._inflight[did]

    def _fetch_and_record(self, did: str) -> Identity:
        url = did_document_url(did, plc_url=self._plc_url, allow_insecure=self._allow_insecure)
        started = time.perf_counter()
        try:
            identity, doc = decode_did_document(self._fetch(url), did)
            identity = self._secure_endpoint(identity)
        except (IdentityNotFound, DidDocumentInvalid) as exc:
            FETCH_TOTAL.labels("not_found" if isinstance(exc, IdentityNotFound) else "invalid").inc()
            with self._lock:
                known = self._cache.pop(did, None) is not None
                self._queue_write(did, None)
                self._remember_failure(did, exc)
            if known:
                log.info("identity evicted did=%s reason=%s", did, exc.reason)
            raise
        except IdentityUnavailable as exc:
            FETCH_TOTAL.labels("unavailable").inc()
            self._log_unavailable(did, exc)
            with self._lock:
                if did not in self._cache:
                    self._remember_failure(did, exc)
            raise
        finally:
            FETCH_SECONDS.observe(time.perf_counter() - started)
        FETCH_TOTAL.labels("ok").inc()
        fetched_at = self._clock()
        row = IdentityRow(did, identity.handle, identity.signing_key, identity.pds_endpoint, doc, fetched_at)
        with self._lock:
            self._cache[did] = _Entry(identity, fetched_at)
            self._cache.move_to_end(did)
            self._evict_overflow()
            self._failures.pop(did, None)
            self._queue_write(did, row)
        return identity

    def _start_background_fetch(self, did: str, now: float, min_interval: float) -> bool:
        with self._lock:
            if did in self._inflight or self._recently_attempted(did, now, min_interval):
                return False
            if not self._background_slots.acquire(blocking=False):
                return False
            future = self._claim(did, now)
        try:
            self._spawn(lambda: self._background_fetch(did, future))
        except BaseException:
            self._background_slots.release()
            with self._lock:
                self._inflight.pop(did, None)
            future.set_exception(IdentityUnavailable(f"could not start the fetch of {did}"))
            raise
        return True

    def _background_fetch(self, did: str, future: Future[Identity]) -> None:
        try:
            self._run_fetch(did, future)
        except IdentityError as exc:
            log.debug("background identity fetch failed did=%s reason=%s", did, exc.reason)
        except Exception:
            log.exception("background identity fetch crashed did=%s", did)
        finally:
            self._background_slots.release()

    # -- bookkeeping (lock held) ---------------------------------------------------------------
    def _evict_overflow(self) -> None:
        while len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)

    def _queue_write(self, did: str, row: IdentityRow | None) -> None:
        if self._db is None:
            return
        self._pending.pop(did, None)
        self._pending[did] = row
        while len(self._pending) > self._max_pending:
            del self._pending[next(iter(self._pending))]
            WRITES_DROPPED_TOTAL.inc()

    def _remember_failure(self, did: str, exc: IdentityError) -> None:
        now = self._clock()
        self._failures[did] = (now, exc)
        self._failures.move_to_end(did)
        while self._failures and (
            len(self._failures) > _MAX_REMEMBERED_FAILURES
            or next(iter(self._failures.values()))[0] <= now - self._failure_retry
        ):
            self._failures.popitem(last=False)

    def _recent_failure(self, did: str, now: float) -> IdentityError | None:
        with self._lock:
            item = self._failures.get(did)
            if item is None:
                return None
            if now - item[0] >= self._failure_retry:
                del self._failures[did]
                return None
            return item[1]

    def _log_unavailable(self, did: str, exc: IdentityError) -> None:
        now = time.monotonic()
        with self._lock:
            self._unavailable_unlogged += 1
            if now - self._unavailable_logged_at < _UNAVAILABLE_LOG_INTERVAL_SECONDS:
                return
            count, self._unavailable_unlogged = self._unavailable_unlogged, 0
            self._unavailable_logged_at = now
        log.warning("identity fetch failed did=%s error=%r failures_since_last_log=%d", did, str(exc), count)


class IdentityResolver(pykka.ThreadingActor):
    """Owns the directory's upkeep: flushes its write-behind queue, starts requested refreshes.

    Every ``flush_interval_seconds`` a ticker tells the actor ``FlushIdentities``; a failed
    flush is logged and retried at the next tick (the rows stay queued). ``RefreshIdentity``
    only starts a background fetch, so the actor never waits on the network.
    """

    def __init__(self, directory: IdentityDirectory, *, flush_interval_seconds: float = 5.0) -> None:
        super().__init__()
        self._directory = directory
        self._interval = flush_interval_seconds
        self._stopping = threading.Event()
        self._failed_flushes = 0

    def on_start(self) -> None:
        threading.Thread(target=self._tick, name="identity-flush-ticker", daemon=True).start()

    def on_stop(self) -> None:
        self._stopping.set()
        self._flush()

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, RefreshIdentity):
            try:
                self._directory.request_refresh(message.did)
            except Exception:
                log.exception("identity refresh could not start did=%s", message.did)
        elif isinstance(message, FlushIdentities):
            self._flush()
        else:
            log.warning("identity resolver ignored a message type=%s", type(message).__name__)
        return None

    def _flush(self) -> None:
        try:
            written = self._directory.flush()
        except Exception as exc:
            self._failed_flushes += 1
            level = logging.ERROR if self._failed_flushes >= 5 else logging.WARNING
            log.log(level, "identity flush failed error=%s consecutive=%d", type(exc).__name__, self._failed_flushes)
            return
        self._failed_flushes = 0
        if written:
            log.debug("identities flushed count=%d", written)

    def _tick(self) -> None:
        actor_ref = self.actor_ref
        while not self._stopping.wait(self._interval):
            try:
                actor_ref.tell(FlushIdentities())
            except pykka.ActorDeadError:
                return
