"""Which hosts may be crawled: hostname normalization, bans, and the PDS probe.

In production a host must be a public DNS name on the default port; the development mode
(``allow_insecure_hosts``) also accepts loopback, explicit ports and http. Whether its
addresses may be reached is decided where the probe connects (``actors.outbound``), at every
connection, not once here.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

from actors.outbound import Limits, OutboundClient
from actors.outbound_errors import (
    BadStatus,
    BadUrl,
    ConnectFailed,
    OutboundError,
    OutboundTimeout,
    RefusedAddress,
    ResolveFailed,
    TooLarge,
)

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
PROBE_LIMITS = Limits(total_seconds=10.0, read_seconds=5.0, max_bytes=64 * 1024)
_UNREACHABLE = "could not reach the host's describeServer (no answer, refused, reset or timed out)"


class CrawlRefused(Exception):
    """The host may not be crawled; ``error`` is the XRPC error name, the message says why."""

    def __init__(self, error: str, message: str) -> None:
        super().__init__(message)
        self.error = error
        self.message = message


@dataclass(frozen=True, slots=True)
class CrawlTarget:
    hostname: str  # normalized: lower case, "host" or (insecure mode) "host:port"
    base_url: str  # https://host or http://host:port


def normalize_hostname(raw: object, *, insecure: bool) -> CrawlTarget:
    """Validate a requestCrawl ``hostname``; ``CrawlRefused`` with a clear message if unusable."""
    if not isinstance(raw, str) or not raw.strip():
        raise CrawlRefused("InvalidRequest", "hostname is required")
    text = raw.strip().lower()
    scheme = "https"
    if "://" in text:
        scheme, _, text = text.partition("://")
        if scheme not in ("http", "https"):
            raise CrawlRefused("InvalidRequest", "hostname must be a host name, not a URL of that scheme")
    text = text.rstrip("/")
    if not text or "/" in text or "@" in text or len(text) > 253:
        raise CrawlRefused("InvalidRequest", "hostname must be a bare host name")
    host, sep, port_text = text.rpartition(":") if ":" in text else (text, "", "")
    port: int | None = None
    if sep:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise CrawlRefused("InvalidRequest", "bad port in hostname")
        port = int(port_text)
    if _is_ip(host):
        if not insecure:
            raise CrawlRefused("InvalidRequest", "IP addresses cannot be crawled; use a DNS name")
    else:
        labels = host.split(".")
        if not all(_LABEL.match(label) for label in labels):
            raise CrawlRefused("InvalidRequest", f"{host!r} is not a valid host name")
        if len(labels) < 2 and not (insecure and host == "localhost"):
            raise CrawlRefused("InvalidRequest", "hostname must be a fully qualified domain name")
    if not insecure:
        if port is not None and port != 443:
            raise CrawlRefused("InvalidRequest", "non-default ports are not accepted")
        if scheme != "https":
            raise CrawlRefused("InvalidRequest", "only https hosts are accepted")
        if host == "localhost" or host.endswith((".localhost", ".local", ".internal", ".test", ".invalid")):
            raise CrawlRefused("InvalidRequest", "local and reserved names cannot be crawled")
        return CrawlTarget(host, f"https://{host}")
    local = port is not None or host == "localhost" or _is_ip(host)
    hostname = f"{host}:{port}" if port is not None else host
    if scheme == "http" or local:
        return CrawlTarget(hostname, f"http://{hostname}")
    return CrawlTarget(hostname, f"https://{hostname}")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


def is_banned(hostname: str, banned_domains: Iterable[str]) -> bool:
    host = hostname.rsplit(":", 1)[0] if ":" in hostname else hostname
    return any(host == d or host.endswith("." + d) for d in banned_domains)


def probe_pds(target: CrawlTarget, *, client: OutboundClient, limits: Limits = PROBE_LIMITS) -> dict[str, object]:
    """GET describeServer through the outbound client; a PDS answers with a JSON object that has a ``did``.

    Messages never repeat socket errors: a refused, reset, silent or TLS-failing port all give
    the same ``HostUnreachable`` text, so requestCrawl is no port scanner. Redirects are not
    followed (the outbound client never follows them).
    """
    url = f"{target.base_url}/xrpc/com.atproto.server.describeServer"
    try:
        body = client.get(url, limits, headers={"Accept": "application/json"}).body
    except RefusedAddress:
        raise CrawlRefused("InvalidRequest", "hostname resolves to a non-public address") from None
    except (ResolveFailed, BadUrl):
        raise CrawlRefused("InvalidRequest", "hostname does not resolve to a usable address") from None
    except (ConnectFailed, OutboundTimeout):
        raise CrawlRefused("HostUnreachable", _UNREACHABLE) from None
    except BadStatus as exc:
        raise CrawlRefused("HostNotPds", f"describeServer answered HTTP {exc.status}: not a PDS") from None
    except TooLarge:
        raise CrawlRefused("HostNotPds", "describeServer answer is too large") from None
    except OutboundError:  # a malformed answer: something listens there, but it is not a PDS
        raise CrawlRefused("HostNotPds", "describeServer did not answer valid HTTP: not a PDS") from None
    try:
        info = json.loads(body)
    except (ValueError, RecursionError):
        raise CrawlRefused("HostNotPds", "describeServer did not answer JSON") from None
    if not isinstance(info, dict) or not isinstance(info.get("did"), str):
        raise CrawlRefused("HostNotPds", "describeServer answer has no did: not a PDS")
    return info
