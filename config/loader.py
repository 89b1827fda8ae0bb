"""Build ``Settings`` from layers: defaults < config file (TOML) < environment < CLI flags.

Every problem in every layer is collected and reported at once (``ConfigError`` lists them),
with a "did you mean" hint for misspelt names. The environment is read here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from config.settings import FIELD_NAMES, Secret, Settings

ENV_PREFIX = "SKYRELAY_"
# settings whose environment name has no SKYRELAY_ prefix, by convention of other tools
UNPREFIXED_ENV = {"database_url": "DATABASE_URL", "carstore_database_url": "CARSTORE_DATABASE_URL"}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_LOG_LEVELS = ("debug", "info", "warning", "error")
_LOG_FORMATS = ("text", "json")
_FIELD_TYPES = typing.get_type_hints(Settings)
# numeric settings where 0 is meaningful (all others must be positive)
_ZERO_ALLOWED = frozenset({"ingest_workers", "sequencer_batch_window_seconds", "new_hosts_per_day"})
# SKYRELAY_* variables read by tools and tests, not settings
_TOOL_ENV = {"SKYRELAY_CONFIG", "SKYRELAY_REFPDS_DIR", "SKYRELAY_ADMIN_URL"}
MIN_ADMIN_PASSWORD_CHARS = 12


class ConfigError(Exception):
    """Invalid configuration; ``problems`` lists every one found, each a full sentence."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def env_name(field_name: str) -> str:
    return UNPREFIXED_ENV.get(field_name, ENV_PREFIX + field_name.upper())


