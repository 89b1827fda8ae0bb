"""Which addresses outbound connections may reach: the address policy and name resolution.

A name is resolved once (system resolver, or the DNS server named by ``outbound_dns_server``)
and EVERY address it resolves to must pass the policy, else the name is refused. The caller
then connects to one of those checked addresses; nothing resolves the name a second time.

- Production: only globally routable unicast addresses (no loopback, private, shared,
  link-local, multicast, unspecified or reserved; no IPv6 prefixes that embed an IPv4
  address: IPv4-mapped are judged as the IPv4 address, 6to4 and NAT64 are refused).
- ``allowed_networks`` are accepted besides those. The default is none in production and
  loopback plus the private ranges in development (``allow_insecure_hosts``); a setting
  replaces it (tests use ``127.0.0.1/32`` to show that 127.0.0.2 is refused).
- ``trusted_hosts`` (the operator's configured PLC directory) skip the address and scheme
  checks; they still get one resolution, deadlines and size caps.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from actors.outbound_errors import RefusedAddress, ResolveFailed

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str], list[str]]

DEVELOPMENT_NETWORKS: tuple[str, ...] = ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                                         "fc00::/7")  # fmt: skip
_TUNNELS = tuple(ipaddress.ip_network(n) for n in ("2002::/16", "64:ff9b::/96", "64:ff9b:1::/48"))


@dataclass(frozen=True, slots=True)
class AddressPolicy:
    """What outbound connections may reach; see the module docstring."""

    allow_plaintext: bool = False  # http:// and ws:// accepted (development only)
    allowed_networks: tuple[IPNetwork, ...] = ()
    trusted_hosts: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def for_mode(cls, insecure: bool, networks: Iterable[str] = ()) -> AddressPolicy:
        """Production (``insecure=False``) or development; ``networks`` replaces the default list."""
        chosen = tuple(networks) or (DEVELOPMENT_NETWORKS if insecure else ())
        return cls(insecure, tuple(ipaddress.ip_network(n, strict=False) for n in chosen))

    def trusting(self, host: str) -> AddressPolicy:
        """The same policy, with ``host`` (an operator-configured name) exempt from the checks."""
        return AddressPolicy(self.allow_plaintext, self.allowed_networks, self.trusted_hosts | {host.lower()})

    def allows(self, address: IPAddress) -> bool:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in net for net in self.allowed_networks if net.version == address.version):
            return True
        if not address.is_global or address.is_multicast or address.is_reserved or address.is_unspecified:
            return False
        return not any(address in net for net in _TUNNELS if net.version == address.version)


def literal_address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def resolve_checked(host: str, policy: AddressPolicy, resolver: Resolver) -> list[IPAddress]:
    """The addresses of ``host``, each allowed by ``policy``; resolved exactly once.

    ``RefusedAddress`` when any address is refused, ``ResolveFailed`` when there is none.
    """
    trusted = host.lower() in policy.trusted_hosts
    literal = literal_address(host)
    if literal is not None:
        addresses = [literal]
    else:
        try:
            texts = resolver(host)
        except (OSError, UnicodeError, ValueError) as exc:
            raise ResolveFailed(f"{host} does not resolve", detail=type(exc).__name__) from None
        addresses = []
        for text in dict.fromkeys(texts):
            address = literal_address(text.split("%", 1)[0])
            if address is None:
                raise ResolveFailed(f"{host} resolved to something that is not an address")
            addresses.append(address)
    if not addresses:
        raise ResolveFailed(f"{host} has no addresses")
    if not trusted and not all(policy.allows(a) for a in addresses):
        what = "is" if literal is not None else "resolves to"
        raise RefusedAddress(f"{host} {what} an address outbound connections may not reach")
    return addresses


def system_resolver(host: str) -> list[str]:
    """Addresses of ``host`` from the system resolver (gevent's, once monkey-patched)."""
    return [str(info[4][0]) for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)]


class DnsServerResolver:
    """Addresses of a name (A and AAAA) asked of one DNS server, ``"IP"`` or ``"IP:PORT"``."""

    def __init__(self, server: str, *, timeout_seconds: float = 5.0) -> None:
        import dns.resolver

        host, port = split_server(server)
        self._resolver = dns.resolver.Resolver(configure=False)
        self._resolver.nameservers = [host]
        self._resolver.port = port
        self._resolver.lifetime = timeout_seconds
        self._resolver.cache = None

    def __call__(self, host: str) -> list[str]:
        import dns.exception
        import dns.resolver

        out: list[str] = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = self._resolver.resolve(host, rdtype, search=False)
            except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
                continue
            except dns.exception.DNSException as exc:
                raise OSError(f"DNS query failed: {type(exc).__name__}") from None
            out.extend(str(getattr(rdata, "address", "")) for rdata in answer)
        return out


def split_server(server: str) -> tuple[str, int]:
    """``"IP"``, ``"IP:PORT"`` or ``"[IPv6]:PORT"`` -> (IP, port); ``ValueError`` if malformed."""
    text = server.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    ipaddress.ip_address(host)
    port = int(port_text) if port_text else 53
    if not 0 < port < 65536:
        raise ValueError(f"bad port in {server!r}")
    return host, port


def resolver_for(dns_server: str) -> Resolver:
    """The configured resolver: the named DNS server, or the system resolver when empty."""
    return DnsServerResolver(dns_server) if dns_server else system_resolver
