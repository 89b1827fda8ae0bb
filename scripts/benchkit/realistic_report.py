"""The realistic benchmark's verdicts and printed figures: one step (one offered rate) at a time, then a summary."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

HELD_RATE_SHARE = 0.98  # delivery within 2% of the offered rate
HELD_P99_SECONDS = 1.0


@dataclass(slots=True)
class StepResult:
    """What one step measured; ``judge`` fills ``held``, ``why_not`` and ``delivered_rate``."""

    rate: float  # offered frames/s over every host
    frames: int  # frames the hosts were told to send
    commits: int  # #commit frames among them
    scheduled_seconds: float  # how long the sending takes at the offered rate
    measured_seconds: float  # from just before the sending to the last commit's arrival (or giving up)
    all_arrived: bool  # every consumer got every commit before a stall or the drain limit
    latency: dict[str, Any]  # the consumer's latency reply
    relay_cpu_seconds: float  # relay process + ingest workers, user + system
    peak_rss_kib: int  # VmHWM, relay process + ingest workers
    drops: dict[str, float]  # "metric{reason}" -> events dropped during the step
    host_lag_seconds: float  # the latest a host's last frame left, against its schedule
    commits_sent: int  # commits whose send time the hosts recorded
    consumers: int
    counters: dict[str, float] = field(default_factory=dict)  # relay counters grown during the step
    other_cores: dict[str, float] = field(default_factory=dict)  # cores used by the load and the machine
    held: bool = False
    delivered_rate: float = 0.0  # commits/s at the slowest consumer, between its first and last arrival
    why_not: list[str] = field(default_factory=list)

    @property
    def offered_commit_rate(self) -> float:
        return self.commits / self.scheduled_seconds if self.scheduled_seconds else 0.0

    @property
    def cpu_us_per_event(self) -> float:
        """Relay CPU over the events it accepted (every frame sent, when the step is held)."""
        events = self.counters.get("accepted") or self.frames
        return self.relay_cpu_seconds / max(1.0, events) * 1e6

    def quantile(self, name: str, which: str = "all") -> float | None:
        value = self.latency.get(which, {}).get(name)
        return None if value is None else float(value)

    def figures(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(offered_commit_rate=self.offered_commit_rate, cpu_us_per_event=self.cpu_us_per_event)
        return out


def judge(step: StepResult) -> None:
    """Held: every commit delivered to every consumer, at 98% of the offered rate, p99 under 1 s, no drop."""
    lat = step.latency
    rates = []
    for span in lat.get("per_connection", []):
        if span["commits"] > 1 and span["last"] > span["first"]:
            rates.append((span["commits"] - 1) / (span["last"] - span["first"]))
        else:
            rates.append(0.0)
    step.delivered_rate = min(rates, default=0.0)
    why = []
    if step.drops:
        why.append("events dropped")
    if step.commits_sent < step.commits:
        why.append(f"hosts sent {step.commits_sent:,} of {step.commits:,} commits")
    got = min((span["commits"] for span in lat.get("per_connection", [])), default=0)
    if not step.all_arrived or lat.get("frames", 0) < step.commits or got < step.commits:
        why.append(f"the slowest consumer got {got:,} of {step.commits:,} commits")
    if lat.get("unmatched"):
        why.append(f"{lat['unmatched']} commits arrived that were not sent")
    if step.delivered_rate < HELD_RATE_SHARE * step.offered_commit_rate:
        why.append(f"delivered {step.delivered_rate:,.0f} of {step.offered_commit_rate:,.0f} commits/s offered")
    p99 = step.quantile("p99")
    if p99 is None or p99 >= HELD_P99_SECONDS:
        why.append(f"p99 {_ms(p99)}")
    step.why_not = why
    step.held = not why


def print_step(step: StepResult, fixed: bool = False) -> None:
    verdict = "held" if step.held else "NOT HELD: " + "; ".join(step.why_not)
    label = "fixed rate" if fixed else "step"
    print(f"-- {label} {step.rate:,.0f} frames/s ({step.frames:,} frames, {step.commits:,} commits over "
          f"{step.scheduled_seconds:.1f} s): {verdict}")  # fmt: skip
    _row("delivered", f"{step.delivered_rate:,.0f} commits/s at the slowest consumer "
                      f"(offered {step.offered_commit_rate:,.0f})")  # fmt: skip
    _row("ingest-to-delivery", _latency(step))
    cores = step.relay_cpu_seconds / max(1e-9, step.measured_seconds)
    _row("relay CPU", f"{step.cpu_us_per_event:,.0f} µs per event ({cores:.2f} cores; relay process + ingest workers)")
    _row("relay peak RSS", f"{step.peak_rss_kib / 1024:,.0f} MiB")
    if step.other_cores:
        oc = step.other_cores
        _row("other CPU", f"frame hosts {oc['frame hosts']:.2f} + consumers {oc['consumers']:.2f} cores; machine "
                          f"busy {oc['busy']:.2f} cores in all (a busy machine makes every figure worse)")  # fmt: skip
    behind = {host: counts for host, counts in step.latency.get("per_group", {}).items() if counts[1]}
    if behind:
        listed = ", ".join(f"{host}: {sent - missing:,} of {sent:,}" for host, (sent, missing) in sorted(
            behind.items(), key=lambda item: int(item[0])))  # fmt: skip
        _row("hosts not fully delivered", f"{len(behind)} of {len(step.latency['per_group'])} (commits at "
                                          f"every consumer, by host: {listed})")  # fmt: skip
    if step.counters:
        _row("relay counters", ", ".join(f"{k} {v:,.0f}" for k, v in step.counters.items()))
    _row("host send lag", f"{step.host_lag_seconds * 1000:,.0f} ms (last frame against its schedule)")
    timeline = step.latency.get("timeline") or {}
    if timeline.get("windows"):
        p99s = " ".join(f"{w[2] * 1000:,.0f}" for w in timeline["windows"])
        _row("p99 by send time", f"{p99s} ms (slowest consumer, {timeline['window_seconds']:.1f} s windows)")
    _print_drops(step.drops)
    print(flush=True)


def print_summary(rates: list[float], fixed: list[float], results: dict[float, StepResult]) -> None:
    stepped = [r for r in rates if r in results]
    held = [r for r in stepped if results[r].held]
    failed = next((r for r in stepped if not results[r].held), None)
    print("== realistic ingest: summary ==")
    best = f"{held[-1]:,.0f} frames/s" if held else "none of the rates stepped"
    tail = f"; first not held: {failed:,.0f}/s" if failed is not None else "; every rate stepped was held"
    _row("highest rate held", f"{best} (stepped {', '.join(f'{r:,.0f}' for r in stepped)}{tail})")
    for rate in fixed:
        step = results[rate]
        state = "held" if step.held else "not held"
        _row(f"at {rate:,.0f}/s ({state})", f"CPU {step.cpu_us_per_event:,.0f} µs per event; {_latency(step)}")
    peak = max(step.peak_rss_kib for step in results.values())
    _row("peak RSS", f"{peak / 1024:,.0f} MiB (relay + ingest workers, highest of every step)")
    drops: dict[str, float] = {}
    for step in results.values():
        for key, value in step.drops.items():
            drops[key] = drops.get(key, 0.0) + value
    _print_drops(drops, summary=True)
    print(flush=True)


def _latency(step: StepResult) -> str:
    return (f"p50 {_ms(step.quantile('p50'))}, p99 {_ms(step.quantile('p99'))} "
            f"(p99 to the slowest consumer {_ms(step.quantile('p99', 'slowest'))}; "
            f"{step.latency.get('deliveries', 0):,} deliveries)")  # fmt: skip


def _print_drops(drops: dict[str, float], summary: bool = False) -> None:
    if not drops:
        _row("drops", "0")
        return
    listed = ", ".join(f"{key} {value:,.0f}" for key, value in sorted(drops.items()))
    banner = "!" * 78
    print(f"  {banner}\n  !!! DROPS{' IN THIS RUN' if summary else ''}: {listed}\n"
          f"  !!! a drop means the traffic or the relay is wrong: these figures do not count\n  {banner}")  # fmt: skip


def _row(label: str, value: str) -> None:
    print(f"  {label:<26} {value}")


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1000:,.1f} ms"
