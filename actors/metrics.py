"""Prometheus metrics of the ingest spine (subscribers, verification, sequencer)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram

EVENTS_RECEIVED = Counter("skyrelay_events_received_total", "Upstream frames received", ["type"])
EVENTS_ACCEPTED = Counter("skyrelay_events_accepted_total", "Upstream events verified and sequenced", ["type"])
EVENTS_DROPPED = Counter(
    "skyrelay_events_dropped_total", "Upstream events dropped, by host and reason", ["host", "reason"]
)
SEQUENCER_DROPPED = Counter(
    "skyrelay_sequencer_dropped_total", "Verified events the sequencer refused (cross-host rev order)", ["reason"]
)
VERIFY_WARNINGS = Counter(
    "skyrelay_verify_warnings_total", "Events accepted in lenient mode despite a failed check", ["host", "reason"]
)
MOVED_HINTS_DROPPED = Counter(
    "skyrelay_ingest_moved_hints_dropped_total", "wrong_host DIDs an ingest worker dropped before sending them on"
)
ACCOUNTS_RESYNC = Counter("skyrelay_accounts_marked_resync_total", "Accounts marked for re-sync after a gap")
SEQUENCED_BATCH = Histogram(
    "skyrelay_sequencer_batch_events", "Events per durable batch", buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
)
INGEST_TO_DURABLE = Histogram(
    "skyrelay_ingest_to_durable_seconds",
    "From frame receipt to durable in the output log",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
)
# multiprocess_mode matters only with ingest workers (prometheus_client multiprocess mode)
LAST_SEQ = Gauge("skyrelay_last_seq", "Highest relay seq in the output log", multiprocess_mode="max")
HOSTS_AT_ACCOUNT_LIMIT = Gauge(
    "skyrelay_hosts_at_account_limit",
    "Hosts with as many accounts as their limit (new ones are throttled)",
    multiprocess_mode="max",
)
UPSTREAM_CONNECTED = Gauge(
    "skyrelay_upstream_hosts_connected", "Upstream hosts with an open firehose", multiprocess_mode="livesum"
)
UPSTREAM_RECONNECTS = Counter("skyrelay_upstream_reconnects_total", "Upstream websocket reconnects", ["reason"])
CHILD_RESTARTS = Counter("skyrelay_actor_restarts_total", "Supervised actor restarts", ["kind"])
INFRA_RETRIES = Counter(
    "skyrelay_infrastructure_retries_total", "Failed database or disk operations retried, by operation", ["operation"]
)
INFRA_FAILING = Gauge(
    "skyrelay_infrastructure_failing",
    "Operations failing right now and being retried (database or disk trouble), by operation",
    ["operation"],
    multiprocess_mode="livesum",
)


def observe_many(histogram: Histogram, amounts: Iterable[float]) -> None:
    """``histogram.observe(a)`` for each of ``amounts``, with one write per bucket touched.

    In multiprocess mode every observe is two writes to a shared file; a batch of events adds
    each bucket's count once. Reaches into prometheus_client's unlabelled histogram (its
    ``_upper_bounds``, ``_buckets`` and ``_sum``); falls back to ``observe`` if they change.
    """
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total_value = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total_value is None or len(bounds) != len(buckets):
        for amount in amounts:
            histogram.observe(amount)
        return
    counts = [0] * len(bounds)
    total = 0.0
    seen = False
    for amount in amounts:
        if amount == amount:  # not NaN: a NaN goes to no bucket, as in observe
            counts[bisect_left(bounds, amount)] += 1  # the first bound >= amount (the last is +Inf)
        total += amount
        seen = True
    if not seen:
        return
    total_value.inc(total)
    for bucket, count in zip(buckets, counts, strict=True):
        if count:
            bucket.inc(count)
