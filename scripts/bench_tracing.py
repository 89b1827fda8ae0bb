"""Benchmark of the tracing hooks on the upstream-event path: per-event cost off vs on.

Usage: python scripts/bench_tracing.py [--events 1000000] [--batch 100] [--repeat 5]

Runs the exact hook sequence an upstream event meets (subscriber: sample, two stage marks,
hand-over; sequencer: durable; broadcaster: broadcast; batches of ``--batch`` events) with no
work between the hooks, and prints the best of ``--repeat`` runs per event, in nanoseconds:

- ``baseline``: the same loop with no hook at all;
- ``off``: tracing off (the shipped default): each hook is a module-global test;
- ``on, ratio R``: tracing on, sampling one event in 1/R, spans exported to an exporter that
  drops them (what the SDK costs, without the network).

"off minus baseline" is the cost tracing adds to a relay that does not trace. Compare it with
the whole per-event work (about 100 us of verification, see scripts/bench_protocol.py); run
on a quiet machine: the figures are nanoseconds and noisy under load.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from actors import tracing
from config.tracing import TracingConfig


class _Item(NamedTuple):  # the fields of PersistEvent the durable hook reads
    host_id: int
    upstream_seq: int


class _Drop(SpanExporter):
    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def run(events: int, batch_size: int, hooks: bool) -> float:
    """Seconds for ``events`` events through the hook sequence (or the bare loop)."""
    seq = 0
    started = time.perf_counter()
    for first in range(0, events, batch_size):
        batch = []
        for upstream_seq in range(first, min(events, first + batch_size)):
            if hooks:
                trace = tracing.start_event() if tracing.ENABLED else None
                if trace:
                    trace.mark()
                if trace:
                    trace.mark()
                if trace:
                    tracing.event_handed_over(trace, 1, "pds.example", upstream_seq, "#commit", "did:plc:x")
            batch.append(_Item(1, upstream_seq))
        now = time.time()
        if hooks and tracing.ENABLED:
            tracing.events_durable(batch, seq + 1, now)
        out = [(seq + 1 + i, b"") for i in range(len(batch))]
        seq += len(batch)
        if hooks and tracing.ENABLED:
            tracing.events_broadcast(out)
    return time.perf_counter() - started


def best_ns(events: int, batch: int, repeat: int, hooks: bool) -> float:
    return min(run(events, batch, hooks) for _ in range(repeat)) / events * 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    rows = [("baseline (no hooks)", best_ns(args.events, args.batch, args.repeat, hooks=False))]
    rows.append(("off (default)", best_ns(args.events, args.batch, args.repeat, hooks=True)))
    for ratio in (0.001, 0.01, 1.0):
        tracing.setup(TracingConfig(enabled=True, events_ratio=ratio), exporter=_Drop())
        try:
            rows.append((f"on, ratio {ratio:g}", best_ns(args.events, args.batch, args.repeat, hooks=True)))
        finally:
            tracing.shutdown()
    base = rows[0][1]
    print(f"{args.events} events in batches of {args.batch}, best of {args.repeat}")
    print(f"{'tracing':<22} {'ns/event':>10} {'over baseline':>14}")
    for name, ns in rows:
        print(f"{name:<22} {ns:>10.1f} {ns - base:>14.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
