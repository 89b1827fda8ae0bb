"""Benchmark of protocol.crypto: signature verifications per second for K-256 and P-256.

Usage: python scripts/bench_crypto.py [--seconds 1.0] [--threads 2]

Prints, per curve, the median single-thread rate of ``PublicKey.verify`` on a ~400-byte
message (the size of an unsigned commit) with the key already loaded, the cost of parsing a
did:key (what ``load_did_key`` saves), and the aggregate rate over N threads (verification
releases the GIL, so this should scale with cores).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable

from protocol.crypto import K256, P256, Curve, PrivateKey, parse_did_key

MESSAGE = bytes(range(256)) + b"commit" * 25  # ~400 bytes, like an unsigned commit block


def rate(fn: Callable[[], object], seconds: float, samples: int = 5) -> float:
    """Median calls per second of ``fn`` over ``samples`` runs of about ``seconds`` / ``samples``."""
    rates = []
    for _ in range(samples):
        n = 0
        start = time.perf_counter()
        deadline = start + seconds / samples
        while True:
            for _ in range(50):
                fn()
            n += 50
            now = time.perf_counter()
            if now >= deadline:
                break
        rates.append(n / (now - start))
    return statistics.median(rates)


def threaded_rate(fn: Callable[[], object], seconds: float, threads: int) -> float:
    """Aggregate calls per second of ``fn`` run concurrently in ``threads`` threads."""
    counts = [0] * threads
    stop = threading.Event()

    def work(i: int) -> None:
        while not stop.is_set():
            for _ in range(50):
                fn()
            counts[i] += 50

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    start = time.perf_counter()
    for t in pool:
        t.start()
    stop.wait(seconds)
    stop.set()
    for t in pool:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


def bench(curve: Curve, seconds: float, threads: int) -> None:
    priv = PrivateKey.generate(curve)
    did_key = priv.public_key().did_key()
    pub = parse_did_key(did_key)
    sig = priv.sign(MESSAGE)
    assert pub.verify(MESSAGE, sig)

    def verify() -> bool:
        return pub.verify(MESSAGE, sig)

    single = rate(verify, seconds)
    parse = rate(lambda: parse_did_key(did_key), seconds / 2)
    multi = threaded_rate(verify, seconds, threads)
    print(
        f"{curve}: {single:>8,.0f} verifies/s ({1e6 / single:5.1f} us each), "
        f"{threads} threads {multi:>8,.0f}/s ({multi / single:.2f}x); "
        f"parse did:key {1e6 / parse:5.1f} us"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    parser.add_argument("--threads", type=int, default=2, help="threads for the concurrent run")
    args = parser.parse_args()
    for curve in (K256, P256):
        bench(curve, args.seconds, args.threads)


if __name__ == "__main__":
    main()
