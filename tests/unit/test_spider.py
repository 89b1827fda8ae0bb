"""The spider on its own (real SQLite, fake identity directory): hostile DID documents, bounds, the record walk."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import gevent
import libipld
import pytest
from prometheus_client import REGISTRY

from actors.crawl import CrawlRefused
from actors.spider import Spider, SpiderConfig
from store.db import open_database
from store.migrations import apply_migrations

FAR = "did:plc:" + "f" * 24


@dataclass
class Ident:
    pds_endpoint: str | None


class Directory:
    def __init__(self, docs: dict[str, str | None]) -> None:
        self.docs = docs
        self.lookups: list[str] = []

    def resolve(self, did: str) -> Ident:
        self.lookups.append(did)
        if did not in self.docs:
            raise LookupError(did)
        return Ident(self.docs[did])


def steps(outcome: str) -> float:
    return REGISTRY.get_sample_value("skyrelay_spider_steps_total", {"outcome": outcome}) or 0.0


@pytest.fixture
def db(tmp_path: Path):  # type: ignore[no-untyped-def]
    database = open_database(f"sqlite:///{tmp_path / 'relay.sqlite'}")
    apply_migrations(database)
    return database


def did(n: int) -> str:
    return "did:plc:" + format(n, "024x").translate(str.maketrans("0189", "abcd"))


def test_hostile_endpoints_are_refused_once_and_never_retried(db, caplog) -> None:  # type: ignore[no-untyped-def]
    docs = {did(1): "https://10.0.0.1", did(2): "https://localhost", did(3): "http://pds.example.com",
            did(4): "https://dead.example.com", did(5): "https://dead.example.com", did(6): "https://10.0.0.1",
            did(7): None}  # fmt: skip
    checked: list[str] = []

    def check(hostname: str) -> None:
        checked.append(hostname)
        raise CrawlRefused("HostUnreachable", "no answer")

    subscribed: list[str] = []
    spider = Spider(db, Directory(docs), check, subscribed.append, SpiderConfig(lookups_per_second=1000))
    refused, seen = steps("host_refused"), steps("host_seen")
    with caplog.at_level("INFO", logger="actors.spider"):
        for n in range(1, 8):
            spider.handle(did(n), None)
        for n in range(1, 8):
            spider.handle(did(n), None)  # met again: remembered, not looked up again
    assert checked == ["dead.example.com"]  # only the usable name reached the requestCrawl checks, once
    assert subscribed == []
    assert steps("host_refused") - refused == 4  # 10.0.0.1, localhost, http, dead.example.com
    assert steps("host_seen") - seen == 1  # dead.example.com again (did 5)
    assert len([r for r in caplog.records if "spider host refused" in r.getMessage()]) == 4
    assert steps("no_pds_endpoint") >= 1


def test_a_new_host_is_subscribed_and_a_full_queue_drops(db) -> None:  # type: ignore[no-untyped-def]
    directory = Directory({FAR: "https://far.example.com"})
    subscribed: list[str] = []
    spider = Spider(db, directory, lambda h: None, subscribed.append, SpiderConfig(queue_size=2))
    dropped = steps("dropped_queue_full")
    for n in range(5):
        spider.offer(did(n))  # no worker running: the queue fills and the rest is dropped
    assert steps("dropped_queue_full") - dropped == 3
    spider.handle(did(9), None, ())
    block = libipld.encode_dag_cbor({"subject": FAR})
    spider.handle(did(10), None, (block,))
    assert subscribed == ["far.example.com"]
    assert FAR in directory.lookups


class Refreshing(Directory):
    def refresh(self, did: str) -> Ident:
        return self.resolve(did)


def test_a_moved_hint_is_rechecked_once_per_window_and_a_new_host_is_subscribed(db) -> None:  # type: ignore[no-untyped-def]
    directory = Refreshing({FAR: "https://moved.example.com", did(1): "https://moved.example.com"})
    subscribed: list[str] = []
    config = SpiderConfig(lookups_per_second=1000, recheck_moved_seconds=3600, moved_queue_size=1)
    spider = Spider(db, directory, lambda h: None, subscribed.append, config)
    recent, full = steps("moved_recent"), steps("moved_dropped_queue_full")
    spider.offer_moved(FAR)
    spider.offer_moved(FAR)  # within the window: not looked up again
    spider.offer_moved(did(1), "identity")  # the moved queue (size 1) is full
    assert steps("moved_recent") - recent == 1
    assert steps("moved_dropped_queue_full") - full == 1
    spider.offer(did(2))  # offered after the hint, served before it: the DID queue comes first
    spider.start()
    try:
        deadline = time.monotonic() + 10
        while not subscribed and time.monotonic() < deadline:
            gevent.sleep(0.01)
    finally:
        spider.stop()
    assert subscribed == ["moved.example.com"]
    assert directory.lookups == [did(2), FAR]
