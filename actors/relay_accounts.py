"""The control plane's account operations: takedown and reversal, takedown list, and repo-mirror upkeep.

A takedown is written to SQL, then the sequencer (asked) announces it as ``#account`` with
``active: false, status: "takendown"`` and drops the account's later events; every account
cache (relay process and ingest workers) forgets the account so it is read again from SQL.
The sync read API checks SQL, so it refuses the repo from the moment the row is written.
A reversal does the same with ``active`` (or the upstream status when that is not active).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from actors.blocking import off_loop
from actors.control_errors import ControlError
from actors.messages_control import ForgetAccount, SetAccountStatus
from actors.messages_mirror import CompactRepo, RequestResync, ResetRepo
from protocol.crypto import load_did_key
from protocol.errors import InvalidKey, ProtocolError
from protocol.repo_verify import verify_repo
from protocol.syntax import is_valid_did
from store.accounts import (
    ACTIVE,
    TAKENDOWN,
    THROTTLED,
    host_account_dids,
    host_throttled_dids,
    host_unthrottled_count,
    list_takedowns,
    load_account,
    set_account_status,
)
from store.hosts import HostRow, get_host_by_id

log = logging.getLogger(__name__)
ASK_TIMEOUT_SECONDS = 30.0
TAKEDOWN_PAGE = 500


def check_did(did: object) -> str:
    if not isinstance(did, str) or not is_valid_did(did):
        raise ControlError("InvalidRequest", "did must be a valid DID")
    return did


class AccountOps:
    """Mixed into ``actors.relay_api.Relay``; uses its ``supervisor`` and ``db``."""

    supervisor: Any
    settings: Any
    db: Any

    def _host(self, raw: object) -> HostRow:  # pragma: no cover - provided by Relay
        raise NotImplementedError

    # -- takedowns -------------------------------------------------------------------------------
    def take_down(self, did: object) -> int:
        """Take ``did`` down; the relay seq of the ``#account`` announcement."""
        return self._set_status(check_did(did), TAKENDOWN)

    def reverse_takedown(self, did: object) -> int:
        """Serve ``did`` again: ``active``, or ``throttled`` when its host has no room under its account limit.

        Room is counted as ``release_throttled`` counts it: the host's accounts other than this
        one that are not throttled (taken-down ones keep their place) against the limit in effect.
        """
        did = check_did(did)
        with self.db.connection_context():
            row = load_account(self.db, did)
            host = get_host_by_id(self.db, row.host_id) if row is not None and row.host_id is not None else None
            admitted = host_unthrottled_count(self.db, host.id) if host is not None else 0
        status = ACTIVE
        if row is not None and host is not None and row.status in (TAKENDOWN, THROTTLED):
            limit = host.account_limit if host.account_limit is not None else self.settings.default_host_account_limit
            others = admitted - (1 if row.status != THROTTLED else 0)
            if others >= limit:
                status = THROTTLED
                log.info("takedown reversed into throttled did=%s host=%s limit=%d", did, host.hostname, limit)
        return self._set_status(did, status)

    def _set_status(self, did: str, status: str) -> int:
        with self.db.connection_context():
            known = set_account_status(self.db, did, status)
        if not known:
            raise ControlError("RepoNotFound", f"account {did} is not known to this relay", 404)
        seq = self.supervisor.sequencer.ask(SetAccountStatus(did, status), timeout=ASK_TIMEOUT_SECONDS)
        self.supervisor.accounts.forget(did)
        self.supervisor.hosts.tell(ForgetAccount(did))
        log.info("account status set by admin did=%s status=%s seq=%s", did, status, seq)
        return int(seq or 0)

    def release_throttled(self, host: HostRow, limit: int) -> list[str]:
        """Release throttled accounts of ``host`` that fit under ``limit`` (oldest first); their DIDs.

        Each is announced active again and re-synced, so what it wrote while throttled reaches
        the mirror; its next commit then follows the mirror's head on the firehose.
        """
        with self.db.connection_context():
            room = max(0, limit - host_unthrottled_count(self.db, host.id))
            dids = host_throttled_dids(self.db, host.id, limit=room) if room else []
        for did in dids:
            self._set_status(did, ACTIVE)
            if self.supervisor.carstore is not None:
                self.supervisor.mirror.tell(RequestResync(did, "released"))
        if dids:
            log.info("throttled accounts released host=%s accounts=%d limit=%d", host.hostname, len(dids), limit)
        return dids

    def list_takedowns(self, cursor: int = 0, limit: int = TAKEDOWN_PAGE) -> tuple[list[str], int]:
        """Taken-down DIDs after ``cursor``, and the next cursor (0 at the end)."""
        with self.db.connection_context():
            rows = list_takedowns(self.db, after_uid=cursor, limit=limit)
        return [did for _, did in rows], (rows[-1][0] if len(rows) == limit else 0)

    def account_status(self, did: object) -> str | None:
        with self.db.connection_context():
            row = load_account(self.db, check_did(did))
        return row.status if row else None

    # -- repo mirror -----------------------------------------------------------------------------
    def _mirror(self) -> Any:
        if self.supervisor.carstore is None:
            raise ControlError("MethodNotImplemented", "the repo mirror is disabled", 501)
        ref = self.supervisor.mirror.ref
        if ref is None:
            raise ControlError("ServiceUnavailable", "the repo mirror is restarting; try again", 503)
        return ref

    def _known(self, did: object) -> str:
        did = check_did(did)
        with self.db.connection_context():
            if load_account(self.db, did) is None:
                raise ControlError("RepoNotFound", f"account {did} is not known to this relay", 404)
        return did

    def resync(self, did: object) -> None:
        """Fetch the account's repo again from its PDS (queued)."""
        checked = check_did(did)
        self._mirror()
        self.supervisor.mirror.tell(RequestResync(checked, "admin"))
        log.info("admin requested resync did=%s", checked)

    def reset(self, did: object) -> None:
        """Delete the mirrored repo and fetch it again."""
        checked = self._known(did)
        self._mirror().ask(ResetRepo(checked), timeout=ASK_TIMEOUT_SECONDS)
        log.info("admin reset repo did=%s", checked)

    def compact(self, did: object) -> dict[str, Any]:
        checked = self._known(did)
        stats = self._mirror().ask(CompactRepo(checked), timeout=ASK_TIMEOUT_SECONDS)
        if stats is None:
            raise ControlError("RepoBusy", "no mirrored repo to compact now (absent or being fetched)", 409)
        return dataclasses.asdict(stats)

    def verify(self, did: object) -> dict[str, Any]:
        """Check the mirrored repo: signature with the current key, every block, the whole MST."""
        checked = self._known(did)
        self._mirror()
        store = self.supervisor.carstore
        car = off_loop(lambda: store.repo_car(checked))
        if car is None:
            raise ControlError("RepoNotFound", f"the relay holds no copy of repo {checked} yet", 404)
        try:
            key = load_did_key(self.supervisor.directory.resolve(checked).signing_key or "")
        except (InvalidKey, ProtocolError) as exc:
            raise ControlError("IdentityUnavailable", f"no usable signing key: {exc}", 409) from None
        except Exception as exc:  # identity lookups fail in many ways; none is the client's doing
            raise ControlError("IdentityUnavailable", f"identity lookup failed: {type(exc).__name__}", 409) from None
        try:
            repo = off_loop(lambda: verify_repo(car, checked, key))
        except ProtocolError as exc:
            return {"success": False, "did": checked, "error": exc.reason, "message": str(exc)}
        return {"success": True, "did": checked, "rev": repo.commit.rev, "records": len(repo.records)}

    def resync_host(self, raw: object) -> int:
        """Queue a re-sync of every account of the host; how many were queued."""
        row = self._host(raw)
        self._mirror()
        with self.db.connection_context():
            dids: list[str] = []
            while True:
                page = host_account_dids(self.db, row.id, after_did=dids[-1] if dids else "")
                if not page:
                    break
                dids.extend(page)
        for did in dids:
            self.supervisor.mirror.tell(RequestResync(did, "admin_host"))
        log.info("admin requested host resync host=%s accounts=%d", row.hostname, len(dids))
        return len(dids)
