"""Build signed repo commits and their Sync 1.1 firehose events (for tools, tests and benchmarks).

A ``RepoWriter`` holds one account's repo in memory (every block), applies record writes to
its MST, signs each commit, and produces the ``#commit`` event a PDS would emit: the commit
block, the new MST nodes, the new records and the covering proof needed to invert the ops.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import libipld

from protocol.car import write_car
from protocol.cid import cid_for_dag_cbor
from protocol.commit import encode_commit
from protocol.crypto import PrivateKey
from protocol.frames import CommitEvent, RepoOp, SyncEvent
from protocol.mst import EMPTY_NODE_CID, Op, apply, build, proof_blocks
from protocol.syntax import make_tid


@dataclass(frozen=True, slots=True)
class Write:
    action: str  # create, update, delete
    path: str  # collection/rkey
    record: dict[str, Any] | None = None


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class RepoWriter:
    def __init__(self, did: str, key: PrivateKey, *, clock_us: Callable[[], int] | None = None) -> None:
        self.did = did
        self.key = key
        self._clock_us = clock_us or (lambda: time.time_ns() // 1000)
        root, nodes = build({})
        self.blocks: dict[bytes, bytes] = dict(nodes)
        self.data: bytes = root
        self.records: dict[str, bytes] = {}
        self.rev: str | None = None
        self.commit_cid: bytes | None = None
        self._last_us = 0

    def _next_rev(self) -> str:
        us = max(self._clock_us(), self._last_us + 1)
        self._last_us = us
        return make_tid(us, 0)

    def _sign_commit(self, data: bytes, rev: str | None = None) -> tuple[bytes, bytes, str]:
        rev = rev or self._next_rev()
        block = encode_commit(self.did, data, rev, None, self.key.sign)
        cid = cid_for_dag_cbor(block)
        self.blocks[cid] = block
        return cid, block, rev

    def commit(self, writes: Sequence[Write], seq: int = 0, *, rev: str | None = None) -> CommitEvent:
        """Apply ``writes`` and return the signed ``#commit`` event (with ``prevData``)."""
        prev_data, since = self.data, self.rev
        ops: list[Op] = []
        new_blocks: dict[bytes, bytes] = {}
        for w in writes:
            prev = self.records.get(w.path)
            cid: bytes | None = None
            if w.action != "delete":
                block = libipld.encode_dag_cbor(w.record or {"$type": w.path.split("/")[0]})
                cid = cid_for_dag_cbor(block)
                new_blocks[cid] = block
                self.records[w.path] = cid
            else:
                self.records.pop(w.path, None)
            ops.append(Op(w.action, w.path, cid, prev))  # type: ignore[arg-type]
        data, nodes = apply(self.blocks, self.data, ops) if ops else (self.data, {})
        self.blocks.update(nodes)
        self.blocks.update(new_blocks)
        proof = proof_blocks(self.blocks, data, [w.path for w in writes]) if writes else {data}
        commit_cid, commit_block, new_rev = self._sign_commit(data, rev)
        carried: dict[bytes, bytes] = {commit_cid: commit_block}
        for cid in (*nodes, *proof, *new_blocks):
            carried[cid] = self.blocks[cid]
        self.data, self.rev, self.commit_cid = data, new_rev, commit_cid
        return CommitEvent(
            seq=seq,
            repo=self.did,
            commit=commit_cid,
            rev=new_rev,
            since=since,
            blocks=write_car([commit_cid], carried.items()),
            ops=tuple(RepoOp(op.action, op.path, op.cid, op.prev) for op in ops),
            blobs=(),
            time=now_iso(),
            prev_data=prev_data if since is not None else None,
        )

    def sync_event(self, seq: int = 0) -> SyncEvent:
        """A ``#sync`` event for the current commit (a CAR holding only the commit block)."""
        assert self.commit_cid is not None and self.rev is not None
        blocks = write_car([self.commit_cid], [(self.commit_cid, self.blocks[self.commit_cid])])
        return SyncEvent(seq=seq, did=self.did, blocks=blocks, rev=self.rev, time=now_iso())

    def repo_car(self) -> bytes:
        """The whole repo as ``getRepo`` would serve it: commit, every node, every record."""
        assert self.commit_cid is not None
        from protocol.mst import walk

        out: dict[bytes, bytes] = {self.commit_cid: self.blocks[self.commit_cid]}
        stack = [self.data]
        while stack:
            cid = stack.pop()
            if cid in out:
                continue
            out[cid] = self.blocks[cid]
            node = libipld.decode_dag_cbor(self.blocks[cid])
            if node.get("l"):
                stack.append(node["l"])
            stack.extend(e["t"] for e in node["e"] if e.get("t"))
        for _, value in walk(self.blocks, self.data):
            out[value] = self.blocks[value]
        if self.data == EMPTY_NODE_CID:
            out[self.data] = self.blocks[self.data]
        return write_car([self.commit_cid], out.items())
