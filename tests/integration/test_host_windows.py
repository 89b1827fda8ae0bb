"""A host over its hour window is held, not dropped, and raising its limits releases it (real relay subprocess)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.integration.test_admin_control import PASSWORD, Pds, frames_after, ok
from tests.support.consumer import collect
from tests.support.procs import FrameHost, RelayProcess, wait_until


def test_hour_window_holds_events_until_the_limit_is_raised(tmp_path: Path, plc: Any, host: FrameHost) -> None:
    pds = Pds(host, plc)
    alice = pds.account()
    env = {
        "SKYRELAY_ADMIN_PASSWORD": PASSWORD,
        "SKYRELAY_DEFAULT_HOST_ACCOUNT_LIMIT": "1",
        "SKYRELAY_DEFAULT_HOST_EVENTS_PER_HOUR": "3",  # 3 + the account limit (1): 4 events an hour
    }
    relay = RelayProcess(tmp_path / "relay", database_url=f"sqlite:///{tmp_path / 'relay.sqlite'}", plc_url=plc.url,
                         extra_env=env).start()  # fmt: skip
    try:
        ok(relay, "POST", "/admin/pds/requestCrawl", body={"hostname": host.hostname})
        wait_until(lambda: host.status()["subscribers"] == 1, 20, "relay to subscribe")
        [row] = ok(relay, "GET", "/admin/pds/list")
        assert row["PerHourEventRate"] == {"Max": 4, "Window": 3600}
        pds.commits(alice, n=8)
        assert len(frames_after(relay, 0, 4)) == 4, relay.log()
        held = collect(relay.ws_url, cursor=4, count=1, timeout=2)  # a short look: the fifth is held
        assert held == []
        assert relay.metric("skyrelay_events_dropped_total") == 0

        ok(relay, "POST", "/admin/pds/changeLimits", body={"host": host.hostname, "repo_limit": 1000})
        frames = frames_after(relay, 0, 8)
        assert [body["seq"] for _, body in frames] == list(range(1, 9)), relay.log()
        assert relay.metric("skyrelay_events_dropped_total") == 0
    finally:
        assert relay.stop() == 0, relay.log()
