"""Benchmark Sync 1.1 operation inversion: single-op commits on a tree of ~10,000 keys.

Prepares commits the way a PDS sends them (the ops, the new tree's root, and only the blocks
a commit carries: the nodes new in the new tree plus the covering proof of the touched keys),
then times ``invert_ops`` over them and prints inversions per second. Usage:
``python scripts/bench_mst.py [--keys 10000] [--commits 2000] [--rounds 7]``.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time

from protocol import mst
from protocol.cid import cid_for_dag_cbor
from protocol.mst import Op

Commit = tuple[bytes, list[Op], dict[bytes, bytes], bytes]


def _tid(rng: random.Random) -> str:
    alphabet = "234567abcdefghijklmnopqrstuvwxyz"
    return "3" + "".join(rng.choice(alphabet) for _ in range(12))


def prepare(n_keys: int, n_commits: int, seed: int) -> tuple[list[Commit], float]:
    """Single-op commits (create/update/delete mix) against one tree; and mean blocks carried."""
    rng = random.Random(seed)
    collections = ["app.bsky.feed.post", "app.bsky.feed.like", "app.bsky.graph.follow"]
    values = [cid_for_dag_cbor(rng.randbytes(40)) for _ in range(64)]
    records = {f"{rng.choice(collections)}/{_tid(rng)}": rng.choice(values) for _ in range(n_keys)}
    root, blocks = mst.build(records)
    paths = list(records)
    commits: list[Commit] = []
    for _ in range(n_commits):
        roll = rng.random()
        if roll < 0.6:
            op = Op("create", f"{rng.choice(collections)}/{_tid(rng)}", rng.choice(values))
        elif roll < 0.8:
            path = rng.choice(paths)
            op = Op("update", path, rng.choice(values), records[path])
        else:
            path = rng.choice(paths)
            op = Op("delete", path, None, records[path])
        new_root, new_blocks = mst.apply(blocks, root, [op])
        everything = {**blocks, **new_blocks}
        carried = dict(new_blocks)
        for cid in mst.proof_blocks(everything, new_root, [op.path]):
            carried[cid] = everything[cid]
        commits.append((new_root, [op], carried, root))
    return commits, statistics.mean(len(c[2]) for c in commits)


def run(commits: list[Commit], rounds: int, strict: bool) -> tuple[float, float]:
    """(median, best) inversions per second over ``rounds`` passes; checks every result."""
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        for new_root, ops, carried, _ in commits:
            mst.invert_ops(new_root, ops, carried, strict=strict)
        rates.append(len(commits) / (time.perf_counter() - start))
    for new_root, ops, carried, prev_data in commits:
        assert mst.invert_ops(new_root, ops, carried, strict=strict) == prev_data
    return statistics.median(rates), max(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=10_000, help="records in the tree")
    parser.add_argument("--commits", type=int, default=2_000, help="single-op commits to invert")
    parser.add_argument("--rounds", type=int, default=7, help="timed passes (median and best reported)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    for n_keys in (args.keys, 40):  # ~7 nodes on a path, and ~3 (the typical small repo)
        commits, carried = prepare(n_keys, args.commits, args.seed)
        gc.collect()
        gc.freeze()  # as the relay does after start-up: long-lived objects out of cyclic GC passes
        for strict in (False, True):
            median, best = run(commits, args.rounds, strict)
            print(
                f"keys={n_keys:>6} strict={strict!s:<5} commits={len(commits)} "
                f"blocks_carried_mean={carried:.1f} inversions_per_s={median:,.0f} (best {best:,.0f}) "
                f"us_per_inversion={1e6 / median:.1f} (best {1e6 / best:.1f})"
            )


if __name__ == "__main__":
    main()
