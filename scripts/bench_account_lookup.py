"""Micro-benchmark of account and identity look-ups on a table of a million known accounts.

    python scripts/bench_account_lookup.py [--accounts 1000000] [--database-url URL] [--lookups 20000]
        [--concurrency 64] [--sqlite-file PATH]

Under gevent (patched as ``skyrelay serve`` is), against accounts seeded as
``bench_realistic.py --known-accounts`` seeds them (SQLite in a temporary folder, or a fresh
schema of ``--database-url``; ``--sqlite-file`` reuses a seeded file). Printed, in µs per
look-up: cache hits; misses one at a time, the old way (one query on the event loop, a
connection opened per look-up) and batched (a lone miss waits out the 1 ms gather window);
``--concurrency`` greenlets missing at once (as many hosts' verification greenlets do), with
the SQL round trips they cost; the same for identities and for the mirror's heads. Then the
memory one cached account and one cached identity take (tracemalloc).
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from collections import OrderedDict  # noqa: E402
from collections.abc import Callable  # noqa: E402
from contextlib import ExitStack  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from actors import batch_lookup  # noqa: E402
from actors.accounts import AccountCache, AccountState  # noqa: E402
from actors.batch_lookup import BatchLookup  # noqa: E402
from actors.blocking import off_loop  # noqa: E402
from actors.identity import IdentityDirectory  # noqa: E402
from scripts.benchkit.relays import fresh_database_url  # noqa: E402
from scripts.benchkit.seed import seed_known_accounts, synthetic_did  # noqa: E402
from store.accounts import load_accounts  # noqa: E402
from store.carstore import CarStore  # noqa: E402
from store.db import open_database  # noqa: E402


def timed(label: str, count: int, fn: Callable[[], object], note: Callable[[], str] = str) -> float:
    started = time.perf_counter()
    fn()
    took = time.perf_counter() - started
    per = took / count * 1e6
    print(f"  {label:<54} {per:9.1f} µs/lookup  ({count:,} in {took:.2f} s){note()}", flush=True)
    return per


def concurrently(n: int, dids: list[str], get: Callable[[str], object]) -> None:
    parts = [dids[i::n] for i in range(n)]
    greenlets = [gevent.spawn(lambda part=part: [get(d) for d in part]) for part in parts]
    gevent.joinall(greenlets, raise_error=True)


def sample(accounts: int, count: int, rng: random.Random) -> list[str]:
    return [synthetic_did(i) for i in rng.sample(range(accounts), count)]


def memory_per_entry(fill: Callable[[], int]) -> float:
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    kept = fill()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) / kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--accounts", type=int, default=1_000_000, help="accounts in the table (default 1,000,000)")
    parser.add_argument("--database-url", default="", help="PostgreSQL URL (a fresh schema); default SQLite")
    parser.add_argument("--lookups", type=int, default=20_000, help="look-ups per measurement (default 20,000)")
    parser.add_argument("--concurrency", type=int, default=64, help="greenlets missing at once (default 64)")
    parser.add_argument(
        "--gather-ms", type=float, default=0.0, help="the batch gather window (default 0: one turn of the loop)"
    )
    parser.add_argument("--sqlite-file", type=Path, help="a SQLite file seeded by an earlier run (kept)")
    a = parser.parse_args(argv)
    rng = random.Random(7)
    batch_lookup.GATHER_SECONDS = a.gather_ms / 1000
    n, count = a.accounts, a.lookups
    with ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="skyrelay-lookup-"))
        stack.callback(shutil.rmtree, work, True)
        if a.sqlite_file is not None and a.sqlite_file.exists():
            url = f"sqlite:///{a.sqlite_file}"
            carstore_url = f"sqlite:///{a.sqlite_file.with_suffix('.carstore')}"
        else:
            url = fresh_database_url(a.database_url, work, stack, False)
            if a.sqlite_file is not None:
                url = f"sqlite:///{a.sqlite_file}"
            carstore_url = (
                f"sqlite:///{a.sqlite_file.with_suffix('.carstore')}" if a.sqlite_file else f"sqlite:///{work / 'c.db'}"
            )
            took = seed_known_accounts(url, carstore_url, work / "repos", n, [])
            print(f"seeded {n:,} accounts in {took:.1f} s", flush=True)
        kind = "PostgreSQL" if a.database_url else "SQLite"
        print(f"account look-ups on {n:,} known accounts, {kind}, gevent (as the relay runs):", flush=True)
        db = open_database(url)

        cache = AccountCache(db, max_entries=count)
        hot = sample(n, count, rng)
        with db.connection_context():
            rows = load_accounts(db, hot)
        for row in rows.values():
            cache.put(AccountState.from_row(row))
        timed("hit (in memory)", count, lambda: [cache.get(d) for d in hot])

        singles = sample(n, min(count, 2000), rng)
        old = BatchLookup(db, load_accounts, batching=False)
        timed("miss, one query each on the event loop (before)", len(singles), lambda: [old.get(d) for d in singles])
        lone = AccountCache(db)
        few = singles[:300]
        timed("miss, alone (waits out the gather window)", len(few), lambda: [lone.get(d) for d in few])

        for c in (a.concurrency, 8):
            batched = AccountCache(db)
            dids = sample(n, count, rng)
            lookup = batched._lookup
            timed(f"miss, {c} greenlets at once (batched)", count,
                  lambda b=batched, d=dids, c=c: concurrently(c, d, b.get),
                  lambda q=lookup: f", {q.queries:,} queries")  # fmt: skip
            dids = sample(n, count, rng)
            unbatched = AccountCache(db, batching=False)
            timed(f"miss, {c} greenlets at once (one query each, before)", count,
                  lambda u=unbatched, d=dids, c=c: concurrently(c, d, u.get))  # fmt: skip

        directory = IdentityDirectory(db, plc_url="http://127.0.0.1:9", allow_insecure_hosts=True)
        dids = sample(n, count, rng)
        queries = directory._lookup
        timed(f"identity miss, {a.concurrency} greenlets at once (batched)", count,
              lambda: concurrently(a.concurrency, dids, directory.resolve),
              lambda: f", {queries.queries:,} queries")  # type: ignore[union-attr]  # fmt: skip

        cdb = open_database(carstore_url)
        store = CarStore(work / "repos", cdb)
        store.open()
        stack.callback(store.close)
        heads = sample(n, 5000, rng)
        timed("mirror head, one query each in the pool (before)", len(heads),
              lambda: [off_loop(lambda d=d: store.head(d)) for d in heads])  # fmt: skip
        heads = sample(n, 5000, rng)
        timed(
            "mirror heads, 500 a query in the pool",
            len(heads),
            lambda: [off_loop(lambda i=i: store.heads(heads[i : i + 500])) for i in range(0, 5000, 500)],
        )

        def fill_accounts() -> int:
            fresh = AccountCache(db, max_entries=count)
            with db.connection_context():
                loaded = load_accounts(db, sample(n, count, rng))
            for row in loaded.values():
                fresh.put(AccountState.from_row(row))
            del loaded
            fill_accounts.keep = fresh  # type: ignore[attr-defined]
            return len(fresh)

        def fill_identities() -> int:
            fresh = IdentityDirectory(db, plc_url="http://127.0.0.1:9", allow_insecure_hosts=True)
            for d in sample(n, 5000, rng):
                fresh.resolve(d)
            fill_identities.keep = fresh  # type: ignore[attr-defined]
            return len(fresh)

        def fill_heads() -> int:
            kept: OrderedDict[str, str] = OrderedDict()
            for _ in range(0, count, 500):
                for did, head in store.heads(sample(n, 500, rng)).items():
                    kept[did] = head.rev
            fill_heads.keep = kept  # type: ignore[attr-defined]
            return len(kept)

        print(f"  memory per cached account  {memory_per_entry(fill_accounts):6.0f} bytes", flush=True)
        print(f"  memory per mirror head     {memory_per_entry(fill_heads):6.0f} bytes", flush=True)
        print(f"  memory per cached identity {memory_per_entry(fill_identities):6.0f} bytes", flush=True)
        db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
