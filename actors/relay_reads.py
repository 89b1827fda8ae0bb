"""The public read API's domain side: hosts, account state, mirror heads, proofs and repo streams.

``SyncReads`` is what the XRPC read handlers call (``web.xrpc_sync``, ``web.xrpc_repo``); they
only parse parameters and format answers. Every read is one call into gevent's thread pool
(``offload``) that runs all its SQL and file reads there: a SQLite statement waiting out a
writer's lock would otherwise stop every greenlet. Those calls use the database without
``connection_context``: peewee then keeps each pool thread's connection open between reads
(one connect and its pragmas per thread, not per look-up). The databases' locks are native
(``store.db``), so greenlets and pool threads may share them.

Rules of the sync read API (the repo mirror only; nothing is fetched from a PDS):

- Only blocks reachable from the mirror's current head are served.
- An inactive account's repo data is never served: a relay takedown or upstream
  ``takendown`` answers ``RepoTakendown``, ``suspended`` ``RepoSuspended``, ``deactivated``
  ``RepoDeactivated``; ``deleted`` and any other inactive status (``desynchronized``,
  ``throttled``) ``RepoNotFound``. ``listRepos`` and ``getRepoStatus`` report every account.
- Refusals are ``ControlError`` (XRPC error name, message, status). A mirror that cannot be
  read (a missing or damaged block) is a 500 ``InternalServerError``, logged (rate-limited)
  and counted; a read that kept losing races with compaction is a 503. Without a mirror the
  repo-data reads answer 501 ``MethodNotImplemented`` and the others use the account rows.
- ``getRecord`` of an absent record answers a proof of absence; ``getBlocks`` a CAR with no
  roots; ``since`` what a copy at that rev lacks (``actors.repo_diff.changed_blocks``).
- A full ``getRepo`` is a ``RepoStream`` (``store.carstore_stream``): checked and measured
  before the answer starts, then sent a chunk at a time, each read in the pool.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import peewee
from prometheus_client import Counter

from actors.blocking import off_loop
from actors.control_errors import ControlError
from actors.repo_diff import changed_blocks
from protocol.car import write_car
from protocol.cid import cid_to_str
from protocol.errors import MissingBlock, ProtocolError, SyntaxInvalid
from protocol.repo_verify import record_proof_blocks
from store.accounts import ACTIVE, AccountRow, list_accounts, load_account
from store.carstore import CarStore, CarStoreError, RepoHead, RepoStream
from store.carstore_compact import repo_blocks
from store.db import ping
from store.hosts import HostRow, get_host, list_hosts

__all__ = ["MIRROR_READ_ERRORS", "HostRow", "RepoStream", "SyncReads", "at_head", "status_of"]

log = logging.getLogger(__name__)

T = TypeVar("T")

READ_ATTEMPTS = 3  # reads of the mirror against one head before giving up on a moving head
LOG_INTERVAL_SECONDS = 10.0  # at most one "mirror unreadable" log line per interval
MIRROR_READ_ERRORS = Counter(
    "skyrelay_repo_api_mirror_errors_total", "Repo API reads the mirror could not answer, by reason", ["reason"]
)
_REFUSALS = {"takendown": "RepoTakendown", "suspended": "RepoSuspended", "deactivated": "RepoDeactivated"}
Head = tuple[bytes, str]  # commit CID, rev


class Offload(Protocol):
    def __call__(self, fn: Callable[[], T], /) -> T: ...


def status_of(row: AccountRow) -> str | None:
    """Why the account is inactive (the relay's own takedown first), or ``None`` when it is active."""
    if row.status != ACTIVE:
        return row.status
    if row.upstream_status != ACTIVE:
        return row.upstream_status
    return None


def _refuse_inactive(row: AccountRow) -> None:
    status = status_of(row)
    if status is not None:
        raise ControlError(_REFUSALS.get(status, "RepoNotFound"), f"repo {row.did} is not available: account {status}")


def at_head(store: CarStore, did: str, read: Callable[[RepoHead], T], *, settle: bool = False) -> T | None:
    """``read(head)`` for the mirror's current head; ``None`` when it holds no repo for ``did``.

    Tried again (up to ``READ_ATTEMPTS``) when the head moved and ``read`` met a missing block (a
    compaction for a newer head dropped blocks of the one read) or, with ``settle``, whenever
    the head moved during the read (two reads then may come from different slice sets).
    """
    for attempt in range(READ_ATTEMPTS):
        last = attempt == READ_ATTEMPTS - 1
        head = store.head(did)
        if head is None:
            return None
        try:
            out = read(head)
        except MissingBlock:
            if last or store.head(did) == head:
                raise
            continue
        if settle and not last and store.head(did) != head:
            continue
        return out
    raise AssertionError("unreachable")


class SyncReads:
    """The reads of ``com.atproto.sync`` over the main database ``db`` and the repo mirror ``carstore``."""

    def __init__(self, db: peewee.Database, carstore: CarStore | None, *, offload: Offload = off_loop) -> None:
        self.db = db
        self.carstore = carstore
        self.offload = offload
        self._last_log = 0.0

    def healthy(self) -> bool:
        """The main database answers a trivial query (the health endpoint)."""
        return self.offload(lambda: ping(self.db))

    # -- hosts -------------------------------------------------------------------------------
    def host_page(self, after_id: int, limit: int) -> list[HostRow]:
        return self.offload(lambda: list_hosts(self.db, after_id=after_id, limit=limit))

    def host(self, hostname: str) -> HostRow | None:
        return self.offload(lambda: get_host(self.db, hostname))

    # -- account state -----------------------------------------------------------------------
    def _account(self, did: str) -> AccountRow:
        row = load_account(self.db, did)
        if row is None:
            raise ControlError("RepoNotFound", f"repo {did} is not known to this relay")
        return row

    def _heads(self, rows: list[AccountRow]) -> dict[str, Head | None]:
        """(commit CID, rev) per account: the mirror's head, else the account row's, else ``None``."""
        out: dict[str, Head | None] = {}
        for row in rows:
            head = self.carstore.head(row.did) if self.carstore is not None else None
            if head is not None:
                out[row.did] = (head.commit_cid, head.rev)
            elif row.commit_cid is not None and row.rev is not None:
                out[row.did] = (row.commit_cid, row.rev)
            else:
                out[row.did] = None
        return out

    def latest_commit(self, did: str) -> dict[str, str]:
        def read() -> dict[str, str]:
            row = self._account(did)
            _refuse_inactive(row)
            head = self._heads([row])[did]
            if head is None:
                raise ControlError("RepoNotFound", f"no commit of repo {did} is known yet")
            return {"cid": cid_to_str(head[0]), "rev": head[1]}

        return self.offload(read)

    def repo_status(self, did: str) -> dict[str, Any]:
        def read() -> dict[str, Any]:
            row = self._account(did)
            out: dict[str, Any] = {"did": did, "active": row.active}
            status = status_of(row)
            if status is not None:
                out["status"] = status
            else:
                head = self._heads([row])[did]
                if head is not None:
                    out["rev"] = head[1]
            return out

        return self.offload(read)

    def list_repos(self, after_did: str, limit: int) -> dict[str, Any]:
        def read() -> dict[str, Any]:
            rows = list_accounts(self.db, after_did=after_did, limit=limit)
            heads = self._heads(rows)
            repos = []
            for row in rows:
                head = heads[row.did]
                if head is None:  # no commit known yet: nothing to report as its head
                    continue
                repo: dict[str, Any] = {"did": row.did, "head": cid_to_str(head[0]), "rev": head[1],
                                        "active": row.active}  # fmt: skip
                status = status_of(row)
                if status is not None:
                    repo["status"] = status
                repos.append(repo)
            out: dict[str, Any] = {"repos": repos}
            if len(rows) == limit:
                out["cursor"] = rows[-1].did
            return out

        return self.offload(read)

    # -- repo data ---------------------------------------------------------------------------
    def _mirror(self, did: str, fn: Callable[[CarStore], T | None]) -> T:
        """``fn(carstore)`` in the pool once ``did`` is known and active; mirror failures become errors."""

        def read() -> T | None:
            _refuse_inactive(self._account(did))
            if self.carstore is None:
                raise ControlError("MethodNotImplemented", "this relay keeps no repo mirror", 501)
            return fn(self.carstore)

        try:
            out = self.offload(read)
        except (ProtocolError, CarStoreError) as exc:
            raise self._unreadable(did, exc) from None
        if out is None:
            raise ControlError("RepoNotFound", f"the relay holds no copy of repo {did} yet")
        return out

    def _unreadable(self, did: str, exc: Exception) -> ControlError:
        if isinstance(exc, SyntaxInvalid):
            return ControlError("InvalidRequest", str(exc))
        reason = exc.reason if isinstance(exc, ProtocolError) else "carstore_busy"
        MIRROR_READ_ERRORS.labels(reason).inc()
        now = time.monotonic()
        if now - self._last_log >= LOG_INTERVAL_SECONDS:
            self._last_log = now
            log.warning("repo mirror unreadable did=%s reason=%s error=%s", did, reason, exc)
        if isinstance(exc, CarStoreError):
            return ControlError("ServiceUnavailable", "the repo is being rewritten; try again", 503)
        return ControlError("InternalServerError", "the relay's copy of this repo is damaged", 500)

    def record(self, did: str, collection: str, rkey: str) -> bytes:
        """A getRecord CAR: the commit, the MST proof of ``collection/rkey`` and the record when present."""

        def proof(store: CarStore, head: RepoHead) -> bytes:
            path = f"{collection}/{rkey}"
            blocks = store.read_repo(did, lambda blocks: record_proof_blocks(blocks, head.commit_cid, path))
            return write_car([head.commit_cid], blocks.items())

        return self._mirror(did, lambda store: at_head(store, did, lambda head: proof(store, head)))

    def repo_since(self, did: str, since: str) -> bytes:
        def diff(store: CarStore, head: RepoHead) -> bytes:
            blocks = changed_blocks(store.load_blocks(did, since=since), head, since)
            return write_car([head.commit_cid], blocks.items())

        return self._mirror(did, lambda store: at_head(store, did, lambda head: diff(store, head), settle=True))

    def repo_stream(self, did: str) -> RepoStream:
        """The full repo CAR, checked and measured; send it with ``next_chunk`` and ``close`` it."""
        return self._mirror(did, lambda store: store.stream_repo(did))

    def next_chunk(self, did: str, stream: RepoStream) -> bytes:
        """The stream's next bytes (``b""`` at the end), read in the pool; a damaged block raises (cut short)."""
        try:
            return self.offload(stream.next_chunk)
        except (ProtocolError, CarStoreError, OSError) as exc:
            self._unreadable(did, exc)
            raise

    def blocks(self, did: str, wanted: list[bytes]) -> bytes:
        """A getBlocks CAR (no roots) of ``wanted``, all of which must be in the current repo."""

        def find(store: CarStore, head: RepoHead) -> dict[bytes, bytes]:
            reachable = repo_blocks(store.load_blocks(did), head.commit_cid)
            return {cid: reachable[cid] for cid in wanted if cid in reachable}

        found = self._mirror(did, lambda store: at_head(store, did, lambda head: find(store, head)))
        missing = [cid_to_str(cid) for cid in wanted if cid not in found]
        if missing:
            raise ControlError("BlockNotFound", f"blocks not in the current repo: {', '.join(missing[:10])}")
        return write_car([], found.items())
