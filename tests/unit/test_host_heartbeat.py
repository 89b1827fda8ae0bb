"""The shared heartbeat: beats every member, survives a failing one, runs only while it has members."""

from __future__ import annotations

import time

import gevent

from actors.host_heartbeat import Heartbeat


class Member:
    def __init__(self, fail: bool = False) -> None:
        self.beats: list[float] = []
        self.fail = fail

    def beat(self, now: float) -> None:
        self.beats.append(now)
        if self.fail:
            raise RuntimeError("a bug in one member")


def wait_for(check: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        gevent.sleep(0.01)


def test_every_member_is_beaten_by_one_greenlet_even_past_a_failing_one() -> None:
    heartbeat = Heartbeat(interval=10.0)
    broken, members = Member(fail=True), [Member() for _ in range(3)]
    heartbeat.add(broken)
    for member in members:
        heartbeat.add(member, interval=0.02)  # the shortest interval asked for wins
    assert heartbeat.interval == 0.02
    wait_for(lambda: all(len(m.beats) >= 2 for m in members))
    assert len(broken.beats) >= 2  # still beaten: its failure is logged, not fatal
    for member in (broken, *members):
        heartbeat.discard(member)
    wait_for(lambda: heartbeat._greenlet is None)  # no members: no timer left
    counts = [len(m.beats) for m in members]
    gevent.sleep(0.1)
    assert [len(m.beats) for m in members] == counts


def test_a_member_added_after_the_timer_ended_starts_it_again() -> None:
    heartbeat = Heartbeat(interval=0.02)
    first = Member()
    heartbeat.add(first)
    wait_for(lambda: first.beats)
    heartbeat.discard(first)
    wait_for(lambda: heartbeat._greenlet is None)
    second = Member()
    heartbeat.add(second)
    wait_for(lambda: second.beats)
    heartbeat.discard(second)
