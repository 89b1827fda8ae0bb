"""Which hosts may be crawled: hostname normalization, SSRF guards, bans, and the PDS probe.

``requestCrawl`` and spidering both go through ``check_crawl_target``. In production a host
must be a public DNS name on the default port whose every address is globally routable; the
development mode (``allow_insecure_hosts``) also accepts loopback, explicit ports and http.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
PROBE_TIMEOUT_S = 5.0
PROBE_MAX_BYTES = 64 * 1024


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


def check_addresses(target: CrawlTarget, *, insecure: bool, resolve: Callable[[str], list[str]] | None = None) -> None:
    """Refuse hosts that resolve to private, loopback or link-local addresses (SSRF guard)."""
    if insecure:
        return
    host = target.hostname.split(":")[0]
    try:
        addresses = (resolve or _resolve)(host)
    except OSError as exc:
        raise CrawlRefused("InvalidRequest", f"cannot resolve {host}: {exc.strerror or exc}") from None
    if not addresses:
        raise CrawlRefused("InvalidRequest", f"{host} has no addresses")
    for addr in addresses:
        ip = ipaddress.ip_address(addr)
        if not ip.is_global:
            raise CrawlRefused("InvalidRequest", f"{host} resolves to a non-public address")


def _resolve(host: str) -> list[str]:
    return sorted({str(info[4][0]) for info in socket.getaddrinfo(host, 443, proto=socket.IPPROTO_TCP)})


def probe_pds(target: CrawlTarget) -> dict[str, object]:
    """GET describeServer; a PDS answers with a JSON object that has a ``did``."""
    url = f"{target.base_url}/xrpc/com.atproto.server.describeServer"
    request = urllib.request.Request(url, headers={"User-Agent": "skyrelay/0.1", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S) as resp:
            body = resp.read(PROBE_MAX_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise CrawlRefused("HostNotPds", f"describeServer answered HTTP {exc.code}: not a PDS") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise CrawlRefused("HostUnreachable", f"cannot reach {target.base_url}: {exc}") from None
    if len(body) > PROBE_MAX_BYTES:
        raise CrawlRefused("HostNotPds", "describeServer answer is too large")
    try:
        info = json.loads(body)
    except ValueError:
        raise CrawlRefused("HostNotPds", "describeServer did not answer JSON") from None
    if not isinstance(info, dict) or not isinstance(info.get("did"), str):
        raise CrawlRefused("HostNotPds", "describeServer answer has no did: not a PDS")
    return info
