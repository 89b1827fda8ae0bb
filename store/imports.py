"""Named queries for DID lists: export pages of accounts, and import jobs with their progress.

An import job is named by its client (the file it reads); ``lines`` is how many lines of the
file are stored. A chunk of lines, its new accounts, the job's accounts and counters are
written in one transaction, so a job resumes at exactly the first line not stored and a line
is never counted twice. ``import_account`` remembers what each job asked for (did, rev): the
backfill walk after a restart reads it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import peewee

from store.accounts import ACTIVE
from store.sql import execute, executemany, fetchall, fetchone, to_bytes

JOB_RUNNING = "running"  # lines still arriving
JOB_LOADED = "loaded"  # every line stored; backfills queued
JOB_VERIFIED = "verified"  # a walk after a restart found every account current


@dataclass(frozen=True, slots=True)
class ImportJob:
    id: int
    name: str
    lines: int
    imported: int
    current: int
    failed: dict[str, int]
    state: str

    def summary(self) -> dict[str, Any]:
        return {"job": self.name, "lines": self.lines, "imported": self.imported, "current": self.current,
                "failed": self.failed, "state": self.state}  # fmt: skip


_JOB = "id, name, lines, imported, current, failed, state"


def _job(r: tuple[Any, ...]) -> ImportJob:
    return ImportJob(int(r[0]), r[1], int(r[2]), int(r[3]), int(r[4]), json.loads(r[5]), r[6])


def get_job(db: peewee.Database, name: str) -> ImportJob | None:
    r = fetchone(db, f"SELECT {_JOB} FROM import_job WHERE name = ?", (name,))
    return _job(r) if r else None


def ensure_job(db: peewee.Database, name: str) -> ImportJob:
    now = time.time()
    execute(db, "INSERT INTO import_job (name, created_at, updated_at) VALUES (?, ?, ?) ON CONFLICT (name) DO NOTHING",
            (name, now, now))  # fmt: skip
    job = get_job(db, name)
    assert job is not None
    return job


def jobs_to_check(db: peewee.Database) -> list[ImportJob]:
    return [_job(r) for r in fetchall(db, f"SELECT {_JOB} FROM import_job WHERE state <> ? ORDER BY id",
                                      (JOB_VERIFIED,))]  # fmt: skip


def set_job_state(db: peewee.Database, job_id: int, state: str) -> None:
    execute(db, "UPDATE import_job SET state = ?, updated_at = ? WHERE id = ?", (state, time.time(), job_id))


def save_chunk(
    db: peewee.Database,
    job: ImportJob,
    lines: int,
    new_accounts: Sequence[tuple[str, int]],
    asked: Sequence[tuple[str, str | None]],
    counts: tuple[int, int, dict[str, int]],
) -> ImportJob:
    """Store ``lines`` more lines of ``job``: new accounts ``(did, host_id)``, the job's ``(did, rev)``, counters."""
    imported, current, failed = counts
    merged = dict(job.failed)
    for reason, n in failed.items():
        merged[reason] = merged.get(reason, 0) + n
    now = time.time()
    with db.atomic():
        ordered = sorted(new_accounts, key=lambda a: a[0])  # DID order, as every account writer: no deadlock
        executemany(db, "INSERT INTO account (did, host_id, status, upstream_status, created_at, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (did) DO NOTHING",
                    [(did, host_id, ACTIVE, ACTIVE, now, now) for did, host_id in ordered])  # fmt: skip
        executemany(db, "INSERT INTO import_account (job_id, did, rev) VALUES (?, ?, ?)"
                    " ON CONFLICT (job_id, did) DO UPDATE SET rev = excluded.rev",
                    [(job.id, did, rev) for did, rev in asked])  # fmt: skip
        execute(db, "UPDATE import_job SET lines = lines + ?, imported = imported + ?, current = current + ?,"
                " failed = ?, updated_at = ? WHERE id = ? AND lines = ?",
                (lines, imported, current, json.dumps(merged, sort_keys=True), now, job.id, job.lines))  # fmt: skip
    out = get_job(db, job.name)
    assert out is not None
    return out


def job_accounts(db: peewee.Database, job_id: int, *, after_did: str = "", limit: int = 1000) -> list[tuple[str, str]]:
    rows = fetchall(db, "SELECT did, rev FROM import_account WHERE job_id = ? AND did > ? ORDER BY did LIMIT ?",
                    (job_id, after_did, limit))  # fmt: skip
    return [(str(r[0]), r[1]) for r in rows]


def export_page(
    db: peewee.Database, *, after_did: str, limit: int, host_id: int | None, status: str | None
) -> tuple[list[tuple[str, str | None, str | None, bytes | None, str]], str | None]:
    """``(did, hostname, rev, head commit CID, status)`` by did, and the did to continue after (None: the end).

    The status shown is the relay's when it is not active, else the upstream one.
    """
    where: list[str] = ["a.did > ?"]
    params: list[Any] = [after_did]
    if host_id is not None:
        where.append("a.host_id = ?")
        params.append(host_id)
    rows = fetchall(db, "SELECT a.did, h.hostname, a.rev, a.commit_cid, a.status, a.upstream_status FROM account a"
                    f" LEFT JOIN host h ON h.id = a.host_id WHERE {' AND '.join(where)} ORDER BY a.did LIMIT ?",
                    (*params, limit))  # fmt: skip
    out = []
    for r in rows:
        shown = r[4] if r[4] != ACTIVE else r[5]
        if status is None or shown == status:
            out.append((str(r[0]), r[1], r[2], to_bytes(r[3]), shown))
    return out, (str(rows[-1][0]) if len(rows) == limit else None)
