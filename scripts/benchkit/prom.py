"""Prometheus text from the relay's /metrics: parse, sum by labels, estimate histogram quantiles."""

from __future__ import annotations


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (labels as the relay writes them)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            head, _, value = line.rpartition(" ")
            out[head] = float(value)
    return out


def metric_sum(metrics: dict[str, float], name: str, **labels: str) -> float:
    total = 0.0
    for head, value in metrics.items():
        if head == name or (head.startswith(name + "{") and all(f'{k}="{v}"' in head for k, v in labels.items())):
            total += value
    return total


def histogram_quantile(before: dict[str, float], after: dict[str, float], name: str, q: float) -> float | None:
    """Estimate of quantile ``q`` of what a Prometheus histogram observed between two scrapes."""
    buckets = []
    for head, value in after.items():
        if head.startswith(name + "_bucket{"):
            le = head.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), value - before.get(head, 0.0)))
    buckets.sort()
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, count
    return None


def drops_by_reason(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Every ``*_dropped_total`` series that grew between two scrapes: ``name{reason}`` -> how many more.

    Summed over every other label (the upstream host): a drop is a fault of the traffic or the relay.
    """
    out: dict[str, float] = {}
    for head, value in after.items():
        name, _, labels = head.partition("{")
        if not name.endswith("_dropped_total"):
            continue
        grew = value - before.get(head, 0.0)
        if grew <= 0:
            continue
        reason = labels.split('reason="', 1)[1].split('"', 1)[0] if 'reason="' in labels else ""
        key = f"{name}{{{reason}}}" if reason else name
        out[key] = out.get(key, 0.0) + grew
    return out
