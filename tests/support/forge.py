"""Forged upstream events for tests: each breaks exactly one thing a relay must check."""

from __future__ import annotations

import dataclasses
import time

import libipld

from protocol.car import read_car, write_car
from protocol.cid import cid_for_dag_cbor
from protocol.commit import encode_commit
from protocol.crypto import PrivateKey
from protocol.frames import CommitEvent
from protocol.repo_writer import RepoWriter, Write
from protocol.syntax import make_tid

N_K256 = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
N_P256 = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def bad_signature(writer: RepoWriter, writes: list[Write], seq: int) -> CommitEvent:
    """The next commit of ``writer``'s repo, signed by a stranger's key (writer is unchanged)."""
    forger = RepoWriter(writer.did, PrivateKey.generate("k256"))
    forger.blocks, forger.data, forger.records = dict(writer.blocks), writer.data, dict(writer.records)
    forger.rev, forger.commit_cid = writer.rev, writer.commit_cid
    return forger.commit(writes, seq)


def high_s(event: CommitEvent, curve: str = "k256") -> CommitEvent:
    """The same commit with its signature's s replaced by n - s (valid maths, not low-S)."""
    car = read_car(event.blocks)
    commit = libipld.decode_dag_cbor(car.blocks[event.commit])
    order = N_K256 if curve == "k256" else N_P256
    r, s = commit["sig"][:32], int.from_bytes(commit["sig"][32:], "big")
    high = r + (order - s).to_bytes(32, "big")
    block = encode_commit(commit["did"], commit["data"], commit["rev"], commit.get("prev"), lambda _u: high)
    cid = cid_for_dag_cbor(block)
    blocks = {cid: block, **{k: v for k, v in car.blocks.items() if k != event.commit}}
    return dataclasses.replace(event, commit=cid, blocks=write_car([cid], blocks.items()))


def broken_prev_data(event: CommitEvent) -> CommitEvent:
    return dataclasses.replace(event, prev_data=cid_for_dag_cbor(b"\xa0"))


def tampered_block(event: CommitEvent) -> CommitEvent:
    """A record block whose bytes no longer hash to its CID."""
    car = read_car(event.blocks)
    record_cid = next(op.cid for op in event.ops if op.cid is not None)
    blocks = dict(car.blocks)
    original = blocks[record_cid]
    blocks[record_cid] = original[:-1] + bytes([original[-1] ^ 0x01])
    return dataclasses.replace(event, blocks=write_car(car.roots, blocks.items()))


def future_rev_commit(writer: RepoWriter, writes: list[Write], seq: int, seconds_ahead: float = 3600) -> CommitEvent:
    """A correctly signed commit whose rev is ``seconds_ahead`` in the future (advances ``writer``)."""
    rev = make_tid(int((time.time() + seconds_ahead) * 1_000_000), 0)
    return writer.commit(writes, seq, rev=rev)
