"""The XRPC sync read API, served from the repo mirror only (never from a PDS).

Endpoints: getRepo, getRecord, getLatestCommit, getBlocks, listRepos, getRepoStatus.

Account state comes from the main database (``store.accounts``), repo data from the carstore
only: nothing is fetched from or proxied to a PDS. Rules every endpoint follows:

- Only blocks reachable from the mirror's current head are served. A block still in an
  uncompacted slice but no longer in the repo (a deleted record, a replaced node) is not,
  as a PDS, which keeps only its current blocks, would not serve it either.
- An inactive account's repo data is never served: a relay takedown or upstream
  ``takendown`` answers ``RepoTakendown``, ``suspended`` ``RepoSuspended``, ``deactivated``
  ``RepoDeactivated``; ``deleted`` and any other inactive status (``desynchronized``,
  ``throttled``) ``RepoNotFound``. ``listRepos`` and ``getRepoStatus`` report every account.
- Client errors are ``{"error", "message"}`` with status 400, as the reference PDS answers
  them. A mirror that cannot be read (a missing or damaged block: not a client's doing) is a
  500 ``InternalServerError``, logged (rate-limited) and counted; a read that kept losing
  races with compaction is a 503. With ``carstore=None`` (mirror disabled) the repo-data
  endpoints answer 501 ``MethodNotImplemented`` and the others use the account rows.

Deliberate choices: ``getRecord`` for an absent record answers a proof of absence (as the
reference PDS does), never ``RecordNotFound``; ``getBlocks`` answers a CAR with no roots.
``since`` answers what a copy at that rev lacks (``changed_blocks``: the newer slices' blocks the
head reaches through changed nodes; the same bytes as a full CAR when ``since`` predates the
repo, only the root when it is the head's rev). CARs are built in memory, not streamed:
every block is already in memory once the slices are read (a compacted repo is served as its
file), and a complete body gets a Content-Length and a proper error instead of a 200 cut short.
Carstore work (file reads, hashing, the MST walk) runs through ``offload``, by default gevent's
thread pool, so firehose greenlets keep running meanwhile; the pool's size bounds how many
repos are assembled at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

import peewee
from flask import Blueprint, Response, jsonify, request
from prometheus_client import Counter

from actors.blocking import off_loop
from protocol.car import write_car
from protocol.cid import cid_from_str, cid_to_str
from protocol.commit import decode_commit
from protocol.errors import CidError, MissingBlock, ProtocolError, SyntaxInvalid
from protocol.mst_node import parse_node
from protocol.repo_verify import record_proof_blocks
from protocol.syntax import is_valid_did, is_valid_nsid, is_valid_record_key, is_valid_tid
from store.accounts import ACTIVE, AccountRow, list_accounts, load_account
from store.carstore import CarStore, CarStoreError, RepoHead
from store.carstore_compact import repo_blocks
from web.xrpc_errors import XrpcError
from web.xrpc_params import int_arg, str_arg

log = logging.getLogger(__name__)

T = TypeVar("T")

CAR_MIMETYPE = "application/vnd.ipld.car"
MAX_GET_BLOCKS = 1000  # CIDs one getBlocks call may ask for (the HTTP server's request line has room for them)
MAX_PARAM_CHARS = 2048  # longest text parameter (a DID may have 2048 characters)
READ_ATTEMPTS = 3  # reads of the mirror against one head before giving up on a moving head
LOG_INTERVAL_SECONDS = 10.0  # at most one "mirror unreadable" log line per interval

MIRROR_READ_ERRORS = Counter(
    "skyrelay_repo_api_mirror_errors_total", "Repo API reads the mirror could not answer, by reason", ["reason"]
)
_REFUSALS = {"takendown": "RepoTakendown", "suspended": "RepoSuspended", "deactivated": "RepoDeactivated"}


class Offload(Protocol):
    def __call__(self, fn: Callable[[], T], /) -> T: ...


def repo_blueprint(*, db: peewee.Database, carstore: CarStore | None, offload: Offload = off_loop) -> Blueprint:
    """The sync read endpoints over the main database ``db`` and the repo mirror ``carstore``."""
    bp = Blueprint("xrpc_repo", __name__)
    last_log = [0.0]

    @bp.before_request
    def utf8_query() -> None:
        # werkzeug's request.args raises UnicodeDecodeError (a 500) on raw non-UTF-8 query bytes
        try:
            request.query_string.decode()
        except UnicodeDecodeError:
            raise XrpcError("InvalidRequest", "the query string is not UTF-8") from None

    def account(did: str) -> AccountRow:
        with db.connection_context():
            row = load_account(db, did)
        if row is None:
            raise XrpcError("RepoNotFound", f"repo {did} is not known to this relay")
        return row

    def servable(did: str) -> CarStore:
        """The carstore, once ``did`` is known and active (the matching XRPC error otherwise)."""
        _refuse_inactive(account(did))
        if carstore is None:
            raise XrpcError("MethodNotImplemented", "this relay keeps no repo mirror", status=501)
        return carstore

    def read_mirror(did: str, fn: Callable[[], T | None]) -> T:
        """``fn()`` off the event loop; mirror failures become XRPC errors, ``None`` RepoNotFound."""
        try:
            out = offload(fn)
        except SyntaxInvalid as exc:
            raise XrpcError("InvalidRequest", str(exc)) from None
        except (ProtocolError, CarStoreError) as exc:
            reason = exc.reason if isinstance(exc, ProtocolError) else "carstore_busy"
            MIRROR_READ_ERRORS.labels(reason).inc()
            now = time.monotonic()
            if now - last_log[0] >= LOG_INTERVAL_SECONDS:
                last_log[0] = now
                log.warning("repo mirror unreadable did=%s reason=%s error=%s", did, reason, exc)
            if isinstance(exc, CarStoreError):
                raise XrpcError("ServiceUnavailable", "the repo is being rewritten; try again", status=503) from None
            raise XrpcError("InternalServerError", "the relay's copy of this repo is damaged", status=500) from None
        if out is None:
            raise XrpcError("RepoNotFound", f"the relay holds no copy of repo {did} yet")
        return out

    @bp.get("/xrpc/com.atproto.sync.getRepo")
    def get_repo() -> Any:
        did, since = _did_arg(), _tid_arg("since")
        store = servable(did)
        if since is None:
            return _car(read_mirror(did, lambda: store.repo_car(did)))

        def diff(head: RepoHead) -> bytes:
            blocks = changed_blocks(store.load_blocks(did, since=since), head, since)
            return write_car([head.commit_cid], blocks.items())

        return _car(read_mirror(did, lambda: _at_head(store, did, diff, settle=True)))

    @bp.get("/xrpc/com.atproto.sync.getRecord")
    def get_record() -> Any:
        did = _did_arg()
        collection, rkey = _required_arg("collection"), _required_arg("rkey")
        if not is_valid_nsid(collection):
            raise XrpcError("InvalidRequest", "collection is not a valid NSID")
        if not is_valid_record_key(rkey):
            raise XrpcError("InvalidRequest", "rkey is not a valid record key")
        store = servable(did)

        def proof(head: RepoHead) -> bytes:
            blocks = record_proof_blocks(store.load_blocks(did), head.commit_cid, f"{collection}/{rkey}")
            return write_car([head.commit_cid], blocks.items())

        return _car(read_mirror(did, lambda: _at_head(store, did, proof)))

    @bp.get("/xrpc/com.atproto.sync.getBlocks")
    def get_blocks() -> Any:
        did, wanted = _did_arg(), _cids_arg()
        store = servable(did)

        def find(head: RepoHead) -> dict[bytes, bytes]:
            reachable = repo_blocks(store.load_blocks(did), head.commit_cid)
            return {cid: reachable[cid] for cid in wanted if cid in reachable}

        found = read_mirror(did, lambda: _at_head(store, did, find))
        missing = [cid_to_str(cid) for cid in wanted if cid not in found]
        if missing:
            raise XrpcError("BlockNotFound", f"blocks not in the current repo: {', '.join(missing[:10])}")
        return _car(write_car([], found.items()))

    @bp.get("/xrpc/com.atproto.sync.getLatestCommit")
    def get_latest_commit() -> Any:
        did = _did_arg()
        row = account(did)
        _refuse_inactive(row)
        head = current_heads([row])[did]
        if head is None:
            raise XrpcError("RepoNotFound", f"no commit of repo {did} is known yet")
        return jsonify({"cid": cid_to_str(head[0]), "rev": head[1]})

    @bp.get("/xrpc/com.atproto.sync.listRepos")
    def list_repos() -> Any:
        limit = int_arg("limit", default=500, low=1, high=1000)
        cursor = str_arg("cursor", max_length=MAX_PARAM_CHARS)
        if cursor and not is_valid_did(cursor):
            raise XrpcError("InvalidRequest", "cursor is not one this relay gave out")
        with db.connection_context():
            rows = list_accounts(db, after_did=cursor, limit=limit)
        heads = current_heads(rows)
        repos = []
        for row in rows:
            head = heads[row.did]
            if head is None:  # no commit known yet: nothing to report as its head
                continue
            repo: dict[str, Any] = {"did": row.did, "head": cid_to_str(head[0]), "rev": head[1], "active": row.active}
            status = status_of(row)
            if status is not None:
                repo["status"] = status
            repos.append(repo)
        out: dict[str, Any] = {"repos": repos}
        if len(rows) == limit:
            out["cursor"] = rows[-1].did
        return jsonify(out)

    @bp.get("/xrpc/com.atproto.sync.getRepoStatus")
    def get_repo_status() -> Any:
        did = _did_arg()
        row = account(did)
        out: dict[str, Any] = {"did": did, "active": row.active}
        status = status_of(row)
        if status is not None:
            out["status"] = status
        else:
            head = current_heads([row])[did]
            if head is not None:
                out["rev"] = head[1]
        return jsonify(out)

    def current_heads(rows: list[AccountRow]) -> dict[str, tuple[bytes, str] | None]:
        """(commit CID, rev) per account: the mirror's head, else the account row's, else ``None``."""
        store = carstore
        mirrored: dict[str, RepoHead | None] = {}
        if store is not None and rows:
            mirrored = offload(lambda: {row.did: store.head(row.did) for row in rows})
        out: dict[str, tuple[bytes, str] | None] = {}
        for row in rows:
            head = mirrored.get(row.did)
            if head is not None:
                out[row.did] = (head.commit_cid, head.rev)
            elif row.commit_cid is not None and row.rev is not None:
                out[row.did] = (row.commit_cid, row.rev)
            else:
                out[row.did] = None
        return out

    return bp


def status_of(row: AccountRow) -> str | None:
    """Why the account is inactive (the relay's own takedown first), or ``None`` when it is active."""
    if row.status != ACTIVE:
        return row.status
    if row.upstream_status != ACTIVE:
        return row.upstream_status
    return None


def changed_blocks(newer: Mapping[bytes, bytes], head: RepoHead, since: str) -> dict[bytes, bytes]:
    """What a copy of the repo at rev ``since`` lacks of ``head``: the ``newer`` blocks the head reaches through them.

    ``newer`` holds the blocks of the slices after ``since``. Every commit's slice carries each
    MST node that was not in the tree before that commit (the firehose's commit events must, for
    their ops to invert) and each record it writes. So a node reachable from the head but in no
    newer slice has been in the tree, unchanged, since ``since``, and with it its whole subtree:
    the walk does not descend into it. Only the changed part of the tree is read; nothing the
    head does not reach is returned. ``MissingBlock`` when the head is newer than ``since`` but
    its commit is not among ``newer`` (a compaction or replace raced the read).
    """
    out: dict[bytes, bytes] = {}
    commit_block = newer.get(head.commit_cid)
    if commit_block is None:
        if head.rev > since:
            raise MissingBlock(f"commit {cid_to_str(head.commit_cid)} is not among the blocks after {since}")
        return out
    out[head.commit_cid] = commit_block
    # (cid, is an MST node), visited in the carstore's canonical order: a node, its left
    # subtree, then for each entry its record and the subtree to its right
    stack: list[tuple[bytes | None, bool]] = [(decode_commit(commit_block).data, True)]
    while stack:
        cid, is_node = stack.pop()
        block = newer.get(cid) if cid is not None else None
        if cid is None or block is None or cid in out:
            continue
        out[cid] = block
        if is_node:
            left, _, entries, _ = parse_node(block)
            after = [(left, True)]
            for entry in entries:
                after += [(entry["v"], False), (entry["t"], True)]
            stack.extend(reversed(after))
    return out


def _refuse_inactive(row: AccountRow) -> None:
    status = status_of(row)
    if status is not None:
        raise XrpcError(_REFUSALS.get(status, "RepoNotFound"), f"repo {row.did} is not available: account {status}")


def _at_head(store: CarStore, did: str, read: Callable[[RepoHead], T], *, settle: bool = False) -> T | None:
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


def _car(data: bytes) -> Response:
    return Response(data, mimetype=CAR_MIMETYPE)


def _required_arg(name: str) -> str:
    return str_arg(name, max_length=MAX_PARAM_CHARS, required=True)


def _did_arg() -> str:
    did = _required_arg("did")
    if not is_valid_did(did):
        raise XrpcError("InvalidRequest", "did is not a valid DID")
    return did


def _tid_arg(name: str) -> str | None:
    value = str_arg(name, max_length=MAX_PARAM_CHARS)
    if not value:
        return None
    if not is_valid_tid(value):
        raise XrpcError("InvalidRequest", f"{name} is not a valid TID (a repo rev)")
    return value


def _cids_arg() -> list[bytes]:
    """The ``cids`` parameters, parsed, without repeats, in the order given."""
    raw = request.args.getlist("cids")
    if not raw:
        raise XrpcError("InvalidRequest", "cids is required")
    if len(raw) > MAX_GET_BLOCKS:
        raise XrpcError("InvalidRequest", f"at most {MAX_GET_BLOCKS} cids per request")
    out: dict[bytes, None] = {}
    for text in raw:
        try:
            out[cid_from_str(text)] = None
        except CidError:
            raise XrpcError("InvalidRequest", f"not a valid CID: {text[:80]!r}") from None
    return list(out)
