"""Sync 1.1 verification of upstream events: accept with the account's new state, or drop with a reason.

For every ``#commit`` it always checks: the account is known to be hosted by the sending
host (its DID document's PDS endpoint) and is active; the blocks are a CAR whose every block
hashes to its CID and whose root is the event's commit; the commit block is a version 3
commit for the event's repo and rev; its signature verifies (low-S) with the current key,
after one identity refresh if it fails; the rev is a TID above the last accepted rev and at
most ``max_rev_future_seconds`` ahead; limits (blocks bytes, ops). In strict mode it also
checks that inverting the ops on the new MST with only the carried blocks reproduces
``prevData``; lenient mode (per relay or per host) accepts a missing ``prevData`` or a failed
inversion with a counted warning. A ``since`` that differs from the last accepted rev is a
gap: the commit passes and the account is marked for re-sync.
``#sync`` gets the same host, signature and rev checks on its commit-only CAR. ``#identity``
and ``#account`` are accepted only from the account's PDS (after a refresh of the identity).
It does not check: record contents (a relay is application-agnostic), blobs, or that record
blocks for creates are present beyond what inversion needs.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from actors.accounts import AccountCache, AccountState
from protocol.car import CarFile, read_car
from protocol.commit import Commit, decode_commit
from protocol.crypto import load_did_key
from protocol.errors import InvalidKey, ProtocolError
from protocol.frames import AccountEvent, CommitEvent, IdentityEvent, RepoEvent, SyncEvent
from protocol.mst_invert import invert_ops
from protocol.syntax import is_valid_tid, tid_to_timestamp_us
from store.accounts import ACTIVE, THROTTLED

MAX_BLOCKS_BYTES = 2_000_000


class IdentityLike(Protocol):
    @property
    def signing_key(self) -> str | None: ...
    @property
    def pds_endpoint(self) -> str | None: ...


class IdentitySource(Protocol):
    def resolve(self, did: str) -> IdentityLike: ...
    def refresh(self, did: str) -> IdentityLike: ...


@dataclass(frozen=True, slots=True)
class HostContext:
    """The upstream host an event came from, as verification needs it."""

    host_id: int
    hostname: str  # "pds.example.com", or "localhost:2583" for insecure development hosts
    lenient: bool = False
    account_limit: int | None = None


@dataclass(frozen=True, slots=True)
class Accepted:
    account: AccountState
    warnings: tuple[str, ...] = ()
    new_account: bool = False
    gap: bool = False  # since != last rev: passed on, account marked for re-sync


@dataclass(frozen=True, slots=True)
class Dropped:
    reason: str
    detail: str = ""


Verdict = Accepted | Dropped


@dataclass(frozen=True, slots=True)
class VerifyLimits:
    max_ops: int = 200
    max_blocks_bytes: int = MAX_BLOCKS_BYTES
    max_rev_future_seconds: int = 300
    lenient: bool = False


@functools.lru_cache(maxsize=65536)
def host_of_endpoint(endpoint: str | None) -> str | None:
    """``https://pds.example.com/`` -> ``pds.example.com``; keeps a non-default port."""
    if not endpoint:
        return None
    parts = urlsplit(endpoint)
    if not parts.hostname:
        return None
    default = {"https": 443, "http": 80}.get(parts.scheme)
    if parts.port and parts.port != default:
        return f"{parts.hostname.lower()}:{parts.port}"
    return parts.hostname.lower()


