"""The carstore's metadata database: its own migrations, the named raw-SQL queries on it, its value types.

Four tables, in the database ``CARSTORE_DATABASE_URL`` names (by default a second SQLite file;
it may be the relay's main database: the carstore records its migrations in a table of its own,
``VERSION_TABLE``):

- ``car_slice``: one row per slice: the ``byte_size`` bytes at ``byte_offset`` of the file
  ``path`` (relative to the carstore's ``slices/`` directory). A file is a pack of one batch's
  slices, or one slice at offset 0; several rows name a pack. A row with ``superseded`` true is
  to be purged (replaced, compacted away or deleted); its file is removed once no live row
  names it, before the row goes (``path`` is indexed for that question).
- ``car_repo``: one row per account with its head (the last slice written) and how many live
  slices it has (what the compaction scheduler ranks by).
- ``car_pending``: write intents. Before a write's file is created, one row lists it
  (JSON ``[[did, path], ...]``; for a pack, the did of its first slice); the transaction
  recording its slices deletes it. A row left by a crash names exactly the files that may be
  orphans: those no slice row names.
- ``car_state``: named values; ``mirror_seq`` is the relay seq up to which the live mirror has
  applied the event log (written in the same transaction as the slices of that flush).

Multi-row statements are built per batch (one statement per up to ``_CHUNK`` rows), which
costs the same on SQLite as ``executemany`` and saves a round trip per row on PostgreSQL.
Callers hold the transactions.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import peewee

from store.migrations import Migration
from store.sql import execute, fetch_in, fetchall, fetchone, insert_many, to_bytes

VERSION_TABLE = "carstore_schema_version"
CARSTORE_MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "carstore: slices, repo heads, write intents",
        (
            """CREATE TABLE car_slice (
                id {pk},
                did TEXT NOT NULL,
                rev TEXT NOT NULL,
                since TEXT,
                commit_cid {blob} NOT NULL,
                data_cid {blob} NOT NULL,
                path TEXT NOT NULL,
                byte_size BIGINT NOT NULL,
                block_count BIGINT NOT NULL,
                kind SMALLINT NOT NULL,
                superseded BOOLEAN NOT NULL DEFAULT FALSE,
                created_at {float} NOT NULL
            )""",
            "CREATE INDEX car_slice_did_idx ON car_slice (did)",
            "CREATE INDEX car_slice_superseded_idx ON car_slice (id) WHERE superseded",
            """CREATE TABLE car_repo (
                did TEXT PRIMARY KEY,
                rev TEXT NOT NULL,
                commit_cid {blob} NOT NULL,
                data_cid {blob} NOT NULL,
                slice_count BIGINT NOT NULL,
                updated_at {float} NOT NULL
            )""",
            "CREATE INDEX car_repo_slice_count_idx ON car_repo (slice_count)",
            """CREATE TABLE car_pending (
                token TEXT PRIMARY KEY,
                paths TEXT NOT NULL,
                created_at {float} NOT NULL
            )""",
        ),
    ),
    Migration(
        2,
        "carstore: slices at an offset of a pack file",
        (
            "ALTER TABLE car_slice ADD COLUMN byte_offset BIGINT NOT NULL DEFAULT 0",
            "CREATE INDEX car_slice_path_idx ON car_slice (path)",
        ),
    ),
    Migration(
        3,
        "carstore: named values (the relay seq the mirror has applied up to)",
        ("CREATE TABLE car_state (key TEXT PRIMARY KEY, value TEXT NOT NULL)",),
    ),
)
MIRROR_SEQ_KEY = "mirror_seq"

# slice kinds
KIND_COMMIT = 0  # one commit's blocks, as received
KIND_FULL = 1  # a whole repo from backfill, as received
KIND_COMPACTED = 2  # exactly the blocks reachable from its commit, in canonical order

_CHUNK = 500  # rows per multi-row statement (SQLite allows 32,766 parameters)
_SLICE_COLS = "id, did, rev, since, commit_cid, data_cid, path, byte_size, block_count, kind, byte_offset"


class CarStoreError(Exception):
    """The carstore is not open, its directory is in use, or its files keep changing under a reader."""


@dataclass(frozen=True, slots=True)
class RepoHead:
    did: str
    rev: str
    commit_cid: bytes
    data_cid: bytes


@dataclass(frozen=True, slots=True)
class SliceWrite:
    """One accepted commit's blocks (or a whole repo from backfill), already hash-checked."""

    did: str
    rev: str
    since: str | None
    commit_cid: bytes
    data_cid: bytes
    blocks: Sequence[tuple[bytes, bytes]]  # (cid, block bytes) as received
    # the same blocks as a CAR v1 rooted at commit_cid, when the caller has it (a verified
    # #commit's blocks): written as-is, no parse and re-encode; ``blocks`` may then be empty
    car: bytes | None = None


