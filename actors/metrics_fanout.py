"""Prometheus metrics of a fan-out node: its upstream connection, lag, drops, gaps and refused consumers."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

UPSTREAM_CONNECTED = Gauge("skyrelay_fanout_upstream_connected", "1 while the fan-out node's upstream firehose is open")
UPSTREAM_RECONNECTS = Counter(
    "skyrelay_fanout_upstream_reconnects_total", "Upstream firehose connections ended, by reason", ["reason"]
)
FRAMES_DROPPED = Counter(
    "skyrelay_fanout_frames_dropped_total", "Upstream frames dropped by the fan-out node, by reason", ["reason"]
)
EVENTS_STORED = Counter("skyrelay_fanout_events_stored_total", "Upstream events appended to the node's log")
OUTDATED_CURSOR = Counter(
    "skyrelay_fanout_outdated_cursor_total", "Times the upstream said the node's cursor was older than its log"
)
GAPS = Counter("skyrelay_fanout_gaps_total", "Holes recorded in the node's log (events pruned upstream first)")
GAP_SEQS = Counter("skyrelay_fanout_gap_seqs_total", "Upstream seqs skipped over by recorded holes")
LAG_SEQS = Gauge("skyrelay_fanout_upstream_lag_seqs", "Upstream newest seq minus the node's newest (NaN: unknown)")
LAG_SECONDS = Gauge(
    "skyrelay_fanout_upstream_lag_seconds", "Age of the node's newest event (its time field); 0 when caught up"
)
CONSUMERS_REFUSED = Counter(
    "skyrelay_fanout_consumers_refused_total", "Firehose connections refused at the consumer limit"
)
