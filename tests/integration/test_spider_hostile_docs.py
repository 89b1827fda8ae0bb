"""Hostile DID documents met by the spider, through the real identity directory and real servers.

A document far over the size cap (a stand-in PLC serving it whole, and a server whose chunked
body never ends), a directory that answers with a redirect, and one that never answers: each
DID is counted as unresolved and logged once, never looked up again, and offers made while
the spider is stuck on a silent directory return at once (the ingest side never waits).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import pytest
from prometheus_client import REGISTRY

from actors.identity import IdentityDirectory
from actors.spider import Spider, SpiderConfig
from store.db import open_database
from store.migrations import apply_migrations
from tests.support.fake_plc import FakePlc, make_did_doc
from tests.support.hostile_http import HostileServer

HUGE = "did:plc:" + "h" * 24
KEY = "did:key:zQ3shokFTS3brHcDQrn82RUDfCZESWL1ZdCEJwekUDPQiYBme"


def steps(outcome: str) -> float:
    return REGISTRY.get_sample_value("skyrelay_spider_steps_total", {"outcome": outcome}) or 0.0


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Any]:
    database = open_database(f"sqlite:///{tmp_path / 'relay.sqlite'}")
    apply_migrations(database)
    yield database
    database.close()


def spider_for(db: Any, plc_url: str, subscribed: list[str]) -> Spider:
    directory = IdentityDirectory(db, plc_url=plc_url, allow_insecure_hosts=True, fetch_timeout_seconds=1.0)
    return Spider(db, directory, lambda h: None, subscribed.append, SpiderConfig(lookups_per_second=1000))


def test_a_huge_document_is_refused_once(db: Any, caplog: pytest.LogCaptureFixture) -> None:
    doc = make_did_doc(HUGE, KEY, "https://pds.example.com")
    doc["alsoKnownAs"] = ["at://" + "x" * 1000 + ".example.com"] * 1000  # ~1 MB, over the 64 KiB cap
    subscribed: list[str] = []
    with FakePlc({HUGE: doc}) as plc:
        spider = spider_for(db, plc.url, subscribed)
        before = steps("did_unresolved")
        with caplog.at_level(logging.INFO, logger="actors.spider"):
            spider.handle(HUGE, None)
            spider.handle(HUGE, None)  # met again: remembered, not fetched again
        assert plc.requests_for(HUGE) == 1
    assert steps("did_unresolved") - before == 1
    assert subscribed == []
    assert len([r for r in caplog.records if "spider did unresolved" in r.getMessage()]) == 1


@pytest.mark.parametrize("mode", ["redirect", "chunked-flood"])
def test_a_redirecting_or_endless_directory_is_refused_once(
    db: Any, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    subscribed: list[str] = []
    with FakePlc({HUGE: make_did_doc(HUGE, KEY, "https://pds.example.com")}) as good:
        options = {"location": f"{good.url}/{HUGE}"} if mode == "redirect" else {}
        with HostileServer(mode, **options) as hostile:
            spider = spider_for(db, f"http://127.0.0.1:{hostile.port}", subscribed)
            before = steps("did_unresolved")
            with caplog.at_level(logging.INFO, logger="actors.spider"):
                spider.handle(HUGE, None)
                spider.handle(HUGE, None)
            hostile.wait_sent(1)  # the first (only) connection is over
            assert hostile.connections == 1
        assert good.requests == 0  # the redirect was not followed
    assert steps("did_unresolved") - before == 1
    assert subscribed == []
    assert len([r for r in caplog.records if "spider did unresolved" in r.getMessage()]) == 1


def test_offers_never_wait_for_a_silent_directory(db: Any) -> None:
    subscribed: list[str] = []
    with HostileServer("silent") as hostile:
        directory = IdentityDirectory(db, plc_url=f"http://127.0.0.1:{hostile.port}", fetch_timeout_seconds=5.0)
        config = SpiderConfig(queue_size=4, lookups_per_second=1000)
        spider = Spider(db, directory, lambda h: None, subscribed.append, config).start()
        try:
            spider.offer(HUGE)
            deadline = time.monotonic() + 10
            while hostile.connections < 1 and time.monotonic() < deadline:  # the worker is now stuck on it
                gevent.sleep(0.01)
            assert hostile.connections == 1
            dropped = steps("dropped_queue_full")
            for n in range(20):  # offers still return at once: queued, then dropped and counted
                spider.offer("did:plc:" + format(n, "024d").translate(str.maketrans("0123456789", "abcdefghij")))
            assert steps("dropped_queue_full") - dropped == 20 - 4
        finally:
            spider.stop()
    assert subscribed == []