@dataclass(frozen=True, slots=True)
class SliceRow:
    id: int
    did: str
    rev: str
    since: str | None
    commit_cid: bytes
    data_cid: bytes
    path: str  # relative to the carstore's slices/ directory
    byte_size: int
    block_count: int
    kind: int
    byte_offset: int = 0  # where the slice's CAR starts in the file

    @classmethod
    def of(
        cls, w: SliceWrite, path: str, byte_size: int, block_count: int, kind: int, byte_offset: int = 0
    ) -> SliceRow:
        """A row to insert for ``w`` (the database assigns the id)."""
        return cls(0, w.did, w.rev, w.since, w.commit_cid, w.data_cid, path, byte_size, block_count, kind, byte_offset)


def _slice(r: Sequence[Any]) -> SliceRow:
    commit, data = to_bytes(r[4]), to_bytes(r[5])
    assert commit is not None and data is not None
    return SliceRow(int(r[0]), r[1], r[2], r[3], commit, data, r[6], int(r[7]), int(r[8]), int(r[9]), int(r[10]))


def _insert_many(db: peewee.Database, head: str, one: str, rows: Sequence[Sequence[Any]], tail: str = "") -> None:
    """``head VALUES one, one, ... tail``: one statement per ``_CHUNK`` rows (~1 µs a parameter in psycopg2)."""
    for start in range(0, len(rows), _CHUNK):
        chunk = rows[start : start + _CHUNK]
        params = [value for row in chunk for value in row]
        execute(db, f"{head} VALUES {', '.join([one] * len(chunk))}{tail}", params)


def insert_slices(db: peewee.Database, rows: Sequence[SliceRow]) -> None:
    """Insert live slice rows (their ``id`` is ignored: the database assigns it)."""
    _insert_many(
        db,
        "INSERT INTO car_slice (did, rev, since, commit_cid, data_cid, path, byte_offset, byte_size, block_count,"
        " kind, superseded, created_at)",
        f"(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, FALSE, {time.time()!r})",  # constants inline: fewer parameters to quote
        [
            (r.did, r.rev, r.since, r.commit_cid, r.data_cid, r.path, r.byte_offset, r.byte_size, r.block_count, r.kind)
            for r in rows
        ],
    )


def upsert_repos(db: peewee.Database, heads: Sequence[tuple[str, str, bytes, bytes, int]], *, reset: bool) -> None:
    """Set each (did, rev, commit, data, slices) head; add ``slices`` to the count, or set it with ``reset``."""
    count = "excluded.slice_count" if reset else "car_repo.slice_count + excluded.slice_count"
    _insert_many(
        db,
        "INSERT INTO car_repo (did, rev, commit_cid, data_cid, slice_count, updated_at)",
        f"(?, ?, ?, ?, ?, {time.time()!r})",
        heads,
        " ON CONFLICT (did) DO UPDATE SET rev = excluded.rev, commit_cid = excluded.commit_cid,"
        f" data_cid = excluded.data_cid, slice_count = {count}, updated_at = excluded.updated_at",
    )


def get_state(db: peewee.Database, key: str) -> str | None:
    r = fetchone(db, "SELECT value FROM car_state WHERE key = ?", (key,))
    return None if r is None else str(r[0])


def set_state(db: peewee.Database, key: str, value: str) -> None:
    execute(
        db,
        "INSERT INTO car_state (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, value),
    )


def load_repo(db: peewee.Database, did: str) -> tuple[str, bytes, bytes, int] | None:
    """(rev, commit CID, data CID, live slices) of ``did``, or ``None``."""
    r = fetchone(db, "SELECT rev, commit_cid, data_cid, slice_count FROM car_repo WHERE did = ?", (did,))
    if r is None:
        return None
    commit, data = to_bytes(r[1]), to_bytes(r[2])
    assert commit is not None and data is not None
    return r[0], commit, data, int(r[3])


def load_repo_heads(db: peewee.Database, dids: Sequence[str]) -> dict[str, tuple[str, bytes, bytes]]:
    """(rev, commit CID, data CID) of each of ``dids`` that has a repo, by DID, in bounded ``IN`` queries."""
    rows = fetch_in(db, "SELECT did, rev, commit_cid, data_cid FROM car_repo WHERE did IN ({})", dids)
    return {str(r[0]): (str(r[1]), bytes(r[2]), bytes(r[3])) for r in rows}


def insert_repo_heads(db: peewee.Database, heads: Sequence[RepoHead]) -> int:
    """Bulk-load ``car_repo`` rows without slices (a benchmark's mirrored accounts); known DIDs are left alone."""
    now = time.time()
    return insert_many(db, "INSERT INTO car_repo (did, rev, commit_cid, data_cid, slice_count, updated_at)",
                       [(h.did, h.rev, h.commit_cid, h.data_cid, 0, now) for h in heads],
                       "ON CONFLICT (did) DO NOTHING")  # fmt: skip


