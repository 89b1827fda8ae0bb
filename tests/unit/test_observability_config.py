"""Tracing configuration from OTEL_* variables, the metrics_bind setting, and host lifecycle log lines."""

from __future__ import annotations

import logging
import types

import pytest

from actors import host_events
from config import ConfigError, Settings, load_settings
from config.tracing import load_tracing_config, unknown_otel_warnings


def test_tracing_is_off_unless_the_otlp_exporter_is_asked_for() -> None:
    assert not load_tracing_config(Settings(), {}).enabled
    assert not load_tracing_config(Settings(), {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}).enabled
    assert not load_tracing_config(Settings(), {"OTEL_TRACES_EXPORTER": "none"}).enabled
    config = load_tracing_config(
        Settings(trace_events_ratio=0.5),
        {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/",
            "OTEL_SERVICE_NAME": "relay-eu",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.1",
        },
    )
    assert config.enabled
    assert config.endpoint == "http://collector:4318/v1/traces"
    assert (config.service_name, config.sampler, config.sampler_ratio) == ("relay-eu", "parentbased_traceidratio", 0.1)
    assert config.events_ratio == 0.5


def test_the_traces_endpoint_variable_is_taken_whole() -> None:
    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://otel.example/custom"}
    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://ignored:4318"
    assert load_tracing_config(Settings(), env).endpoint == "https://otel.example/custom"


def test_every_bad_tracing_variable_is_reported_at_once() -> None:
    env = {
        "OTEL_TRACES_EXPORTER": "zipkin",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318",
        "OTEL_TRACES_SAMPLER": "sometimes",
        "OTEL_TRACES_SAMPLER_ARG": "2",
    }
    with pytest.raises(ConfigError) as err:
        load_tracing_config(Settings(trace_events_ratio=3.0), env)
    text = "\n".join(err.value.problems)
    assert len(err.value.problems) == 5
    for name in ("OTEL_TRACES_EXPORTER", "endpoint", "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG", "trace_events"):
        assert name in text


def test_otel_variables_skyrelay_does_not_read_are_named() -> None:
    env = {"OTEL_EXPORTER_OTLP_HEADERS": "x", "OTEL_SERVICE_NAME": "a", "PATH": "/bin"}
    assert unknown_otel_warnings(env) == ["environment: OTEL_EXPORTER_OTLP_HEADERS is not read by skyrelay"]


def test_metrics_bind_is_empty_or_host_port() -> None:
    assert load_settings(environ={}).metrics_host_port() is None
    settings = load_settings(environ={"SKYRELAY_METRICS_BIND": "127.0.0.1:9090"})
    assert settings.metrics_host_port() == ("127.0.0.1", 9090)
    with pytest.raises(ConfigError) as err:
        load_settings(environ={"SKYRELAY_METRICS_BIND": "9090"})
    assert "metrics_bind" in err.value.problems[0]


def test_host_lifecycle_lines_repeat_at_most_once_per_interval_per_reason(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(host_events, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    host_events.reset()
    caplog.set_level(logging.INFO, logger="actors.host_events")
    assert host_events.host_changed("disconnected", "pds.example", reason="timeout", detail="'read'")
    assert not host_events.host_changed("disconnected", "pds.example", reason="timeout")
    assert not host_events.host_changed("disconnected", "pds.example", reason="timeout")
    assert host_events.host_changed("disconnected", "pds.example", reason="closed")  # another reason
    assert host_events.host_changed("added", "pds.example", limited=False)
    assert host_events.host_changed("added", "pds.example", limited=False)  # never limited
    clock[0] += host_events.INTERVAL_SECONDS
    assert host_events.host_changed("disconnected", "pds.example", reason="timeout")
    assert host_events.host_changed("offline", "pds.example", reason="failures")
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [
        ("INFO", "host disconnected host=pds.example reason=timeout detail='read'"),
        ("INFO", "host disconnected host=pds.example reason=closed"),
        ("INFO", "host added host=pds.example"),
        ("INFO", "host added host=pds.example"),
        ("INFO", "host disconnected host=pds.example reason=timeout suppressed=2"),
        ("WARNING", "host offline host=pds.example reason=failures"),
    ]
    host_events.reset()


def test_host_lifecycle_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_events, "MAX_KEYS", 10)
    host_events.reset()
    for i in range(50):
        host_events.host_changed("blocked", f"h{i}.example", reason="banned")
    assert len(host_events._last) == 10
    host_events.reset()
