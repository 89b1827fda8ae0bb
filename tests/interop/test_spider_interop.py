"""Interop: spidering (issue 10's evidence) against two reference PDSes.

The relay is told about the first PDS only. An account there follows an account on the
second PDS: the follow record names its DID, whose DID document names the second PDS. The
relay resolves it, crawls the second PDS (the requestCrawl checks) and subscribes to it, and
that account's next commit appears on the relay's firehose. With spidering off, nothing
leads the relay to the second PDS (the same test fails). The spider is fed from the durable
event path, so a firehose-only relay (no repo mirror) discovers the same way.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.interop.refpds import ReferenceNetwork
from tests.interop.test_discovery_interop import admin_hosts, carstore_url  # noqa: F401  (a fixture)
from tests.interop.test_mirror_interop import Account, FirehoseWatch, crawl, poll, start_relay

ENV = {"SKYRELAY_ADMIN_PASSWORD": "discovery-test", "SKYRELAY_ENUMERATE_SCAN_SECONDS": "0.5"}


@pytest.mark.interop
@pytest.mark.parametrize("mirror", ["true", "false"])
def test_a_did_in_a_record_leads_the_relay_to_a_second_pds(
    mirror: str,
    reference_network: ReferenceNetwork,
    tmp_path: Path,
    db_url: str,
    carstore_url: str | None,  # noqa: F811
) -> None:
    net = reference_network
    near_pds, far_pds = net.pds_urls
    far_host = urlsplit(far_pds).netloc
    far = Account.create(net, far_pds, "far")
    relay = start_relay(tmp_path / "relay", db_url, carstore_url, net.plc_url, **ENV, SKYRELAY_MIRROR_ENABLED=mirror)
    try:
        crawl(relay, near_pds)
        assert far_host not in admin_hosts(relay)
        near = Account.create(net, near_pds, "near")
        follow = {"$type": "app.bsky.graph.follow", "subject": far.did,
                  "createdAt": datetime.now(UTC).isoformat().replace("+00:00", "Z")}  # fmt: skip
        net.create_record(near.did, "app.bsky.graph.follow", follow)
        poll(relay, lambda: admin_hosts(relay).get(far_host, {}).get("HasActiveConnection") is True,
             "the relay to discover and subscribe to the second PDS")  # fmt: skip
        assert f"spider discovered host host={far_host}" in relay.log()
        assert relay.metric("skyrelay_spider_steps_total", outcome="host_subscribed") >= 1
        with FirehoseWatch(f"{relay.ws_url}/xrpc/com.atproto.sync.subscribeRepos") as watch:
            path = far.create_record()
            watch.wait_for("#commit", far.did, rev=far.pds_head()[1])
        assert path in far.records
    finally:
        assert relay.stop() == 0, relay.log()
