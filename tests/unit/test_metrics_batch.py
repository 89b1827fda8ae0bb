"""observe_many counts a batch exactly as one observe per value would."""

from __future__ import annotations

import math
import random

from prometheus_client import CollectorRegistry, Histogram

from actors.metrics import observe_many

BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.1, 1)


def samples(histogram_registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    out = {}
    for metric in histogram_registry.collect():
        for s in metric.samples:
            if s.name.endswith("_created"):
                continue
            out[(s.name, s.labels.get("le", ""))] = s.value
    return out


def test_observe_many_matches_observe_one_by_one() -> None:
    rng = random.Random(7)
    values = [rng.choice([0.0, 0.001, 0.002, 1.0, 5.0, -0.5, rng.random() * 2, math.nan]) for _ in range(500)]
    one_by_one, batched = CollectorRegistry(), CollectorRegistry()
    a = Histogram("lat_seconds", "x", buckets=BUCKETS, registry=one_by_one)
    b = Histogram("lat_seconds", "x", buckets=BUCKETS, registry=batched)
    finite = [v for v in values if not math.isnan(v)]
    for v in finite:
        a.observe(v)
    observe_many(b, finite)
    observe_many(b, [])  # nothing to add
    assert samples(one_by_one) == samples(batched)
    assert samples(batched)[("lat_seconds_bucket", "+Inf")] == len(finite)
    assert samples(batched)[("lat_seconds_bucket", "0.001")] == sum(1 for v in finite if v <= 0.001)


def test_a_nan_adds_to_the_sum_and_to_no_bucket_as_observe_does() -> None:
    one_by_one, batched = CollectorRegistry(), CollectorRegistry()
    a = Histogram("lat_seconds", "x", buckets=BUCKETS, registry=one_by_one)
    b = Histogram("lat_seconds", "x", buckets=BUCKETS, registry=batched)
    a.observe(0.5)
    a.observe(math.nan)
    observe_many(b, [0.5, math.nan])
    sa, sb = samples(one_by_one), samples(batched)
    assert math.isnan(sa[("lat_seconds_sum", "")]) and math.isnan(sb[("lat_seconds_sum", "")])
    sa.pop(("lat_seconds_sum", ""))
    sb.pop(("lat_seconds_sum", ""))
    assert sa == sb
