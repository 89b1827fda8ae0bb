"""The address policy and the HTTP response parser of the outbound client, without sockets."""

from __future__ import annotations

import io
import ipaddress

import pytest

from actors.addrguard import AddressPolicy, resolve_checked
from actors.outbound_errors import ProtocolFailure, RefusedAddress, ResolveFailed, TooLarge
from actors.outbound_http import body_chunks, read_head

PRODUCTION = AddressPolicy.for_mode(False)
DEVELOPMENT = AddressPolicy.for_mode(True)

NEVER = ["0.0.0.0", "169.254.169.254", "fe80::1", "224.0.0.1", "255.255.255.255", "::", "100.64.0.1",
         "2002:7f00:1::1", "64:ff9b::7f00:1", "240.0.0.1"]  # fmt: skip
LOCAL = ["127.0.0.1", "127.0.0.2", "10.1.2.3", "172.16.0.1", "192.168.1.1", "::1", "fd00::1", "::ffff:127.0.0.1",
         "::ffff:10.0.0.1"]  # fmt: skip
PUBLIC = ["93.184.216.34", "2606:4700::1111", "::ffff:93.184.216.34"]


@pytest.mark.parametrize("address", NEVER + LOCAL)
def test_production_refuses_every_non_public_address(address: str) -> None:
    assert not PRODUCTION.allows(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_allowed(address: str) -> None:
    assert PRODUCTION.allows(ipaddress.ip_address(address))
    assert DEVELOPMENT.allows(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", LOCAL)
def test_development_allows_loopback_and_private(address: str) -> None:
    assert DEVELOPMENT.allows(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", NEVER)
def test_development_still_refuses_link_local_and_unspecified(address: str) -> None:
    assert not DEVELOPMENT.allows(ipaddress.ip_address(address))


def test_an_allowed_network_list_replaces_the_development_default() -> None:
    only = AddressPolicy.for_mode(True, ["127.0.0.1/32"])
    assert only.allows(ipaddress.ip_address("127.0.0.1"))
    assert not only.allows(ipaddress.ip_address("127.0.0.2"))
    assert not only.allows(ipaddress.ip_address("10.0.0.1"))


def test_one_refused_address_refuses_the_name() -> None:
    with pytest.raises(RefusedAddress):
        resolve_checked("pds.example.com", PRODUCTION, lambda _h: ["93.184.216.34", "192.168.1.1"])
    with pytest.raises(ResolveFailed):
        resolve_checked("pds.example.com", PRODUCTION, lambda _h: [])
    with pytest.raises(ResolveFailed):
        resolve_checked("pds.example.com", PRODUCTION, lambda _h: (_ for _ in ()).throw(OSError("no such name")))
    assert [str(a) for a in resolve_checked("pds.example.com", PRODUCTION, lambda _h: ["93.184.216.34"])] == [
        "93.184.216.34"
    ]


def test_a_trusted_host_skips_the_check_but_resolves_once() -> None:
    calls = []

    def resolver(host: str) -> list[str]:
        calls.append(host)
        return ["10.0.0.5"]

    trusted = PRODUCTION.trusting("plc.internal")
    assert [str(a) for a in resolve_checked("PLC.internal", trusted, resolver)] == ["10.0.0.5"]
    assert calls == ["PLC.internal"]
    with pytest.raises(RefusedAddress):
        resolve_checked("other.internal", trusted, resolver)


def reader(data: bytes) -> io.BufferedReader:
    return io.BufferedReader(io.BytesIO(data))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "head",
    [b"", b"HTTP/1.1 200", b"HTTP/1.1 20 OK\r\n\r\n", b"HTTP/2 200 OK\r\n\r\n", b"ICY 200 OK\r\n\r\n",
     b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", b"HTTP/1.1 200 OK\r\n folded: x\r\n\r\n",
     b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
     b"HTTP/1.1 200 OK\r\nX: " + b"a" * 20000 + b"\r\n\r\n", b"HTTP/1.1 200 OK\r\nX: y\r\n"],
)  # fmt: skip
def test_malformed_heads_are_protocol_failures(head: bytes) -> None:
    with pytest.raises(ProtocolFailure):
        read_head(reader(head))


def test_a_good_head_and_its_bodies() -> None:
    stream = reader(b"HTTP/1.1 200 OK\r\nContent-Type: a\r\nContent-Length: 3\r\n\r\nabc")
    status, headers = read_head(stream)
    assert status == 200 and headers["content-type"] == "a"
    assert b"".join(body_chunks(stream, headers, 3)) == b"abc"
    chunked = reader(b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nTrailer: x\r\n\r\n")
    assert b"".join(body_chunks(chunked, {"transfer-encoding": "chunked"}, 5)) == b"abcde"
    assert b"".join(body_chunks(reader(b"until close"), {}, 100)) == b"until close"


@pytest.mark.parametrize(
    ("headers", "body", "error"),
    [
        ({"content-length": "4"}, b"abcd", TooLarge),  # declared over the cap of 3: refused up front
        ({"content-length": "3"}, b"ab", ProtocolFailure),
        ({"content-length": "-1"}, b"", ProtocolFailure),
        ({"content-length": "\u0661"}, b"", ProtocolFailure),  # an Arabic-Indic digit one
        ({}, b"abcd", TooLarge),
        ({"transfer-encoding": "gzip"}, b"", ProtocolFailure),
        ({"transfer-encoding": "chunked"}, b"2\r\nab\r\n2\r\ncd\r\n0\r\n\r\n", TooLarge),
        ({"transfer-encoding": "chunked"}, b"zz\r\n", ProtocolFailure),
        ({"transfer-encoding": "chunked"}, b"2\r\nabXX", ProtocolFailure),
        ({"transfer-encoding": "chunked"}, b"2\r\na", ProtocolFailure),
    ],
)
def test_bad_bodies(headers: dict[str, str], body: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        b"".join(body_chunks(reader(body), headers, 3))
