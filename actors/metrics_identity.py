"""Prometheus metrics of identity resolution (``actors.identity``)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

RESOLVE_RESULTS = ("hit", "sql", "fetched", "stale", "error")

RESOLVE_TOTAL = Counter(
    "skyrelay_identity_resolve_total",
    "Identity look-ups by outcome: memory hit, database row, network fetch, expired entry served, error",
    ["result"],
)
FETCH_SECONDS = Histogram(
    "skyrelay_identity_fetch_seconds",
    "Duration of DID document fetches (PLC directory or did:web host), failed ones included",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
FETCH_RESULTS = ("ok", "not_found", "invalid", "unavailable")
FETCH_TOTAL = Counter("skyrelay_identity_fetch_total", "DID document fetches by outcome", ["result"])
FETCH_SHARED_TOTAL = Counter(
    "skyrelay_identity_fetch_shared_total", "Look-ups that waited for a fetch of the same DID already under way"
)
REFRESH_LIMITED_TOTAL = Counter(
    "skyrelay_identity_refresh_limited_total", "Forced refreshes refused because the DID was fetched too recently"
)
INSECURE_ENDPOINTS_TOTAL = Counter(
    "skyrelay_identity_insecure_endpoints_total",
    "DID documents whose PDS endpoint was not https:// in production mode (the endpoint is ignored)",
)
WRITES_DROPPED_TOTAL = Counter(
    "skyrelay_identity_writes_dropped_total", "Identity rows dropped from the write-behind queue while it was full"
)

for _result in RESOLVE_RESULTS:
    RESOLVE_TOTAL.labels(_result)
for _result in FETCH_RESULTS:
    FETCH_TOTAL.labels(_result)
