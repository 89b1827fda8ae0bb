"""The control plane's DID lists: export the accounts as JSON lines, import such a list in resumable chunks.

Mixed into ``actors.relay_api.Relay``. An import is a named job fed in chunks of lines
(``import_chunk``); each chunk is checked line by line (a bad line is reported by its number
and skipped), its hosts are followed through the shared crawl checks (bans, the
new-hosts-per-day limit, the probe), and the chunk's accounts and the job's progress are
stored in one transaction before the accounts that need it are handed to the repo mirror's
backfill. A chunk that starts before the job's stored progress has its known lines skipped,
so sending a file again (after a crash, or twice) imports nothing twice. The call returns only
once the mirror's backfill queue is under its bound: the client is paced by the relay.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import gevent
from prometheus_client import Counter

from actors.control_errors import ControlError
from actors.crawl import CrawlRefused, is_banned, normalize_hostname
from actors.messages_mirror import RequestResync
from actors.mirror import queued_backfills
from protocol.cid import cid_to_str
from protocol.syntax import is_valid_did, is_valid_tid
from store.enumeration import known_dids
from store.hosts import HOST_BANNED, banned_domains, ensure_host, get_host
from store.imports import JOB_LOADED, ImportJob, ensure_job, export_page, get_job, save_chunk, set_job_state

log = logging.getLogger(__name__)
MAX_JOB_NAME = 200
IMPORT_LINES = Counter("skyrelay_import_lines_total", "DID-list lines imported, by outcome", ["outcome"])


class ImportOps:
    settings: Any
    db: Any
    supervisor: Any
    check_crawl: Callable[..., Any]
    subscribe: Callable[[str], None]

    # -- export ------------------------------------------------------------------------------------
    def export_dids(self, *, host: str | None = None, status: str | None = None) -> Iterator[str]:
        """One JSON line per account (did, host, rev, head, status), read from SQL a page at a time."""
        host_id = None
        if host:
            try:
                hostname = normalize_hostname(host, insecure=self.settings.allow_insecure_hosts).hostname
            except CrawlRefused as exc:
                raise ControlError("InvalidRequest", exc.message) from None
            with self.db.connection_context():
                row = get_host(self.db, hostname)
            if row is None:
                raise ControlError("HostNotFound", f"host {hostname} is not known to this relay", 404)
            host_id = row.id
        return self._export_lines(host_id, status)

    def _export_lines(self, host_id: int | None, status: str | None) -> Iterator[str]:
        after: str | None = ""
        while after is not None:
            with self.db.connection_context():
                rows, after = export_page(self.db, after_did=after or "", limit=1000, host_id=host_id, status=status)
            for did, where, rev, head, shown in rows:
                head_text = cid_to_str(head) if head else None
                yield json.dumps({"did": did, "host": where, "rev": rev, "head": head_text, "status": shown}) + "\n"

    # -- import ------------------------------------------------------------------------------------
    def import_status(self, name: object) -> dict[str, Any]:
        with self.db.connection_context():
            job = get_job(self.db, self._job_name(name))
        if job is None:
            return {"job": name, "lines": 0, "imported": 0, "current": 0, "failed": {}, "state": "none"}
        return job.summary()

    def _job_name(self, name: object) -> str:
        if not isinstance(name, str) or not name or len(name) > MAX_JOB_NAME:
            raise ControlError("InvalidRequest", f"job must be a name of 1 to {MAX_JOB_NAME} characters")
        return name

    def import_chunk(self, name: object, first_line: int, body: bytes, *, final: bool = False) -> dict[str, Any]:
        """Import the lines of ``body``, numbered from ``first_line`` (1-based); answer the job and the bad lines."""
        with self.db.connection_context():
            job = ensure_job(self.db, self._job_name(name))
        lines = body.decode("utf-8", "replace").split("\n")
        if lines and lines[-1] == "":
            lines.pop()  # the newline that ends the last line
        if first_line < 1 or first_line > job.lines + 1:
            raise ControlError("InvalidRequest", f"the job has {job.lines} lines: send from line {job.lines + 1}", 409)
        skip = job.lines + 1 - first_line  # lines already stored (a resend after a crash)
        lines = lines[skip:]
        if first_line == 1 and job.lines == 0 and lines:
            log.info("dids import started job=%s", job.name)
        bad: list[dict[str, Any]] = []
        parsed: list[tuple[int, str, str, str | None]] = []  # (line number, did, host, rev)
        for offset, text in enumerate(lines):
            number = job.lines + 1 + offset
            try:
                did, host, rev = _parse_line(text, self.settings.allow_insecure_hosts)
            except ValueError as exc:
                bad.append({"line": number, "reason": str(exc)})
                continue
            parsed.append((number, did, host, rev))
        job = self._store(job, len(lines), parsed, bad)
        if final:
            with self.db.connection_context():
                set_job_state(self.db, job.id, JOB_LOADED)
                job = get_job(self.db, job.name) or job
            log.info("dids import finished job=%s lines=%d imported=%d current=%d failed=%s",
                     job.name, job.lines, job.imported, job.current, job.failed)  # fmt: skip
        return {**job.summary(), "bad": bad}

    def _store(self, job: ImportJob, count: int, parsed: list[tuple[int, str, str, str | None]],
               bad: list[dict[str, Any]]) -> ImportJob:  # fmt: skip
        failed: dict[str, int] = {"bad_line": len(bad)} if bad else {}
        hosts = {host: self._follow(host) for host in dict.fromkeys(h for _, _, h, _ in parsed)}
        usable: dict[str, tuple[int, str | None]] = {}
        for _, did, host, rev in parsed:
            host_id, refused = hosts[host]
            if host_id is None:
                failed[refused] = failed.get(refused, 0) + 1
            else:
                usable[did] = (host_id, rev)
        with self.db.connection_context():
            known = known_dids(self.db, list(usable))
        mirror = self.supervisor.carstore
        backfill, current = [], 0
        for did, (_, rev) in usable.items():
            head = mirror.head(did) if mirror is not None else None
            if did in known and head is not None and (rev is None or head.rev >= rev):
                current += 1
            else:
                backfill.append(did)
        new = [(did, host_id) for did, (host_id, _) in usable.items() if did not in known]
        asked = [(did, rev) for did, (_, rev) in usable.items()]
        with self.db.connection_context():
            job = save_chunk(self.db, job, count, new, asked, (len(backfill), current, failed))
        IMPORT_LINES.labels("imported").inc(len(backfill))
        IMPORT_LINES.labels("current").inc(current)
        for reason, n in failed.items():
            IMPORT_LINES.labels("bad_line" if reason == "bad_line" else "host_refused").inc(n)
        if mirror is not None:
            for did in backfill:
                self.supervisor.mirror.tell(RequestResync(did, "import"))
            while queued_backfills() > self.settings.enumerate_max_backfill_queue:
                gevent.sleep(0.5)
        return job

    def _follow(self, hostname: str) -> tuple[int | None, str]:
        """The host's id once followed; ``(None, reason)`` when it may not be (banned, refused, unreachable)."""
        with self.db.connection_context():
            row = get_host(self.db, hostname)
            banned = is_banned(hostname, banned_domains(self.db))
        if banned or (row is not None and row.status == HOST_BANNED):
            return None, "host_banned"
        if row is None:
            try:
                self.check_crawl(hostname, public=False, new_host_limit=True)
            except CrawlRefused as exc:
                log.info("dids import host refused host=%s error=%s", hostname, exc.error)
                return None, f"host_{exc.error}"
            with self.db.connection_context():
                row = ensure_host(self.db, hostname, account_limit=self.settings.default_host_account_limit)
            self.subscribe(hostname)
        return row.id, ""


def _parse_line(text: str, insecure: bool) -> tuple[str, str, str | None]:
    """``(did, hostname, rev)`` of one exported line; ``ValueError`` naming what is wrong."""
    if len(text) > 4096:
        raise ValueError("line too long")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        raise ValueError("not JSON") from None
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    did, host, rev = doc.get("did"), doc.get("host"), doc.get("rev")
    if not isinstance(did, str) or not is_valid_did(did):
        raise ValueError("did missing or invalid")
    if rev is not None and (not isinstance(rev, str) or not is_valid_tid(rev)):
        raise ValueError("rev is not a TID")
    try:
        hostname = normalize_hostname(host, insecure=insecure).hostname
    except CrawlRefused:
        raise ValueError("host missing or invalid") from None
    return did, hostname, rev
