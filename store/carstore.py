"""The repo mirror's storage: every account's blocks as CAR v1 "slices" in pack files, indexed in SQL.

A slice holds one accepted commit's blocks (root: the commit), or a whole repo from backfill,
or, after compaction, exactly the blocks its head reaches (``store.carstore_compact``). Each
slice is a complete CAR v1 at a byte range of a file; metadata lives in a database of its own
(``store.carstore_schema``). Layout under ``slices/``:

- ``packs/<yyyymmdd>/<hhmm>/<ns>.<r>.pack``: one per ``write_slices`` batch, its slices' CARs
  back to back (UTC minute directories: ~6,000 files each at 100 batches/s).
- ``ab/cd/<h>.<rev>.<r>.car``: one slice (a replaced or compacted repo) as a plain CAR file,
  ``h`` 32 hex digits of sha-256(did) (``ab``, ``cd`` its first four), ``r`` random.

A file is removed once none of its slices is live. A pack lives as long as any of its slices:
compacting an account frees its share of a pack only when the pack's other slices go too.

Crash safety: the SQL row is the commit point, and a file gets rows only once durable. A write
is (1) a committed ``car_pending`` row naming the file to come; (2) the file, created with
``O_EXCL`` at its final name (nothing reads a file without a row, so a temporary name and a
rename would add nothing), then an fsync of it and of its directory (and of the parents of
directories just made); (3) one transaction inserting the slice rows, updating ``car_repo``,
deleting the pending row. Slices are purged only after their rows are committed
``superseded``: a file none of whose rows is live is unlinked (and its directory synced), then
the superseded rows are deleted. ``open()`` finishes both: a pending row's file that no slice
row names, and files of superseded rows without live ones, are deleted (an intent killed
before its directory was made has nothing to remove). It deletes each intent before deciding:
a dead writer's last commit may still be under way on a database server (``_finish_intent``).
So after a kill -9 at any point every account reads back at its last acknowledged write; with
``fsync`` a SQLite metadata database runs ``synchronous=FULL`` so that holds across power loss
too.

Concurrency: one ``CarStore`` per directory (a ``flock``), any number of threads or greenlets
using it. ``compact`` reads and writes outside any transaction, then swaps metadata in one
short one replacing only the slices it read; readers retry when a file goes meanwhile.
Transactions that supersede an account's slices (compact, replace, delete) write its
``car_repo`` row first: on PostgreSQL that row lock orders them, so a replace or delete waiting
on a compaction then sees (and supersedes) the slice that compaction inserted. File
I/O and fsync block the calling thread: under gevent call these in the thread pool.
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
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import peewee

from protocol.car import write_car
from store import carstore_schema as q
from store.carstore_compact import CompactStats, assemble_repo_car, blocks_of, compact_account, find_blocks, read_live
from store.carstore_index import BlockReader, IndexCache
from store.carstore_schema import KIND_COMMIT, KIND_FULL, CarStoreError, RepoHead, SliceRow, SliceWrite
from store.carstore_stream import RepoStream, open_stream
from store.migrations import apply_migrations

__all__ = ["CarStore", "CarStoreError", "CompactStats", "RepoHead", "RepoStream", "SliceWrite"]

T = TypeVar("T")

log = logging.getLogger(__name__)

_REV_RE = re.compile(r"[A-Za-z0-9]{1,64}")
_PACKS = "packs"  # under slices/; never a two-hex-digit shard name
_MAX_KNOWN_DIRS = 200_000  # directories known durable (65,536 shards + pack minutes), then forgotten


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
        """``fsync=False`` skips every sync (tests, benchmarks).

        ``sync_method``: ``auto`` and ``fsync`` fsync the file written and its directory;
        ``syncfs`` (Linux) flushes the whole filesystem instead (slower: it flushes everything).
        """
        self._syncfs = _load_syncfs() if sync_method == "syncfs" else None
        if sync_method not in ("auto", "fsync") and self._syncfs is None:
            raise ValueError(f"sync_method must be auto, syncfs (on Linux) or fsync, not {sync_method!r}")
        self.directory = Path(directory)
        self._db = db
        self._fsync = fsync
        self._root = str(self.directory / "slices")
        self._root_fd = -1
        self._lock_fd = -1
        self._dirs_ok = {self._root}  # directories whose entries are known durable
        self._indexes = IndexCache()  # where each block of recently read accounts lies (reads)

    # -- open and close --------------------------------------------------------------------

    def open(self) -> None:
        """Lock the directory, migrate the metadata database, finish what a crash interrupted."""
        if self._lock_fd >= 0:
            raise CarStoreError("carstore is already open")
        os.makedirs(self._root, exist_ok=True)
        if self._fsync:
            self._fsync_dir(str(self.directory))  # the root's entry
        fd = os.open(self.directory / "LOCK", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CarStoreError(f"carstore directory {self.directory} is in use by another process") from None
        self._lock_fd = fd
        try:
            self._root_fd = os.open(self._root, os.O_RDONLY | os.O_CLOEXEC)
            apply_migrations(self._db, q.CARSTORE_MIGRATIONS, table=q.VERSION_TABLE)
            if self._fsync and isinstance(self._db, peewee.SqliteDatabase):
                self._db.pragma("synchronous", "full", permanent=True)
            self._recover()
        except BaseException:
            self.close()
            raise

    def _recover(self) -> None:
        orphans = sum(
            self._finish_intent(token, [rel for _, rel in entries]) for token, entries in q.load_pending(self._db)
        )
        dead = q.superseded_slices(self._db)
        files_removed = self._remove(dead)
        log.info(
            "carstore opened dir=%s orphans_removed=%d superseded_removed=%d files_removed=%d",
            self.directory,
            orphans,
            len(dead),
            files_removed,
        )

    def _finish_intent(self, token: str, files: Sequence[str]) -> int:
        """Remove a dead write's files that no slice row names, then its intent; how many files were removed.

        All in one transaction that first deletes the intent: the process that held the lock is
        gone, but its last transaction may still be committing on a database server, and it
        deletes the same row. The delete waits for it; if it committed, no row is left, its
        files are recorded and stay. Deciding from a read outside this transaction could unlink
        the file of a slice that committed just after the read (a live row with no file).
        """
        with self._db.atomic():
            if not q.delete_pending(self._db, token):
                return 0
            removed = sum(self._unlink(rel) for rel in q.unreferenced(self._db, files, live_only=False))
            # a kill after the intent, before its directory was made, left no directory to sync
            dirs = {os.path.dirname(os.path.join(self._root, rel)) for rel in files}
            self._sync({d for d in dirs if os.path.isdir(d)})  # the unlinks durable before the commit
        return removed

    def close(self) -> None:
        """Release the directory (a no-op when not open)."""
        for fd in (self._root_fd, self._lock_fd):
            if fd >= 0:
                os.close(fd)
        self._root_fd = self._lock_fd = -1

    # -- writing ---------------------------------------------------------------------------

    def write_slices(self, writes: Sequence[SliceWrite], *, mirror_seq: int | None = None) -> None:
        """Store the writes as slices of one new pack file; on return every one is durable and readable.

        One file, one fsync (and one of its directory) and one metadata transaction for the
        whole batch. Revs are not compared (the verifier does that): each account's head
        becomes its last write in the batch. ``mirror_seq``, when given, is recorded in the
        same transaction (``mirror_seq()``): the relay seq this write brings the mirror up to.
        """
        self._check_open()
        if not writes:
            if mirror_seq is not None:
                with self._db.atomic():
                    q.set_state(self._db, q.MIRROR_SEQ_KEY, str(mirror_seq))
            return
        for w in writes:
            self._check_rev(w.rev)
        rel = self._new_pack_path()
        cars = [w.car if w.car is not None else write_car([w.commit_cid], w.blocks) for w in writes]
        rows, offset = [], 0
        for w, car in zip(writes, cars, strict=True):
            rows.append(SliceRow.of(w, rel, len(car), len(w.blocks), KIND_COMMIT, offset))
            offset += len(car)
        token = self._stage(writes[0].did, rel, b"".join(cars))
        heads: dict[str, tuple[str, str, bytes, bytes, int]] = {}
        for w in writes:
            count = heads[w.did][4] + 1 if w.did in heads else 1
            heads[w.did] = (w.did, w.rev, w.commit_cid, w.data_cid, count)
        # if this transaction fails, the file stays under its pending row: open() removes it
        with self._db.atomic():
            q.insert_slices(self._db, rows)
            q.upsert_repos(self._db, list(heads.values()), reset=False)
            if mirror_seq is not None:
                q.set_state(self._db, q.MIRROR_SEQ_KEY, str(mirror_seq))
            q.delete_pending(self._db, token)

    def replace_repo(self, write: SliceWrite) -> None:
        """Make ``write`` (a whole verified repo) the account's only live data, atomically."""
        self._check_open()
        rel, data = self._new_path(write.did, write.rev), write_car([write.commit_cid], write.blocks)
        token = self._stage(write.did, rel, data)
        with self._db.atomic():
            # the account's car_repo row first: it orders this after a compaction committing now
            q.upsert_repos(self._db, [(write.did, write.rev, write.commit_cid, write.data_cid, 1)], reset=True)
            dead = q.supersede_account(self._db, write.did)
            q.insert_slices(self._db, [SliceRow.of(write, rel, len(data), len(write.blocks), KIND_FULL)])
            q.delete_pending(self._db, token)
        self._remove(dead)

    def delete_repo(self, did: str) -> None:
        """Remove the account's slices (rows and files) and its head."""
        self._check_open()
        with self._db.atomic():
            q.delete_repo_row(self._db, did)  # first, as in replace_repo
            dead = q.supersede_account(self._db, did)
        self._remove(dead)

    def compact(self, did: str) -> CompactStats:
        """Merge the account's live slices into one holding only what its head reaches (``store.carstore_compact``)."""
        self._check_open()
        return compact_account(self, did)

    # -- reading ---------------------------------------------------------------------------

    def mirror_seq(self) -> int | None:
        """The relay seq up to which the live mirror applied the event log (``None``: never recorded)."""
        value = q.get_state(self._db, q.MIRROR_SEQ_KEY)
        return None if value is None else int(value)

    def head(self, did: str) -> RepoHead | None:
        """The account's last written commit, or ``None`` when the mirror has no repo for it."""
        row = q.load_repo(self._db, did)
        return RepoHead(did, row[0], row[1], row[2]) if row else None

    def heads(self, dids: Collection[str]) -> dict[str, RepoHead]:
        """The heads of those of ``dids`` the mirror has a repo for (one query per 500 DIDs)."""
        return {did: RepoHead(did, *row) for did, row in q.load_repo_heads(self._db, list(dids)).items()}

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

    def read_repo(self, did: str, read: Callable[[Mapping[bytes, bytes]], T]) -> T:
        """``read(blocks)`` over the account's live slices, each block read from its file when asked for.

        Only the blocks ``read`` looks at are read and hash-checked (``store.carstore_index``: the
        block locations are cached per account), so a proof of one record reads a few blocks
        whatever the repo's size. Started again with fresh slices when a file went away.
        """
        self._check_open()

        def run(rows: list[SliceRow]) -> T:
            reader = BlockReader(self._root, self._indexes.index(self._root, did, rows))
            try:
                return read(reader)
            finally:
                reader.close()

        return read_live(self._db, did, run)

    def stream_repo(self, did: str) -> RepoStream | None:
        """The full repo CAR (the bytes of ``repo_car``) as a stream in bounded memory (``store.carstore_stream``)."""
        self._check_open()
        return open_stream(self, self._indexes, did)

    def repo_car(self, did: str, *, since: str | None = None) -> bytes | None:
        """The account's repo as a CAR v1 rooted at its newest commit, or ``None`` (``store.carstore_compact``)."""
        self._check_open()
        return assemble_repo_car(self, did, since)

    def accounts_needing_compaction(self, min_slices: int, limit: int = 1000) -> list[str]:
        """Accounts with at least ``min_slices`` live slices, most first (an indexed query)."""
        return q.dids_with_slices(self._db, min_slices, limit)

    def stats(self) -> dict[str, int]:
        """``files`` holding live slices, ``slices`` and ``bytes`` (live), ``superseded_files`` (superseded
        slices awaiting purge), ``accounts``."""
        return q.totals(self._db)

    # -- internals ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._lock_fd < 0:
            raise CarStoreError("carstore is not open")

    @staticmethod
    def _check_rev(rev: str) -> None:
        if not _REV_RE.fullmatch(rev):
            raise ValueError(f"slice rev {rev!r} is not a TID")

    @classmethod
    def _new_path(cls, did: str, rev: str) -> str:
        """A one-slice file's name, in the account's shard."""
        cls._check_rev(rev)
        h = hashlib.sha256(did.encode()).hexdigest()[:32]
        return f"{h[:2]}/{h[2:4]}/{h}.{rev}.{secrets.token_hex(4)}.car"

    @staticmethod
    def _new_pack_path() -> str:
        """A batch's pack name, in the directory of the current UTC minute."""
        ns = time.time_ns()
        minute = time.strftime("%Y%m%d/%H%M", time.gmtime(ns // 1_000_000_000))
        return f"{_PACKS}/{minute}/{ns:019d}.{secrets.token_hex(4)}.pack"

    def _stage(self, did: str, rel: str, data: bytes) -> str:
        """Record the intent, then create and sync the file ``rel`` (first slice's ``did``); the intent's token."""
        token = secrets.token_hex(12)
        with self._db.atomic():
            q.insert_pending(self._db, token, [(did, rel)])
        dirs: set[str] = set()
        try:
            self._write_file(rel, data, dirs)
            self._sync(dirs)
        except BaseException as exc:
            # a name clash (FileExistsError from O_EXCL) created nothing: never unlink another's file
            self._discard(token, [] if isinstance(exc, FileExistsError) else [rel])
            raise
        return token

    def _write_file(self, rel: str, data: bytes, dirs: set[str]) -> None:
        """Create ``rel`` (and missing directories) and write it; ``dirs`` gets the directories to sync."""
        path = os.path.join(self._root, rel)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        directory = os.path.dirname(path)
        if directory not in self._dirs_ok:
            self._ensure_dir(directory)
        fd = os.open(path, flags, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if self._fsync and self._syncfs is None:
                os.fsync(fd)
        finally:
            os.close(fd)
        dirs.add(directory)

    def _ensure_dir(self, directory: str) -> None:
        """Make ``directory`` (under the root) and its missing parents, each entry durable before use.

        A directory is trusted once this process has synced its parent after seeing it exist,
        whoever made it: no lock, every thread that has not seen it yet syncs it itself.
        """
        chain = []
        d = directory
        while d not in self._dirs_ok:
            chain.append(d)
            d = os.path.dirname(d)
        for d in reversed(chain):
            with contextlib.suppress(FileExistsError):
                os.mkdir(d)
            if self._fsync and self._syncfs is None:
                self._fsync_dir(os.path.dirname(d))
        if len(self._dirs_ok) > _MAX_KNOWN_DIRS:
            self._dirs_ok = {self._root}
        self._dirs_ok.update(chain)

    @staticmethod
    def _fsync_dir(directory: str) -> None:
        fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _sync(self, dirs: Collection[str]) -> None:
        """Make what was written or removed in ``dirs`` durable: an fsync of each (or one ``syncfs``)."""
        if not dirs or not self._fsync:
            return
        if self._syncfs is not None:
            if self._syncfs(self._root_fd) != 0:
                raise OSError(ctypes.get_errno(), "syncfs failed")
            return
        for d in dirs:
            self._fsync_dir(d)

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

    def _remove(self, dead: Sequence[tuple[int, str]]) -> int:
        """Purge committed-superseded slices: the files no live slice is in, then the rows; files removed.

        Called after the transaction that superseded them, so whichever caller supersedes a
        file's last live slice sees it unreferenced (a file gets no new rows once recorded).
        Best effort: ``open()`` retries.
        """
        if not dead:
            return 0
        try:
            paths = list(dict.fromkeys(rel for _, rel in dead))
            gone = q.unreferenced(self._db, paths, live_only=True)
            for rel in gone:
                self._unlink(rel)
            self._sync({os.path.dirname(os.path.join(self._root, rel)) for rel in gone})
            with self._db.atomic():
                q.delete_slices(self._db, [i for i, _ in dead])
        except Exception:
            log.warning("carstore could not remove superseded slices count=%d", len(dead), exc_info=True)
            return 0
        return len(gone)