def _hint(name: str, candidates: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _convert(name: str, raw: Any, source: str, problems: list[str]) -> Any:
    """Convert one raw value (a string from env/CLI, or a TOML value) to the field's type."""
    kind = _FIELD_TYPES[name]
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError("expected true or false")
        if kind is int:
            if isinstance(raw, bool):
                raise ValueError("expected an integer")
            return int(str(raw).replace("_", ""))
        if kind is float:
            if isinstance(raw, bool):
                raise ValueError("expected a number")
            return float(raw)
        if kind is Path:
            return Path(str(raw))
        if kind is Secret:
            return Secret(str(raw))
        if typing.get_origin(kind) is tuple:
            if isinstance(raw, list | tuple):
                return tuple(str(x).strip() for x in raw if str(x).strip())
            return tuple(x.strip() for x in str(raw).split(",") if x.strip())
        if not isinstance(raw, str):
            raise ValueError("expected a string")
        return raw
    except ValueError as exc:
        shown = "********" if kind is Secret else repr(raw)
        problems.append(f"{source}: {name} = {shown} is invalid: {exc}")
        return None


def _from_file(path: Path, problems: list[str]) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        problems.append(f"config file {path}: cannot read: {exc.strerror}")
        return {}
    except tomllib.TOMLDecodeError as exc:
        problems.append(f"config file {path}: not valid TOML: {exc}")
        return {}
    section = data.get("skyrelay", data)
    out: dict[str, Any] = {}
    for key, value in section.items():
        if key not in FIELD_NAMES:
            problems.append(f"config file {path}: unknown setting {key!r}{_hint(key, FIELD_NAMES)}")
            continue
        out[key] = _convert(key, value, f"config file {path}", problems)
    return out


def _from_env(environ: Mapping[str, str], problems: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    known = {env_name(n): n for n in FIELD_NAMES}
    for var, value in environ.items():
        if var in known:
            out[known[var]] = _convert(known[var], value, f"environment {var}", problems)
    return out


def unknown_env_warnings(environ: Mapping[str, str] | None = None) -> list[str]:
    """Warnings for SKYRELAY_* variables that name no setting (likely typos; not fatal)."""
    environ = os.environ if environ is None else environ
    known = {env_name(n) for n in FIELD_NAMES} | _TOOL_ENV
    return [
        f"environment: {var} names no setting{_hint(var, known)}"
        for var in environ
        if var.startswith(ENV_PREFIX) and var not in known
    ]


def _validate(s: Settings, problems: list[str]) -> None:
    _host, sep, port = s.bind.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        problems.append(f"bind = {s.bind!r} must be HOST:PORT with a port from 0 to 65535")
    _host, sep, port = s.metrics_bind.rpartition(":")
    if s.metrics_bind and (not sep or not port.isdigit() or not 0 <= int(port) <= 65535):
        problems.append(f"metrics_bind = {s.metrics_bind!r} must be empty or HOST:PORT with a port from 0 to 65535")
    for name in ("database_url", "carstore_database_url"):
        url = getattr(s, name)
        if url and not url.startswith(("sqlite:///", "postgresql://", "postgres://")):
            problems.append(f"{name} must start with sqlite:/// or postgresql:// (got scheme {url.split(':')[0]!r})")
    plc = urlsplit(s.plc_url)
    if plc.scheme not in ("http", "https") or not plc.netloc:
        problems.append(f"plc_url = {s.plc_url!r} must be an http(s) URL")
    _validate_outbound(s, problems)
    if s.fanout_upstream and urlsplit(s.fanout_upstream).scheme not in ("ws", "wss"):
        problems.append(f"fanout_upstream = {s.fanout_upstream!r} must be a ws:// or wss:// URL")
    if s.log_level not in _LOG_LEVELS:
        problems.append(f"log_level = {s.log_level!r} must be one of {', '.join(_LOG_LEVELS)}")
    if s.log_format not in _LOG_FORMATS:
        problems.append(f"log_format = {s.log_format!r} must be one of {', '.join(_LOG_FORMATS)}")
    for password in s.admin_passwords():
        if len(password) < MIN_ADMIN_PASSWORD_CHARS:
            problems.append(
                f"admin passwords must be at least {MIN_ADMIN_PASSWORD_CHARS} characters (one has {len(password)}):"
                " use a long random one, e.g. from `openssl rand -hex 16`"
            )
    for f in dataclasses.fields(s):
        value = getattr(s, f.name)
        if f.name in _ZERO_ALLOWED:
            if value < 0:
                problems.append(f"{f.name} = {value} must not be negative")
        elif isinstance(value, int | float) and not isinstance(value, bool) and value <= 0:
            problems.append(f"{f.name} = {value} must be positive")


def load_settings(
    *,
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge the layers and validate; raise ``ConfigError`` listing every problem found."""
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    values: dict[str, Any] = {}
    if config_file is None and environ.get("SKYRELAY_CONFIG"):
        config_file = Path(environ["SKYRELAY_CONFIG"])
    if config_file is not None:
        values.update(_from_file(config_file, problems))
    values.update(_from_env(environ, problems))
    for key, value in (overrides or {}).items():
        if key not in FIELD_NAMES:
            problems.append(f"unknown setting {key!r}{_hint(key, FIELD_NAMES)}")
        elif value is not None:
            values[key] = _convert(key, value, "command line", problems)
    values = {k: v for k, v in values.items() if v is not None}
    settings = Settings(**values)
    _validate(settings, problems)
    if problems:
        raise ConfigError(problems)
    return settings


def _validate_outbound(s: Settings, problems: list[str]) -> None:
    for text in s.outbound_allowed_networks:
        try:
            ipaddress.ip_network(text, strict=False)
        except ValueError:
            problems.append(f"outbound_allowed_networks: {text!r} is not an IP network (CIDR)")
    if s.outbound_dns_server and not _is_address(s.outbound_dns_server):
        host, _, port = s.outbound_dns_server.strip("[").rpartition("]:" if "]" in s.outbound_dns_server else ":")
        host, port = (host, port) if host else (port, "53")
        try:
            ipaddress.ip_address(host)
            if not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(port)
        except ValueError:
            problems.append(f"outbound_dns_server = {s.outbound_dns_server!r} must be IP, IP:PORT or [IPv6]:PORT")


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False
