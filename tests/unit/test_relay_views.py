"""The admin pages' host table and dashboard figures (``actors.relay_views``) over fakes: 3,000 hosts, a clock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from actors.relay_views import ViewOps
from config.settings import Settings
from store.db import open_database
from store.migrations import apply_migrations


class FakeLog:
    def __init__(self, directory: Path) -> None:
        self.directory = directory


class FakeSupervisor:
    def __init__(self, directory: Path) -> None:
        self.event_log = FakeLog(directory)
        self.carstore = None
        self.registry: list[object] = []


class Views(ViewOps):
    """ViewOps with the Relay parts it uses replaced by a fixed host list and a hand-driven clock."""

    def __init__(self, tmp_path: Path, hosts: list[dict[str, Any]]) -> None:
        self.settings = Settings()
        self.db = open_database(f"sqlite:///{tmp_path / 'relay.sqlite'}")
        apply_migrations(self.db)
        self.supervisor = FakeSupervisor(tmp_path)
        self.now = 1000.0
        self.clock = lambda: self.now
        self.hosts = hosts
        self._init_views()

    def list_hosts(self) -> list[dict[str, Any]]:
        return [dict(h) for h in self.hosts]

    def upstream_conns(self) -> list[str]:
        return [h["Host"] for h in self.hosts if h["HasActiveConnection"]]


def host(i: int, **kw: Any) -> dict[str, Any]:
    row = {"Host": f"pds{i:04d}.example.com", "Status": "active", "Cursor": i * 10, "RepoCount": i % 97,
           "RepoLimit": 96, "Blocked": False, "HasActiveConnection": i % 2 == 0, "LastError": None}  # fmt: skip
    row.update(kw)
    return row


def test_filter_sort_and_pages_over_3000_hosts(tmp_path: Path) -> None:
    hosts = [host(i) for i in range(3000)]
    hosts[7].update(Status="banned", Blocked=True, HasActiveConnection=False)
    hosts[8].update(Status="offline", HasActiveConnection=False, LastError="connection refused")
    views = Views(tmp_path, hosts)

    first = views.host_table(per_page=50)
    assert first["total"] == 3000 and first["matching"] == 3000 and first["pages"] == 60
    assert [h["Host"] for h in first["hosts"][:2]] == ["pds0000.example.com", "pds0001.example.com"]
    last = views.host_table(per_page=50, page=999)  # clamped to the last page
    assert last["page"] == 60 and last["hosts"][-1]["Host"] == "pds2999.example.com"

    assert views.host_table(query="PDS12")["matching"] == 100  # pds12xx, case-insensitive
    assert [h["Host"] for h in views.host_table(status="blocked")["hosts"]] == ["pds0007.example.com"]
    assert [h["Host"] for h in views.host_table(status="errors")["hosts"]] == ["pds0008.example.com"]
    assert [h["Host"] for h in views.host_table(status="offline")["hosts"]] == ["pds0008.example.com"]
    assert views.host_table(status="connected")["matching"] == 1499  # the even ones but pds0008
    at_limit = views.host_table(status="at_limit", per_page=500)["hosts"]
    assert len(at_limit) == 30 and all(h["RepoCount"] == 96 and h["AtAccountLimit"] for h in at_limit)

    by_accounts = views.host_table(sort="accounts", descending=True, per_page=3)["hosts"]
    assert [h["RepoCount"] for h in by_accounts] == [96, 96, 96]
    assert views.host_detail("pds2500.example.com")["Cursor"] == 25000  # type: ignore[index]
    assert views.host_detail("nope.example.com") is None


def test_host_rates_come_from_cursor_advances(tmp_path: Path) -> None:
    hosts = [host(1, Cursor=100), host(2, Cursor=500)]
    views = Views(tmp_path, hosts)
    assert views.host_table()["hosts"][0]["EventsPerSecond"] is None  # one snapshot: no rate yet
    views.now += 10
    hosts[0]["Cursor"] = 350
    table = views.host_table(sort="rate", descending=True)
    assert [(h["Host"], h["EventsPerSecond"]) for h in table["hosts"]] == [
        ("pds0001.example.com", 25.0),
        ("pds0002.example.com", 0.0),
    ]


def test_dashboard_figures(tmp_path: Path) -> None:
    (tmp_path / "segment-1.log").write_bytes(b"x" * 3000)
    views = Views(tmp_path, [host(0), host(1)])
    first = views.dashboard()
    assert first["events_in_per_second"] is None and first["hosts_connected"] == 1 and first["consumers"] == 0
    assert first["event_log_bytes"] >= 3000 and first["mirror_bytes"] is None
    views.now += 2
    second = views.dashboard()
    assert second["events_in_per_second"] is not None and second["rate_window_seconds"] == 2


def test_host_rows_carry_the_listing_walk_progress(tmp_path: Path) -> None:
    hosts = [host(1), host(2, EnumerationState="running", EnumeratedAccounts=1234, EnumerationError=None),
             host(3, EnumerationState="stopped", EnumeratedAccounts=7, EnumerationError="BadPage"),
             host(4, EnumerationState="done", EnumeratedAccounts=0)]  # fmt: skip
    views = Views(tmp_path, hosts)
    rows = {h["Host"]: h["Listing"] for h in views.host_table()["hosts"]}
    assert list(rows.values()) == [None, "listing: 1,234 accounts", "listing stopped: 7 accounts (BadPage)",
                                   "listed: 0 accounts"]  # fmt: skip
    detail = views.host_detail("pds0002.example.com")
    assert detail is not None and detail["Listing"] == "listing: 1,234 accounts"
