"""Print per-operation rates of the protocol hot path: frame decode, CAR parse with hash checks,
commit decode, signature verification (K-256, P-256), MST inversion, re-sequencing, and the
whole per-event verification (Verifier.check) on realistic Sync 1.1 commits.

Run: .venv/bin/python scripts/bench_protocol.py [--events N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import libipld

from actors.accounts import AccountCache
from actors.verify import HostContext, Verifier, VerifyLimits
from protocol.car import read_car
from protocol.commit import decode_commit
from protocol.crypto import PrivateKey, load_did_key
from protocol.frames import CommitEvent, decode_frame, encode_frame
from protocol.mst import invert_ops
from protocol.repo_writer import RepoWriter, Write
from store.db import open_database
from store.migrations import apply_migrations


def rate(label: str, fn: Callable[[int], None], n: int, repeats: int = 5) -> None:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(n)
        best = min(best, time.perf_counter() - start)
    per = best / n
    print(f"{label:<44} {1 / per:>12,.0f} /s {per * 1e6:>9.1f} µs")


@dataclass
class Ident:
    signing_key: str | None
    pds_endpoint: str | None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=2000, help="events per measurement")
    parser.add_argument("--repo-records", type=int, default=40, help="records in each repo before measuring")
    args = parser.parse_args()
    n = args.events

    print(f"building {n} signed commits per curve (repos of {args.repo_records} records)...")
    events: dict[str, list[CommitEvent]] = {}
    writers: dict[str, RepoWriter] = {}
    for curve in ("k256", "p256"):
        w = RepoWriter(f"did:plc:bench{curve}aaaaaaaaaaaaaaaa", PrivateKey.generate(curve))  # type: ignore[arg-type]
        w.commit([], 0)
        for i in range(args.repo_records):
            w.commit([Write("create", f"app.bsky.feed.post/2a{i:011d}", {"text": "seed"})])
        events[curve] = [
            w.commit([Write("create", f"app.bsky.feed.post/3b{i:011d}", {"text": "hello world " * 4})], i + 1)
            for i in range(n)
        ]
        writers[curve] = w
    k_events = events["k256"]
    frames = [encode_frame(e) for e in k_events]
    print(f"frame size ~{len(frames[0])} bytes, CAR ~{len(k_events[0].blocks)} bytes, "
          f"{len(read_car(k_events[0].blocks).blocks)} blocks\n")  # fmt: skip
    print(f"{'operation':<44} {'rate':>15} {'per op':>12}")

    def decode_raw(m: int) -> None:
        for f in frames[:m]:
            libipld.decode_dag_cbor_multi(f)

    def decode_typed(m: int) -> None:
        for f in frames[:m]:
            decode_frame(f)

    def car(m: int) -> None:
        for e in k_events[:m]:
            read_car(e.blocks)

    cars = [read_car(e.blocks) for e in k_events]

    def commit_decode(m: int) -> None:
        for e, c in zip(k_events[:m], cars, strict=False):
            decode_commit(c.blocks[e.commit])

    def verify(curve: str) -> Callable[[int], None]:
        evs = events[curve]
        key = load_did_key(writers[curve].key.public_key().did_key())
        commits = [decode_commit(read_car(e.blocks).blocks[e.commit]) for e in evs]

        def run(m: int) -> None:
            for c in commits[:m]:
                if not c.verify(key):
                    raise AssertionError("signature failed")

        return run

    def invert(m: int) -> None:
        for e, c in zip(k_events[:m], cars, strict=False):
            root = decode_commit(c.blocks[e.commit]).data
            if invert_ops(root, e.ops, c.blocks) != e.prev_data:
                raise AssertionError("inversion failed")

    def reseq(m: int) -> None:
        for i, e in enumerate(k_events[:m]):
            encode_frame(e, i + 1000)

    rate("frame decode (libipld, header+body)", decode_raw, n)
    rate("frame decode to typed event", decode_typed, n)
    rate("CAR parse + sha-256 of every block", car, n)
    rate("commit decode + unsigned re-encode", commit_decode, n)
    rate("signature verify K-256 (coincurve)", verify("k256"), n)
    rate("signature verify P-256 (cryptography)", verify("p256"), n)
    rate("MST inversion against prevData", invert, n)
    rate("re-sequence (encode frame with new seq)", reseq, n)

    with tempfile.TemporaryDirectory() as tmp:
        db = open_database(f"sqlite:///{tmp}/bench.sqlite")
        apply_migrations(db)
        idents = {w.did: Ident(w.key.public_key().did_key(), "https://pds.example.com") for w in writers.values()}

        class Source:
            def resolve(self, did: str) -> Ident:
                return idents[did]

            refresh = resolve

        host = HostContext(1, "pds.example.com")

        def whole(m: int) -> None:
            verifier = Verifier(Source(), AccountCache(db), VerifyLimits())
            for f in frames[:m]:
                event = decode_frame(f)
                verdict = verifier.check(event, host)  # type: ignore[arg-type]
                verifier.accounts.put(verdict.account)  # type: ignore[union-attr]

        rate("whole verification per event (decode+check)", whole, n, repeats=3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
