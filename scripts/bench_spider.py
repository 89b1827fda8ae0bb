"""Benchmark of the spider's share of ingest: CPU per durable event of its hook plus its scan.

Usage: python scripts/bench_spider.py [--accounts 2000] [--batch 100] [--repeat 3] [--old-rev e9a0ec1]

Builds ``--accounts`` signed first commits (one account each, a post, a follow naming another
account and a like of its post: several DIDs per event, in the event and in its CAR's records),
wraps them as the sequencer's durable ``PersistEvent`` batches of ``--batch`` events, and
times, per event, best of ``--repeat``:

- ``hook``: ``Spider.offer_durable(batch)``, what the sequencer's flush pays;
- ``worker``: what the spider then spends on the same batch before any SQL or network: now,
  the scanner (one byte scan of the joined frames, the seen set, the DID queue); before (the
  spider of ``--old-rev``, loaded from git), decoding each frame, reading its CAR, decoding
  every block, walking the values and the DID LRU (its ``known_dids`` answered "all known").

Two cases: ``known`` (every DID met before: the steady state) and ``new`` (a fresh spider:
every DID is new). The SQL look-up of new DIDs (one query per 256 DIDs now, per event
before) and identity look-ups (rate-limited) are not counted. CPU time of this process.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import time
import types
from collections.abc import Callable
from typing import Any

from actors import spider as new_spider
from actors.accounts import AccountState
from actors.messages import PersistEvent
from protocol.crypto import PrivateKey
from protocol.frames import encode_frame
from protocol.repo_writer import RepoWriter, Write, now_iso

_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"


def plc(n: int) -> str:
    out = ""
    for _ in range(24):
        out += _ALPHABET[n % 32]
        n //= 32
    return "did:plc:" + out


def make_batches(accounts: int, batch: int) -> list[list[PersistEvent]]:
    key = PrivateKey.generate("k256")  # one key for all: signing is not what is measured
    events = []
    for n in range(accounts):
        did, other = plc(n), plc(n + 1_000_003)
        writer = RepoWriter(did, key)
        made = now_iso()
        writes = [
            Write("create", "app.bsky.feed.post/3kaaaaaaaaaa2", {"$type": "app.bsky.feed.post", "createdAt": made,
                  "text": f"post {n} mentioning nobody in particular, with some words to scan through"}),
            Write("create", "app.bsky.graph.follow/3kaaaaaaaaaa3",
                  {"$type": "app.bsky.graph.follow", "subject": other, "createdAt": made}),
            Write("create", "app.bsky.feed.like/3kaaaaaaaaaa4", {"$type": "app.bsky.feed.like", "createdAt": made,
                  "subject": {"uri": f"at://{other}/app.bsky.feed.post/3kaaaaaaaaaa2", "cid": "bafyfake"}}),
        ]  # fmt: skip
        frame = encode_frame(writer.commit(writes, n + 1), 0)
        events.append(PersistEvent(1, n + 1, "#commit", frame, AccountState(did=did, host_id=1), time.time()))
    return [events[i : i + batch] for i in range(0, len(events), batch)]


def old_module(rev: str) -> types.ModuleType:
    source = subprocess.run(["git", "show", f"{rev}:actors/spider.py"], check=True, capture_output=True).stdout
    module = types.ModuleType("old_spider")
    sys.modules["old_spider"] = module  # dataclasses look their module up
    source = source.replace(b'Counter("skyrelay_spider_steps_total"', b'Counter("bench_old_spider_steps_total"')
    exec(compile(source, "old_spider.py", "exec"), module.__dict__)  # our own file, from git
    module.known_dids = lambda db, dids: set(dids)  # "all known": stop before SQL and resolution
    return module


class _Db:
    def connection_context(self) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()


def run_new(batches: list[list[PersistEvent]], spider: Any) -> tuple[int, int]:
    hook = worker = 0
    for batch in batches:
        t0 = time.process_time_ns()
        spider.offer_durable(batch)
        t1 = time.process_time_ns()
        spider.scan_pending()
        spider._queue.clear()  # the DID worker's side (SQL, look-ups) is not measured
        hook, worker = hook + t1 - t0, worker + time.process_time_ns() - t1
    return hook, worker


def run_old(batches: list[list[PersistEvent]], spider: Any, module: types.ModuleType) -> tuple[int, int]:
    hook = worker = 0
    for batch in batches:
        t0 = time.process_time_ns()
        spider.offer_durable(batch)
        t1 = time.process_time_ns()
        while not spider._queue.empty():
            did, car, blocks = spider._queue.get_nowait()
            did, car = module.frame_did_and_car(car or b"")
            if did:
                spider.handle(did, car, blocks)
        hook, worker = hook + t1 - t0, worker + time.process_time_ns() - t1
    return hook, worker


def measure(make: Callable[[], Any], run: Callable[[Any], tuple[int, int]], warm: bool, repeat: int) -> tuple[int, int]:
    best: tuple[int, int] | None = None
    for _ in range(repeat):
        spider = make()
        if warm:
            run(spider)
        got = run(spider)
        if best is None or sum(got) < sum(best):
            best = got
    assert best is not None
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--old-rev", default="e9a0ec1")
    args = parser.parse_args()
    batches = make_batches(args.accounts, args.batch)
    events = sum(len(b) for b in batches)
    size = sum(len(e.frame) for b in batches for e in b) / events
    print(f"{events} events, {size:.0f} bytes per frame on average, batches of {args.batch}")
    old = old_module(args.old_rev)
    config = {"queue_size": 1_000_000, "lookups_per_second": 1e9}

    def make_new() -> Any:
        return new_spider.Spider(_Db(), None, lambda h: None, lambda h: None, new_spider.SpiderConfig(**config))

    def make_old() -> Any:
        return old.Spider(_Db(), None, lambda h: None, lambda h: None, old.SpiderConfig(**config))

    print(f"{'case':<8}{'version':<10}{'hook ns/event':>15}{'worker ns/event':>17}{'total':>9}")
    for case, warm in (("known", True), ("new", False)):
        for name, figures in (
            (f"old {args.old_rev}", measure(make_old, lambda s: run_old(batches, s, old), warm, args.repeat)),
            ("new", measure(make_new, lambda s: run_new(batches, s), warm, args.repeat)),
        ):
            hook, worker = (x / events for x in figures)
            print(f"{case:<8}{name:<10}{hook:>15.0f}{worker:>17.0f}{hook + worker:>9.0f}")


if __name__ == "__main__":
    main()
