"""Host placement over ingest workers: fewest hosts first, sticky while the relay runs."""

from __future__ import annotations

from collections import Counter

from actors.ingest_pool import IngestPool
from actors.messages import StartHost, StopHost
from config.settings import Settings


def placed(pool: IngestPool) -> Counter[int]:
    return Counter(pool.hosts.values())


def test_hosts_are_spread_evenly_whatever_their_names() -> None:
    pool = IngestPool(Settings(), sequencer=None, count=2)  # not started: placement only, nothing is sent
    for i in range(20):
        pool.tell(StartHost(f"pds{i}.example.com"))
    assert placed(pool) == Counter({0: 10, 1: 10})
    pool3 = IngestPool(Settings(), sequencer=None, count=3)
    for i in range(7):
        pool3.tell(StartHost(f"host-{i * 7919}.test"))
    assert sorted(placed(pool3).values()) == [2, 2, 3]


def test_a_host_started_again_keeps_its_worker_and_a_stopped_host_frees_its_place() -> None:
    pool = IngestPool(Settings(), sequencer=None, count=2)
    for name in ("a.test", "b.test", "c.test"):
        pool.tell(StartHost(name))
    before = dict(pool.hosts)
    pool.tell(StartHost("a.test"))  # a reconnect request: same worker, no double count
    assert pool.hosts == before and pool.host_counts == [2, 1]
    pool.tell(StopHost("a.test", "test"))
    pool.tell(StopHost("c.test", "test"))
    assert pool.host_counts == [0, 1]
    pool.tell(StartHost("d.test"))
    assert pool.hosts["d.test"] == 0
