"""Traces (OpenTelemetry): spans for requests, sampled upstream events, backfills, compaction, admin.

Off by default, and then free: ``ENABLED`` is a module-level boolean that every hot-path hook
tests before calling in (``if tracing.ENABLED: ...``), so with tracing off an upstream event
costs one global load per stage and no object is created. ``setup`` (called once by
``skyrelay serve`` with a validated ``config.tracing.TracingConfig``) turns it on.

Upstream events are sampled with a countdown (one in ``round(1 / events_ratio)``), not by
creating non-recording spans. A sampled event is timed at each stage by plain timestamps as it
crosses the actors (subscriber: decode, verify; sequencer: sequence, durable; broadcaster:
broadcast), keyed by (host id, upstream seq) and then by relay seq; the broadcaster's hook
emits the whole span tree at once with those start and end times (``upstream.event`` with a
child span per stage). In-flight samples are bounded (``MAX_IN_FLIGHT``; oldest forgotten).
With ingest workers, a worker samples and times its events (``setup_sampling_only``) and
sends the samples of each batch over the link just before the batch (``take_samples``); the
relay process ``adopt``s them and goes on as for its own.

Other spans (``span`` / ``traced``) are ordinary current-context spans: XRPC requests
(``web.tracing``), admin operations, mirror backfills with their fetch and verification, and
compaction runs.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from config.tracing import TracingConfig

ENABLED = False  # read on hot paths: keep it a plain module global
MAX_IN_FLIGHT = 1000
EXPORT_TIMEOUT_SECONDS = 10.0  # one OTLP export request (spans are dropped, never retried forever)
STAGES = ("decode", "verify", "sequence", "durable", "broadcast")

_tracer: Any = None
_provider: Any = None
_every = 0  # trace one upstream event in this many; 0: none
_countdown = 0
_by_upstream: dict[tuple[int, int], EventTrace] = {}  # handed to the sequencer, not yet durable
_by_seq: dict[int, EventTrace] = {}  # durable, not yet broadcast

F = TypeVar("F", bound=Callable[..., Any])


class EventTrace:
    """Timestamps (ns since the epoch) of one sampled upstream event at each stage boundary."""

    __slots__ = ("attrs", "marks")

    def __init__(self, start_ns: int) -> None:
        self.marks: list[int] = [start_ns]
        self.attrs: dict[str, Any] = {}

    def mark(self) -> None:
        """The current stage ended now."""
        self.marks.append(time.time_ns())


def setup(config: TracingConfig, *, exporter: Any = None) -> None:
    """Turn tracing on: a tracer provider with ``config``'s sampler, exporting by OTLP/HTTP.

    ``exporter`` replaces the OTLP exporter (tests: the SDK's in-memory exporter, exported
    synchronously). Nothing happens when ``config.enabled`` is False.
    """
    global ENABLED, _tracer, _provider, _every, _countdown
    if not config.enabled:
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    # every option is passed explicitly: the SDK reads the environment only for what it is not given
    provider = TracerProvider(resource=Resource({"service.name": config.service_name}), sampler=_sampler(config))
    if exporter is None:
        import requests
        from opentelemetry.exporter.otlp.proto.http import Compression
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        session = requests.Session()
        session.trust_env = False  # no proxy from the environment, as for every other outbound call
        otlp = OTLPSpanExporter(
            endpoint=config.endpoint,
            headers={},
            timeout=EXPORT_TIMEOUT_SECONDS,
            compression=Compression.NoCompression,
            session=session,
        )
        provider.add_span_processor(
            BatchSpanProcessor(
                otlp,
                max_queue_size=2048,
                schedule_delay_millis=5000,
                max_export_batch_size=512,
                export_timeout_millis=int(EXPORT_TIMEOUT_SECONDS * 1000),
            )
        )
    else:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    _provider, _tracer = provider, provider.get_tracer("skyrelay")
    _every = round(1 / config.events_ratio) if config.events_ratio > 0 else 0
    _countdown = _every
    _by_upstream.clear()
    _by_seq.clear()
    ENABLED = True


def setup_sampling_only(config: TracingConfig) -> None:
    """An ingest worker: sample and time events like ``setup``, but export nothing itself.

    Its samples are taken with ``take_samples`` and sent to the relay process, which ``adopt``s them.
    """
    global ENABLED, _every, _countdown
    if not config.enabled:
        return
    _every = round(1 / config.events_ratio) if config.events_ratio > 0 else 0
    _countdown = _every
    ENABLED = True


def take_samples(batch: Sequence[Any]) -> list[list[Any]]:
    """The samples of ``batch``'s events (``PersistEvent``s), removed, as plain values for the link."""
    if not _by_upstream:
        return []
    out = []
    for item in batch:
        trace = _by_upstream.pop((item.host_id, item.upstream_seq), None)
        if trace is not None:
            out.append([item.host_id, item.upstream_seq, trace.marks, trace.attrs])
    return out


