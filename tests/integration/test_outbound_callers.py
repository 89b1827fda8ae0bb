"""Every outbound caller under the address policy: identity (did:web, PDS endpoints), upstream websockets, the relay.

As in ``test_outbound_hostile``, only 127.0.0.1 is allowed; 127.0.0.2 stands for a private
address. The names (``*.test``) are served by the DNS stand-in, which can change its answer
between two look-ups (DNS rebinding).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from actors.addrguard import AddressPolicy, DnsServerResolver
from actors.identity import IdentityDirectory
from actors.outbound import OutboundClient
from actors.wsclient import WebSocketClient, WebSocketError
from protocol.crypto import K256, PrivateKey
from protocol.identity_errors import IdentityUnavailable
from store.db import open_database
from store.hosts import ensure_host
from store.migrations import apply_migrations
from tests.support.dns_stub import DnsStub
from tests.support.fake_plc import FakePlc, make_did_doc, new_plc_did
from tests.support.hostile_http import HostileServer
from tests.support.procs import RelayProcess, wait_until

ONLY_127_0_0_1 = AddressPolicy.for_mode(True, ["127.0.0.1/32"])
HANDSHAKE_LABELS = {"http_1xx", "http_2xx", "http_3xx", "http_4xx", "http_5xx", "bad_handshake"}


@pytest.fixture
def dns() -> Iterator[DnsStub]:
    with DnsStub() as stub:
        yield stub


def new_key() -> str:
    return PrivateKey.generate(K256).public_key().did_key()


def test_did_web_on_a_refused_address_is_not_fetched() -> None:
    with HostileServer("status", host="127.0.0.2", status=200) as evil:
        directory = IdentityDirectory(
            None, plc_url="http://127.0.0.1:9", allow_insecure_hosts=True, outbound=OutboundClient(ONLY_127_0_0_1)
        )
        with pytest.raises(IdentityUnavailable, match="refused_address"):
            directory.resolve(f"did:web:127.0.0.2%3A{evil.port}")
        assert evil.connections_so_far() == 0


def test_did_web_whose_name_resolves_to_loopback_is_refused_in_production(dns: DnsStub) -> None:
    dns.set("alice.evil.test", ["127.0.0.1"])
    production = OutboundClient(AddressPolicy.for_mode(False), resolver=DnsServerResolver(dns.server))
    directory = IdentityDirectory(None, plc_url="https://plc.invalid", outbound=production)
    with pytest.raises(IdentityUnavailable, match="refused_address"):
        directory.resolve("did:web:alice.evil.test")
    assert dns.lookups["alice.evil.test"] == 1


def test_an_http_pds_endpoint_is_refused_in_production() -> None:
    did, secure = new_plc_did(), new_plc_did()
    before = REGISTRY.get_sample_value("skyrelay_identity_insecure_endpoints_total") or 0.0
    with FakePlc() as plc:  # the operator's PLC directory itself may be http (configuration, trusted)
        plc.put(did, make_did_doc(did, new_key(), "http://pds.example.com"))
        plc.put(secure, make_did_doc(secure, new_key(), "https://pds.example.com"))
        production = IdentityDirectory(None, plc_url=plc.url)
        assert production.resolve(did).pds_endpoint is None  # so its events fail the host check
        assert production.resolve(secure).pds_endpoint == "https://pds.example.com"
        development = IdentityDirectory(None, plc_url=plc.url, allow_insecure_hosts=True)
        assert development.resolve(did).pds_endpoint == "http://pds.example.com"
    assert REGISTRY.get_sample_value("skyrelay_identity_insecure_endpoints_total") == before + 1


def test_websocket_reconnect_after_rebinding_is_refused(dns: DnsStub) -> None:
    with HostileServer("status", status=403) as good:  # noqa: SIM117 - the second server takes its port
        with HostileServer("silent", host="127.0.0.2", port=good.port) as evil:
            dns.set("pds.test", ["127.0.0.1"], ["127.0.0.2"])
            outbound = OutboundClient(ONLY_127_0_0_1, resolver=DnsServerResolver(dns.server))
            url = f"ws://pds.test:{good.port}/xrpc/com.atproto.sync.subscribeRepos"
            reasons = []
            for _ in range(2):  # the subscriber makes a new client for every connection
                client = WebSocketClient(url, max_message_bytes=1 << 20, timeout_s=5, outbound=outbound)
                with pytest.raises(WebSocketError) as err:
                    client.connect()
                client.close()
                reasons.append(err.value.reason)
            assert reasons == ["http_4xx", "refused_address"]
            assert good.connections_so_far() == 1
            assert evil.connections_so_far() == 0


@pytest.mark.parametrize("status", [200, 302, 404, 599, 999])
def test_handshake_status_labels_are_bounded(status: int) -> None:
    with HostileServer("status", status=status) as server:
        client = WebSocketClient(
            f"ws://127.0.0.1:{server.port}/", max_message_bytes=1 << 20, timeout_s=5,
            outbound=OutboundClient(ONLY_127_0_0_1),
        )  # fmt: skip
        with pytest.raises(WebSocketError) as err:
            client.connect()
        client.close()
    assert err.value.reason in HANDSHAKE_LABELS


def test_a_known_host_that_resolves_to_a_refused_address_is_not_connected_to(tmp_path: Path, dns: DnsStub) -> None:
    """Hosts loaded from the database at start-up go through the same check at every connection."""
    data_dir = tmp_path / "relay"
    data_dir.mkdir()
    db_url = f"sqlite:///{data_dir / 'relay.sqlite'}"
    with HostileServer("status", status=403) as good:  # noqa: SIM117 - the second server takes its port
        with HostileServer("silent", host="127.0.0.2", port=good.port) as evil:
            dns.set("good.test", ["127.0.0.1"])
            dns.set("evil.test", ["127.0.0.2"])
            db = open_database(db_url)
            apply_migrations(db)
            with db.connection_context():
                ensure_host(db, f"evil.test:{evil.port}")  # a name that resolves to 127.0.0.2
                ensure_host(db, f"127.0.0.2:{evil.port}")  # the address itself
                ensure_host(db, f"good.test:{good.port}")
            db.close()
            env = {"SKYRELAY_OUTBOUND_ALLOWED_NETWORKS": "127.0.0.1/32", "SKYRELAY_OUTBOUND_DNS_SERVER": dns.server,
                   "SKYRELAY_MIRROR_ENABLED": "false"}  # fmt: skip
            relay = RelayProcess(data_dir, database_url=db_url, plc_url="http://127.0.0.1:9", extra_env=env).start()
            try:
                wait_until(lambda: relay.metric("skyrelay_upstream_reconnects_total", reason="refused_address") >= 4,
                           30, "two refused connections to each evil host")  # fmt: skip
                wait_until(lambda: good.connections >= 1, 30, "a connection to good.test")
                assert evil.connections_so_far() == 0
            finally:
                relay.stop()