class Verifier:
    """Checks events for one relay; stateful only through the account cache and identities."""

    def __init__(self, identities: IdentitySource, accounts: AccountCache, limits: VerifyLimits) -> None:
        self.identities = identities
        self.accounts = accounts
        self.limits = limits

    def check(self, event: RepoEvent, host: HostContext, now: float | None = None) -> Verdict:
        if isinstance(event, CommitEvent):
            return self._commit(event, host, time.time() if now is None else now)
        if isinstance(event, SyncEvent):
            return self._sync(event, host, time.time() if now is None else now)
        if isinstance(event, IdentityEvent):
            return self._identity(event, host)
        return self._account(event, host)

    # -- shared steps -------------------------------------------------------------------------
    def _identity_for(self, did: str, host: HostContext, *, refresh: bool = False) -> IdentityLike | Dropped:
        try:
            ident = self.identities.refresh(did) if refresh else self.identities.resolve(did)
        except Exception as exc:  # identity errors of any kind are a drop reason
            return Dropped(getattr(exc, "reason", "identity_unavailable"), str(exc))
        if host_of_endpoint(ident.pds_endpoint) != host.hostname and not refresh:
            # the account may have just migrated here: look once more before refusing
            return self._identity_for(did, host, refresh=True)
        if host_of_endpoint(ident.pds_endpoint) != host.hostname:
            return Dropped("wrong_host", f"{did} is hosted at {ident.pds_endpoint}")
        return ident

    def _account_and_identity(
        self, did: str, host: HostContext, *, require_active: bool = False, refresh: bool = False
    ) -> tuple[AccountState, bool, IdentityLike] | Dropped:
        """The account's state (new when unknown), whether it is new, and its identity from this host.

        Checked in this order: not taken down at this relay; active upstream (``require_active``);
        its DID document names this host as its PDS (``refresh`` re-fetches the document first).
        """
        state = self.accounts.get(did)
        new = state is None
        if state is None:
            state = AccountState(did=did, host_id=host.host_id)
        elif state.status != ACTIVE:
            reason = "account_throttled" if state.status == THROTTLED else "account_takendown"
            return Dropped(reason, f"{did} is {state.status} at this relay")
        if require_active and not state.active:
            return Dropped("account_inactive", f"{did} is {state.upstream_status}")
        ident = self._identity_for(did, host, refresh=refresh)
        if isinstance(ident, Dropped):
            return ident
        return state, new, ident

    def _verify_signature(self, did: str, ident: IdentityLike, commit_unsigned: bytes, sig: bytes) -> bool:
        for attempt in range(2):
            if attempt:
                try:
                    ident = self.identities.refresh(did)
                except Exception:  # no fresher key to be had
                    return False
            if not ident.signing_key:
                continue
            try:
                key = load_did_key(ident.signing_key)
            except InvalidKey:
                continue
            if key.verify(commit_unsigned, sig):
                return True
        return False

    def _check_rev(self, rev: str, state: AccountState, now: float, *, allow_equal: bool = False) -> Dropped | None:
        if not is_valid_tid(rev):
            return Dropped("bad_rev", f"rev {rev!r} is not a TID")
        if state.rev is not None and (rev < state.rev or (rev == state.rev and not allow_equal)):
            return Dropped("rev_not_newer", f"rev {rev} is not above {state.rev}")
        if tid_to_timestamp_us(rev) > (now + self.limits.max_rev_future_seconds) * 1_000_000:
            return Dropped("rev_in_future", f"rev {rev} is too far in the future")
        return None

    def _signed_commit(
        self,
        blocks: bytes,
        root: bytes | None,
        did: str,
        rev: str,
        ident: IdentityLike,
        state: AccountState,
        now: float,
        *,
        allow_equal: bool,
    ) -> tuple[CarFile, Commit] | Dropped:
        """The CAR (every hash checked) and its signed commit: root, repo, rev and signature checked."""
        if len(blocks) > self.limits.max_blocks_bytes:
            return Dropped("too_large", f"blocks of {len(blocks)} bytes")
        try:
            car = read_car(blocks)
            if not car.roots or (root is not None and car.roots[0] != root):
                return Dropped("bad_car_root", "CAR root is not the event's commit")
            block = car.blocks.get(car.roots[0])
            if block is None:
                return Dropped("missing_block", "commit block not in CAR")
            commit = decode_commit(block)
        except ProtocolError as exc:
            return Dropped(exc.reason, str(exc))
        if commit.did != did:
            return Dropped("repo_mismatch", f"commit is for {commit.did}")
        if commit.rev != rev:
            return Dropped("rev_mismatch", f"event rev {rev} != commit rev {commit.rev}")
        bad_rev = self._check_rev(rev, state, now, allow_equal=allow_equal)
        if bad_rev:
            return bad_rev
        if not self._verify_signature(did, ident, commit.unsigned, commit.sig):
            return Dropped("bad_signature", "commit signature does not verify")
        return car, commit

    # -- event kinds --------------------------------------------------------------------------
    def _commit(self, ev: CommitEvent, host: HostContext, now: float) -> Verdict:
        got = self._account_and_identity(ev.repo, host, require_active=True)
        if isinstance(got, Dropped):
            return got
        state, new, ident = got
        if ev.too_big:
            return Dropped("too_big", "tooBig commits carry no verifiable blocks")
        if len(ev.ops) > self.limits.max_ops:
            return Dropped("too_many_ops", f"{len(ev.ops)} ops")
        checked = self._signed_commit(ev.blocks, ev.commit, ev.repo, ev.rev, ident, state, now, allow_equal=False)
        if isinstance(checked, Dropped):
            return checked
        car, commit = checked
        warnings: list[str] = []
        lenient = self.limits.lenient or host.lenient
        if ev.prev_data is None:
            if not lenient and state.rev is not None:
                return Dropped("no_prev_data", "commit without prevData (not Sync 1.1)")
            if state.rev is not None:
                warnings.append("no_prev_data")
        else:
            try:
                previous = invert_ops(commit.data, ev.ops, car.blocks)
            except ProtocolError as exc:
                if not lenient:
                    return Dropped(exc.reason, f"inversion failed: {exc}")
                warnings.append(exc.reason)
            else:
                if previous != ev.prev_data:
                    if not lenient:
                        return Dropped("bad_prev_data", "inverted ops do not reproduce prevData")
                    warnings.append("bad_prev_data")
        gap = state.rev is not None and ev.since != state.rev
        new_state = state.updated(
            host_id=host.host_id,
            rev=ev.rev,
            commit_cid=ev.commit,
            data_cid=commit.data,
            needs_resync=state.needs_resync or gap,
        )
        return Accepted(new_state, tuple(warnings), new, gap)

    def _sync(self, ev: SyncEvent, host: HostContext, now: float) -> Verdict:
        got = self._account_and_identity(ev.did, host)
        if isinstance(got, Dropped):
            return got
        state, new, ident = got
        # a #sync may restate the current rev
        checked = self._signed_commit(ev.blocks, None, ev.did, ev.rev, ident, state, now, allow_equal=True)
        if isinstance(checked, Dropped):
            return checked
        car, commit = checked
        new_state = state.updated(
            host_id=host.host_id, rev=ev.rev, commit_cid=car.roots[0], data_cid=commit.data, needs_resync=True
        )
        return Accepted(new_state, (), new)

    def _identity(self, ev: IdentityEvent, host: HostContext) -> Verdict:
        got = self._account_and_identity(ev.did, host, refresh=True)
        if isinstance(got, Dropped):
            return got
        state, new, _ = got
        return Accepted(state.updated(host_id=host.host_id), (), new)

    def _account(self, ev: AccountEvent, host: HostContext) -> Verdict:
        got = self._account_and_identity(ev.did, host)
        if isinstance(got, Dropped):
            return got
        state, new, _ = got
        upstream = ACTIVE if ev.active else (ev.status or "deactivated")
        return Accepted(state.updated(host_id=host.host_id, upstream_status=upstream), (), new)