def adopt(samples: Sequence[Sequence[Any]]) -> None:
    """Samples from an ingest worker (``take_samples``), before their events reach the sequencer."""
    if not ENABLED:
        return
    for host_id, upstream_seq, marks, attrs in samples:
        trace = EventTrace(int(marks[0]))
        trace.marks = [int(m) for m in marks]
        trace.attrs = dict(attrs)
        if len(_by_upstream) >= MAX_IN_FLIGHT:
            _by_upstream.pop(next(iter(_by_upstream)))
        _by_upstream[(int(host_id), int(upstream_seq))] = trace


def shutdown() -> None:
    """Export what is pending and turn tracing off (at relay stop, and between tests)."""
    global ENABLED, _tracer, _provider
    ENABLED = False
    provider, _provider, _tracer = _provider, None, None
    _by_upstream.clear()
    _by_seq.clear()
    if provider is not None:
        provider.shutdown()


def _sampler(config: TracingConfig) -> Any:
    from opentelemetry.sdk.trace import sampling

    base = config.sampler.removeprefix("parentbased_")
    inner: Any = {
        "always_on": sampling.ALWAYS_ON,
        "always_off": sampling.ALWAYS_OFF,
    }.get(base) or sampling.TraceIdRatioBased(config.sampler_ratio)
    return sampling.ParentBased(inner) if config.sampler.startswith("parentbased_") else inner


# -- ordinary spans ---------------------------------------------------------------------------------
@contextlib.contextmanager
def span(name: str, **attributes: Any) -> Iterator[Any]:
    """A span around the block (the current span's child), or nothing at all when tracing is off."""
    if not ENABLED:
        yield None
        return
    with _tracer.start_as_current_span(name, attributes=_clean(attributes)) as current:
        yield current


def traced(name: str) -> Callable[[F], F]:
    """Decorator: run the function inside ``span(name)`` (admin operations, maintenance jobs)."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            if not ENABLED:
                return fn(*args, **kwargs)
            with span(name):
                return fn(*args, **kwargs)

        return inner  # type: ignore[return-value]

    return wrap


def start_span(name: str, **attributes: Any) -> Any:
    """A started span that the caller ends (the web hooks); None when tracing is off."""
    return _tracer.start_span(name, attributes=_clean(attributes)) if ENABLED else None


def _clean(attributes: dict[str, Any]) -> dict[str, Any]:
    return {k.replace("_", "."): v for k, v in attributes.items() if v is not None}


# -- sampled upstream events (callers test ENABLED first) ----------------------------------------------
def start_event() -> EventTrace | None:
    """A trace for this upstream event if it is sampled (one in ``_every``), else None."""
    global _countdown
    if _every == 0:
        return None
    _countdown -= 1
    if _countdown > 0:
        return None
    _countdown = _every
    return EventTrace(time.time_ns())


def event_handed_over(trace: EventTrace, host_id: int, hostname: str, upstream_seq: int, kind: str, did: Any) -> None:
    """The subscriber tells the sequencer about a sampled, verified event."""
    trace.attrs = {"host": hostname, "upstream.seq": upstream_seq, "event.type": kind, "did": did}
    if len(_by_upstream) >= MAX_IN_FLIGHT:
        _by_upstream.pop(next(iter(_by_upstream)))
    _by_upstream[(host_id, upstream_seq)] = trace


def events_durable(batch: Sequence[Any], first_seq: int, flush_started: float) -> None:
    """The sequencer made ``batch`` (``PersistEvent``s, relay seqs from ``first_seq``) durable."""
    if not _by_upstream:
        return
    now = time.time_ns()
    for offset, item in enumerate(batch):
        trace = _by_upstream.pop((item.host_id, item.upstream_seq), None)
        if trace is not None:
            trace.marks += [int(flush_started * 1e9), now]
            trace.attrs["seq"] = first_seq + offset
            if len(_by_seq) >= MAX_IN_FLIGHT:
                _by_seq.pop(next(iter(_by_seq)))
            _by_seq[first_seq + offset] = trace


def events_broadcast(events: Sequence[tuple[int, bytes]]) -> None:
    """The broadcaster queued ``events`` on every consumer: emit the sampled ones' spans."""
    if not _by_seq:
        return
    for seq, _frame in events:
        trace = _by_seq.pop(seq, None)
        if trace is not None:
            trace.mark()
            _emit(trace)


def _emit(trace: EventTrace) -> None:
    from opentelemetry import trace as otel

    marks = trace.marks
    root = _tracer.start_span("upstream.event", start_time=marks[0], attributes=_clean_attrs(trace.attrs))
    parent = otel.set_span_in_context(root)
    # marks: received, decoded, verified, flush started, durable, broadcast ("sequence" includes backpressure)
    bounds = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    for stage, (a, b) in zip(STAGES, bounds, strict=True):
        if b < len(marks):
            _tracer.start_span(f"event.{stage}", context=parent, start_time=marks[a]).end(end_time=marks[b])
    root.end(end_time=marks[-1])


def _clean_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attrs.items() if v is not None}
