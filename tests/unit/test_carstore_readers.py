"""Carstore readers racing compaction, replace and delete: a file unlinked under a reader is read again, never an error.

A reader lists an account's live slice rows, then opens their files. Compaction (or a replace,
or a delete) in another thread may commit and unlink those files in between; the reader must
start over from fresh rows, answer what the store now holds, and never raise
``FileNotFoundError``. Each test pauses the reader thread at that exact point (after the rows,
before the first file is opened), runs the rival in the main thread, then lets the reader go.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from protocol import mst
from protocol.car import read_car
from protocol.crypto import PrivateKey
from protocol.repo_writer import RepoWriter, Write
from store import carstore_compact, carstore_schema
from store.carstore import CarStore, CarStoreError, SliceWrite
from store.carstore_schema import SliceRow
from store.db import open_database

KEY = PrivateKey.generate("k256")
WAIT_S = 30


def post(i: int) -> Write:
    return Write("create", f"app.bsky.feed.post/{i:013d}", {"$type": "app.bsky.feed.post", "text": f"post {i}"})


def commit(writer: RepoWriter, i: int) -> SliceWrite:
    event = writer.commit([post(i)])
    blocks = list(read_car(event.blocks).blocks.items())
    return SliceWrite(writer.did, event.rev, event.since, event.commit, writer.data, blocks)


@pytest.fixture
def store(db_url: str, tmp_path: Path) -> Iterator[CarStore]:
    db = open_database(db_url)
    s = CarStore(tmp_path / "carstore", db, fsync=False)
    s.open()
    yield s
    s.close()
    close_all = getattr(db, "close_all", None)
    close_all() if close_all is not None else db.close()


class PausedReader:
    """Runs ``read()`` in a thread that stops before opening its first slice file, until ``resume()``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, read: Callable[[], Any]) -> None:
        self.paused, self.go = threading.Event(), threading.Event()
        self.first_path: str | None = None
        self.first_path_gone = False
        self.result: Any = None
        self.error: BaseException | None = None
        real = carstore_compact.read_slice

        def read_slice(root: str, row: SliceRow) -> bytes:
            if threading.current_thread() is self.thread and self.first_path is None:
                self.first_path = os.path.join(root, row.path)
                self.paused.set()
                assert self.go.wait(WAIT_S)
                self.first_path_gone = not os.path.exists(self.first_path)
            return real(root, row)

        monkeypatch.setattr(carstore_compact, "read_slice", read_slice)
        self.thread = threading.Thread(target=self._run, args=(read,), daemon=True)
        self.thread.start()
        assert self.paused.wait(WAIT_S), "the reader never reached a slice file"

    def _run(self, read: Callable[[], Any]) -> None:
        try:
            self.result = read()
        except BaseException as exc:
            self.error = exc

    def resume(self) -> Any:
        self.go.set()
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive()
        assert self.first_path_gone, "the rival did not unlink the file the reader was about to open"
        if self.error is not None:
            raise self.error
        return self.result


@pytest.mark.parametrize("read", ["load_blocks", "get_blocks", "repo_car"])
def test_a_reader_whose_files_a_compaction_unlinked_reads_the_compacted_slice(
    store: CarStore, monkeypatch: pytest.MonkeyPatch, read: str
) -> None:
    writer = RepoWriter("did:plc:reader", KEY)
    for i in range(6):
        store.write_slices([commit(writer, i)])
    want = dict(writer.blocks)
    reads: dict[str, Callable[[], Any]] = {
        "load_blocks": lambda: store.load_blocks(writer.did),
        "get_blocks": lambda: store.get_blocks(writer.did, [writer.data]),
        "repo_car": lambda: store.repo_car(writer.did),
    }
    reader = PausedReader(monkeypatch, reads[read])
    assert store.compact(writer.did).compacted  # commits the swap and unlinks every pack the reader listed
    out = reader.resume()
    if read == "load_blocks":
        assert dict(mst.walk(out, writer.data)) == writer.records
    elif read == "get_blocks":
        assert out == {writer.data: want[writer.data]}
    else:
        car = read_car(out, max_blocks=1 << 20)
        assert list(car.roots) == [writer.commit_cid] and dict(mst.walk(car.blocks, writer.data)) == writer.records


@pytest.mark.parametrize("rival", ["replace", "delete"])
def test_a_reader_whose_files_a_replace_or_delete_unlinked_reads_what_the_store_now_holds(
    store: CarStore, monkeypatch: pytest.MonkeyPatch, rival: str
) -> None:
    writer = RepoWriter("did:plc:reader", KEY)
    for i in range(3):
        store.write_slices([commit(writer, i)])
    fresh = RepoWriter(writer.did, KEY)
    fresh.commit([post(99)])
    reader = PausedReader(monkeypatch, lambda: store.load_blocks(writer.did))
    if rival == "replace":
        car = read_car(fresh.repo_car(), max_blocks=1 << 20)
        assert fresh.rev is not None and fresh.commit_cid is not None
        store.replace_repo(
            SliceWrite(fresh.did, fresh.rev, None, fresh.commit_cid, fresh.data, list(car.blocks.items()))
        )
        assert dict(mst.walk(reader.resume(), fresh.data)) == fresh.records
    else:
        store.delete_repo(writer.did)
        assert reader.resume() == {}


def test_a_reader_that_keeps_losing_the_race_gets_a_carstore_error(
    store: CarStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = RepoWriter("did:plc:loser", KEY)
    store.write_slices([commit(writer, 0)])
    real = carstore_compact.read_slice
    n = 0

    def gone_each_time(root: str, row: SliceRow) -> bytes:
        nonlocal n
        n += 1
        monkeypatch.setattr(carstore_compact, "read_slice", real)
        store.write_slices([commit(writer, n)])  # the rows change before every retry
        monkeypatch.setattr(carstore_compact, "read_slice", gone_each_time)
        raise FileNotFoundError(row.path)

    monkeypatch.setattr(carstore_compact, "read_slice", gone_each_time)
    with pytest.raises(CarStoreError, match="kept changing"):
        store.load_blocks(writer.did)
    assert n == carstore_compact._READ_ATTEMPTS


def test_a_live_slice_whose_file_is_gone_is_reported_at_once(store: CarStore, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = RepoWriter("did:plc:damaged", KEY)
    store.write_slices([commit(writer, 0)])
    store.write_slices([commit(writer, 1)])
    path = carstore_schema.live_slices(store._db, writer.did)[-1].path  # the second batch's pack, its alone
    os.unlink(store.directory / "slices" / path)  # a damaged mirror: no writer will change the rows
    real = carstore_schema.live_slices
    calls = 0

    def counted(db: Any, did: str) -> list[SliceRow]:
        nonlocal calls
        calls += 1
        return real(db, did)

    monkeypatch.setattr(carstore_schema, "live_slices", counted)
    with pytest.raises(CarStoreError, match="is missing"):
        store.load_blocks(writer.did)
    assert calls == 2
