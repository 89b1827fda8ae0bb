"""Tracing configuration: the standard ``OTEL_*`` environment variables, read and validated once.

skyrelay does not let the OpenTelemetry SDK read the environment by itself: ``load_tracing_config``
(called by the ``skyrelay`` command, beside ``load_settings``) reads the variables below, checks
them and returns a ``TracingConfig`` that is passed explicitly to ``actors.tracing.setup``.
Tracing is off unless ``OTEL_TRACES_EXPORTER=otlp`` (the on-switch; ``none`` or unset is off).

Variables read (others of the OTEL family are ignored, and said so by ``unknown_otel_warnings``):
``OTEL_TRACES_EXPORTER`` (``otlp`` or ``none``), ``OTEL_EXPORTER_OTLP_ENDPOINT`` (base URL;
``/v1/traces`` is appended), ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (full URL, wins),
``OTEL_SERVICE_NAME`` (default ``skyrelay``), ``OTEL_TRACES_SAMPLER`` (``always_on``,
``always_off``, ``traceidratio``, ``parentbased_*`` of those) with ``OTEL_TRACES_SAMPLER_ARG``
(the ratio). The share of upstream events traced is the setting ``trace_events_ratio``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from config.loader import ConfigError
from config.settings import Settings

_SAMPLERS = ("always_on", "always_off", "traceidratio")
_READ = frozenset(
    {
        "OTEL_TRACES_EXPORTER",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_SERVICE_NAME",
        "OTEL_TRACES_SAMPLER",
        "OTEL_TRACES_SAMPLER_ARG",
    }
)
DEFAULT_ENDPOINT = "http://localhost:4318"


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """Validated tracing options; ``enabled`` False means no SDK object is ever created."""

    enabled: bool = False
    endpoint: str = DEFAULT_ENDPOINT + "/v1/traces"  # full OTLP/HTTP traces URL
    service_name: str = "skyrelay"
    sampler: str = "parentbased_always_on"
    sampler_ratio: float = 1.0  # for the traceidratio samplers
    events_ratio: float = 0.001  # share of upstream events given a trace (0..1)


def load_tracing_config(settings: Settings, environ: Mapping[str, str] | None = None) -> TracingConfig:
    """Read the OTEL_* variables (plus ``settings.trace_events_ratio``); ``ConfigError`` listing every problem."""
    env = os.environ if environ is None else environ
    problems: list[str] = []
    exporter = env.get("OTEL_TRACES_EXPORTER", "none").strip().lower() or "none"
    if exporter not in ("otlp", "none"):
        problems.append(f"OTEL_TRACES_EXPORTER = {exporter!r} must be otlp or none")
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if not endpoint:
        endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", DEFAULT_ENDPOINT).strip().rstrip("/") + "/v1/traces"
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        problems.append(f"OTLP endpoint {endpoint!r} must be an http(s) URL")
    sampler = env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    if sampler.removeprefix("parentbased_") not in _SAMPLERS:
        problems.append(f"OTEL_TRACES_SAMPLER = {sampler!r} is not one of {', '.join(_SAMPLERS)} (or parentbased_*)")
    ratio = _ratio(env, "OTEL_TRACES_SAMPLER_ARG", 1.0, problems)
    events_ratio = settings.trace_events_ratio
    if events_ratio > 1.0:
        problems.append(f"trace_events_ratio = {events_ratio} must be at most 1")
    if problems:
        raise ConfigError(problems)
    return TracingConfig(
        enabled=exporter == "otlp",
        endpoint=endpoint,
        service_name=env.get("OTEL_SERVICE_NAME", "").strip() or "skyrelay",
        sampler=sampler,
        sampler_ratio=ratio,
        events_ratio=events_ratio,
    )


def _ratio(env: Mapping[str, str], name: str, default: float, problems: list[str]) -> float:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        problems.append(f"{name} = {text!r} must be a number from 0 to 1")
        return default
    return value


def unknown_otel_warnings(environ: Mapping[str, str] | None = None) -> list[str]:
    """OTEL_* variables that skyrelay does not read (headers, protocol, timeouts: not supported)."""
    env = os.environ if environ is None else environ
    return [
        f"environment: {v} is not read by skyrelay" for v in sorted(env) if v.startswith("OTEL_") and v not in _READ
    ]