def live_slices(db: peewee.Database, did: str) -> list[SliceRow]:
    """The account's live slices, oldest first (by rev, then by write order)."""
    rows = fetchall(db, f"SELECT {_SLICE_COLS} FROM car_slice WHERE did = ? AND NOT superseded", (did,))
    return sorted((_slice(r) for r in rows), key=lambda s: (s.rev, s.id))


def supersede_account(db: peewee.Database, did: str) -> list[tuple[int, str]]:
    """Mark every live slice of ``did`` superseded; return (id, path) of all its superseded slices."""
    execute(db, "UPDATE car_slice SET superseded = TRUE WHERE did = ? AND NOT superseded", (did,))
    rows = fetchall(db, "SELECT id, path FROM car_slice WHERE did = ? AND superseded", (did,))
    return [(int(i), str(p)) for i, p in rows]


def supersede_slices(db: peewee.Database, ids: Sequence[int]) -> int:
    """Mark the still-live slices among ``ids`` superseded; return how many were live."""
    changed = 0
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        marks = ", ".join("?" * len(chunk))
        changed += execute(
            db, f"UPDATE car_slice SET superseded = TRUE WHERE NOT superseded AND id IN ({marks})", chunk
        )
    return changed


def delete_slices(db: peewee.Database, ids: Sequence[int]) -> None:
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        execute(db, f"DELETE FROM car_slice WHERE id IN ({', '.join('?' * len(chunk))})", chunk)


def superseded_slices(db: peewee.Database) -> list[tuple[int, str]]:
    """(id, path) of every superseded slice, to be purged (its file too when no live slice is in it)."""
    return [(int(i), str(p)) for i, p in fetchall(db, "SELECT id, path FROM car_slice WHERE superseded")]


def unreferenced(db: peewee.Database, paths: Sequence[str], *, live_only: bool) -> list[str]:
    """The ``paths`` that no slice row names (with ``live_only``: no live slice row), in order."""
    named: set[str] = set()
    cond = " AND NOT superseded" if live_only else ""
    for start in range(0, len(paths), _CHUNK):
        chunk = paths[start : start + _CHUNK]
        marks = ", ".join("?" * len(chunk))
        named.update(
            str(p) for (p,) in fetchall(db, f"SELECT DISTINCT path FROM car_slice WHERE path IN ({marks}){cond}", chunk)
        )
    return [p for p in paths if p not in named]


def adjust_slice_count(db: peewee.Database, did: str, delta: int) -> None:
    execute(
        db, "UPDATE car_repo SET slice_count = slice_count + ?, updated_at = ? WHERE did = ?", (delta, time.time(), did)
    )


def delete_repo_row(db: peewee.Database, did: str) -> None:
    execute(db, "DELETE FROM car_repo WHERE did = ?", (did,))


def dids_with_slices(db: peewee.Database, min_slices: int, limit: int) -> list[str]:
    rows = fetchall(
        db,
        "SELECT did FROM car_repo WHERE slice_count >= ? ORDER BY slice_count DESC, did LIMIT ?",
        (min_slices, limit),
    )
    return [str(d) for (d,) in rows]


def insert_pending(db: peewee.Database, token: str, files: Sequence[tuple[str, str]]) -> None:
    """Record the intent to create the (did, path) files."""
    paths = json.dumps([[did, path] for did, path in files])
    execute(db, "INSERT INTO car_pending (token, paths, created_at) VALUES (?, ?, ?)", (token, paths, time.time()))


def delete_pending(db: peewee.Database, *tokens: str) -> int:
    """Delete the intents; how many there were."""
    return sum(execute(db, "DELETE FROM car_pending WHERE token = ?", (token,)) for token in tokens)


def load_pending(db: peewee.Database) -> list[tuple[str, list[tuple[str, str]]]]:
    """Every intent left: (token, its (did, path) files)."""
    rows = fetchall(db, "SELECT token, paths FROM car_pending")
    return [(str(token), [(str(d), str(p)) for d, p in json.loads(paths)]) for token, paths in rows]


def totals(db: peewee.Database) -> dict[str, int]:
    """Live slices, their files and bytes, superseded slices awaiting purge, accounts (scans: not for hot paths)."""
    live = "FROM car_slice WHERE NOT superseded"
    n, size = fetchone(db, f"SELECT COUNT(*), COALESCE(SUM(byte_size), 0) {live}") or (0, 0)
    files = fetchone(db, f"SELECT COUNT(DISTINCT path) {live}") or (0,)
    dead = fetchone(db, "SELECT COUNT(*) FROM car_slice WHERE superseded") or (0,)
    accounts = fetchone(db, "SELECT COUNT(*) FROM car_repo") or (0,)
    return {
        "files": int(files[0]),
        "slices": int(n),
        "bytes": int(size),
        "superseded_files": int(dead[0]),
        "accounts": int(accounts[0]),
    }
