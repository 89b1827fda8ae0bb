"""The repo mirror's storage: every account's blocks as CAR v1 "slice" files, indexed in SQL.

A slice holds one accepted commit's blocks (root: the commit), or a whole repo from backfill,
or, after compaction, exactly the blocks its head reaches (``store.carstore_compact``).
Metadata lives in a database of its own (``store.carstore_schema``). Layout:
``slices/ab/cd/<h>.<rev>.<r>.car``, ``h`` 32 hex digits of sha-256(did) (``ab``, ``cd`` its
first four), ``r`` random: 65,536 leaf directories and none per account, so 30 million
compacted accounts are ~460 files per directory and one inode each.

Crash safety: the SQL row is the commit point, and a file gets one only once durable. A write
is (1) a committed ``car_pending`` row naming the files to come; (2) the files, created with
``O_EXCL`` at their final names (nothing reads a file without a row, so a temporary name and a
rename would add nothing); (3) one ``syncfs`` (else an fsync per file and directory touched);
(4) one transaction inserting the slice rows, updating ``car_repo``, deleting the pending row.
Files are removed only after their rows are committed ``superseded``; the rows go after the
files. ``open()`` finishes both: files of a pending row without a slice row, and superseded
rows' files, are deleted. So after a kill -9 at any point every account reads back at its last
acknowledged write; with ``fsync`` a SQLite metadata database runs ``synchronous=FULL`` so
that holds across power loss too.

Concurrency: one ``CarStore`` per directory (a ``flock``), any number of threads or greenlets
using it. ``compact`` reads and writes outside any transaction, then swaps metadata in one
short one replacing only the slices it read; readers retry when a file goes meanwhile. File
I/O and ``syncfs`` block the calling thread: under gevent call these in the thread pool.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import logging
import os
import re
import secrets
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import peewee

from protocol.car import write_car
from store import carstore_schema as q
from store.carstore_compact import CompactStats, assemble_repo_car, blocks_of, compact_account, find_blocks, read_live
from store.carstore_schema import KIND_COMMIT, KIND_FULL, CarStoreError, RepoHead, SliceRow, SliceWrite
from store.migrations import apply_migrations

__all__ = ["CarStore", "CarStoreError", "CompactStats", "RepoHead", "SliceWrite"]

log = logging.getLogger(__name__)

_REV_RE = re.compile(r"[A-Za-z0-9]{1,64}")


def _load_syncfs() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
    return fn


class CarStore:
    """Slice files plus SQL metadata for every account's repo (see the module docstring)."""

    def __init__(self, directory: Path, db: peewee.Database, *, fsync: bool = True, sync_method: str = "auto") -> None:
        """``fsync=False`` skips every sync (tests, benchmarks); ``sync_method="auto"`` uses syncfs on Linux."""
        self._syncfs = _load_syncfs() if sync_method in ("auto", "syncfs") else None
        if sync_method not in ("auto", "fsync") and self._syncfs is None:
            raise ValueError(f"sync_method must be auto, syncfs (on Linux) or fsync, not {sync_method!r}")
        self.directory = Path(directory)
        self._db = db
        self._fsync = fsync
        self._root = str(self.directory / "slices")
        self._root_fd = -1
        self._lock_fd = -1

    # -- open and close --------------------------------------------------------------------

    def open(self) -> None:
        """Lock the directory, migrate the metadata database, finish what a crash interrupted."""
        if self._lock_fd >= 0:
            raise CarStoreError("carstore is already open")
        os.makedirs(self._root, exist_ok=True)
        fd = os.open(self.directory / "LOCK", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CarStoreError(f"carstore directory {self.directory} is in use by another process") from None
        self._lock_fd = fd
        try:
            self._root_fd = os.open(self._root, os.O_RDONLY | os.O_CLOEXEC)
            q.check_own_database(self._db)
            apply_migrations(self._db, q.CARSTORE_MIGRATIONS)
            if self._fsync and isinstance(self._db, peewee.SqliteDatabase):
                self._db.pragma("synchronous", "full", permanent=True)
            self._recover()
        except BaseException:
            self.close()
            raise

    def _recover(self) -> None:
        pending = q.load_pending(self._db)
        files = [entry for _, entries in pending for entry in entries]
        orphans = sum(self._unlink(rel) for rel in q.unrecorded(self._db, files))  # rows never committed
        if pending:
            self._sync({os.path.dirname(os.path.join(self._root, rel)) for _, rel in files})
            with self._db.atomic():
                q.delete_pending(self._db, *(token for token, _ in pending))
        dead = q.superseded_slices(self._db)
        self._remove(dead)
        log.info("carstore opened dir=%s orphans_removed=%d superseded_removed=%d", self.directory, orphans, len(dead))

    def close(self) -> None:
        """Release the directory (a no-op when not open)."""
        for fd in (self._root_fd, self._lock_fd):
            if fd >= 0:
                os.close(fd)
        self._root_fd = self._lock_fd = -1

    # -- writing ---------------------------------------------------------------------------

    def write_slices(self, writes: Sequence[SliceWrite]) -> None:
        """Store each write as a slice file; on return every one is durable and readable.

        One fsync pass and one metadata transaction for the whole batch. Revs are not compared
        (the verifier does that): each account's head becomes its last write in the batch.
        """
        self._check_open()
        if not writes:
            return
        staged = [(w, self._new_path(w.did, w.rev), write_car([w.commit_cid], w.blocks)) for w in writes]
        token = self._stage([(w.did, rel, data) for w, rel, data in staged])
        heads: dict[str, tuple[str, str, bytes, bytes, int]] = {}
        for w, _, _ in staged:
            count = heads[w.did][4] + 1 if w.did in heads else 1
            heads[w.did] = (w.did, w.rev, w.commit_cid, w.data_cid, count)
        rows = [SliceRow.of(w, rel, len(data), len(w.blocks), KIND_COMMIT) for w, rel, data in staged]
        # if this transaction fails, the files stay under their pending row: open() removes them
        with self._db.atomic():
            q.insert_slices(self._db, rows)
            q.upsert_repos(self._db, list(heads.values()), reset=False)
            q.delete_pending(self._db, token)

    def replace_repo(self, write: SliceWrite) -> None:
        """Make ``write`` (a whole verified repo) the account's only live data, atomically."""
        self._check_open()
        rel, data = self._new_path(write.did, write.rev), write_car([write.commit_cid], write.blocks)
        token = self._stage([(write.did, rel, data)])
        with self._db.atomic():
            dead = q.supersede_account(self._db, write.did)
            q.insert_slices(self._db, [SliceRow.of(write, rel, len(data), len(write.blocks), KIND_FULL)])
            q.upsert_repos(self._db, [(write.did, write.rev, write.commit_cid, write.data_cid, 1)], reset=True)
            q.delete_pending(self._db, token)
        self._remove(dead)

    def delete_repo(self, did: str) -> None:
        """Remove the account's slices (rows and files) and its head."""
        self._check_open()
        with self._db.atomic():
            dead = q.supersede_account(self._db, did)
            q.delete_repo_row(self._db, did)
        self._remove(dead)

    def compact(self, did: str) -> CompactStats:
        """Merge the account's live slices into one holding only what its head reaches (``store.carstore_compact``)."""
        self._check_open()
        return compact_account(self, did)

    # -- reading ---------------------------------------------------------------------------

    def head(self, did: str) -> RepoHead | None:
        """The account's last written commit, or ``None`` when the mirror has no repo for it."""
        row = q.load_repo(self._db, did)
        return RepoHead(did, row[0], row[1], row[2]) if row else None

    def load_blocks(self, did: str, *, since: str | None = None) -> dict[bytes, bytes]:
        """Every block of the account's live slices (with ``since``: of those with rev > ``since``).

        After compaction a ``since`` older than the compacted rev gets the whole repo (a
        superset of the change). Block hashes are checked on every read.
        """
        self._check_open()
        return read_live(self._db, did, lambda rows: blocks_of(self._root, rows, since))

    def get_blocks(self, did: str, cids: Iterable[bytes]) -> dict[bytes, bytes]:
        """The requested blocks the account's live slices hold (absent ones are left out), newest slices first."""
        self._check_open()
        wanted = set(cids)
        return read_live(self._db, did, lambda rows: find_blocks(self._root, rows, wanted))

    def repo_car(self, did: str, *, since: str | None = None) -> bytes | None:
        """The account's repo as a CAR v1 rooted at its newest commit, or ``None`` (``store.carstore_compact``)."""
        self._check_open()
        return assemble_repo_car(self, did, since)

    def accounts_needing_compaction(self, min_slices: int, limit: int = 1000) -> list[str]:
        """Accounts with at least ``min_slices`` live slices, most first (an indexed query)."""
        return q.dids_with_slices(self._db, min_slices, limit)

    def stats(self) -> dict[str, int]:
        """``files``, ``bytes`` (live slices), ``superseded_files`` (awaiting removal), ``accounts``."""
        return q.totals(self._db)

    # -- internals ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._lock_fd < 0:
            raise CarStoreError("carstore is not open")

    @staticmethod
    def _new_path(did: str, rev: str) -> str:
        if not _REV_RE.fullmatch(rev):
            raise ValueError(f"slice rev {rev!r} is not a TID")
        h = hashlib.sha256(did.encode()).hexdigest()[:32]
        return f"{h[:2]}/{h[2:4]}/{h}.{rev}.{secrets.token_hex(4)}.car"

    def _stage(self, files: Sequence[tuple[str, str, bytes]]) -> str:
        """Record the intent, then create and sync the (did, path, data) files; the intent's token."""
        token = secrets.token_hex(12)
        with self._db.atomic():
            q.insert_pending(self._db, token, [(did, rel) for did, rel, _ in files])
        dirs: set[str] = set()
        try:
            for _, rel, data in files:
                self._write_file(rel, data, dirs)
            self._sync(dirs)
        except BaseException:
            self._discard(token, [rel for _, rel, _ in files])
            raise
        return token

    def _write_file(self, rel: str, data: bytes, dirs: set[str]) -> None:
        path = os.path.join(self._root, rel)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o644)
        except FileNotFoundError:
            shard = os.path.dirname(path)
            top = os.path.dirname(shard)
            if not os.path.isdir(top):
                dirs.add(self._root)  # a new first-level directory: its entry is in the root
            os.makedirs(shard, exist_ok=True)
            dirs.add(top)
            fd = os.open(path, flags, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if self._fsync and self._syncfs is None:
                os.fsync(fd)
        finally:
            os.close(fd)
        dirs.add(os.path.dirname(path))

    def _sync(self, dirs: Iterable[str]) -> None:
        """Make what was written or removed durable: one ``syncfs``, or an fsync of each of ``dirs``."""
        if self._fsync and self._syncfs is not None and self._syncfs(self._root_fd) != 0:
            raise OSError(ctypes.get_errno(), "syncfs failed")
        for d in dirs if self._fsync and self._syncfs is None else ():
            fd = os.open(d, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _unlink(self, rel: str) -> bool:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self._root, rel))
            return True
        return False

    def _discard(self, token: str, rels: Sequence[str]) -> None:
        """Undo a staged write that will not be recorded (best effort: ``open()`` finishes it)."""
        try:
            for rel in rels:
                self._unlink(rel)
            with self._db.atomic():
                q.delete_pending(self._db, token)
        except Exception:
            log.warning("carstore could not discard a staged write token=%s", token, exc_info=True)

    def _remove(self, dead: Sequence[tuple[int, str]]) -> None:
        """Delete the files of superseded slices, then their rows (best effort: ``open()`` retries)."""
        if not dead:
            return
        try:
            for _, rel in dead:
                self._unlink(rel)
            self._sync({os.path.dirname(os.path.join(self._root, rel)) for _, rel in dead})
            with self._db.atomic():
                q.delete_slices(self._db, [i for i, _ in dead])
        except Exception:
            log.warning("carstore could not remove superseded slices count=%d", len(dead), exc_info=True)
