"""Per-host hour and day windows (``actors.host_rate``) measured on a fake clock: no waiting an hour."""

from __future__ import annotations

from actors.host_rate import HostWindows, Window, WindowLimits, window_limits, with_overrides
from actors.host_subscriber import SubscriberConfig
from config.settings import Settings


class FakeTime:
    """A clock that the limiter's sleep moves forward."""

    def __init__(self) -> None:
        self.now = 10_000.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def delivered(windows: HostWindows, t: FakeTime, events: int) -> list[float]:
    """The fake time at which each of ``events`` events is let through."""
    out = []
    for _ in range(events):
        windows.wait()
        out.append(t.now)
    return out


def most_in_any(times: list[float], span: float) -> int:
    """The largest number of events in any window of ``span`` seconds (two pointers)."""
    best, start = 0, 0
    for end, at in enumerate(times):
        while at - times[start] >= span:
            start += 1
        best = max(best, end - start + 1)
    return best


def test_hour_window_caps_the_delivered_volume_and_never_drops() -> None:
    t = FakeTime()
    windows = HostWindows(WindowLimits(per_hour=2500, per_day=None), clock=t.clock, sleep=t.sleep)
    times = delivered(windows, t, 7000)
    assert len(times) == 7000  # every event got through: slowed, not dropped
    assert most_in_any(times, 3600.0) <= 2500
    assert times[2499] == times[0]  # the first hour's worth goes at once ...
    assert times[2500] > times[0] + 3600 - 3600 / 60  # ... then the next waits for the window to move
    assert 2 * 3600 - 60 <= times[-1] - times[0] <= 3 * 3600  # 7,000 events take between two and three hours


def test_day_window_over_hour_window() -> None:
    t = FakeTime()
    windows = HostWindows(WindowLimits(per_hour=2500, per_day=20_000), clock=t.clock, sleep=t.sleep)
    times = delivered(windows, t, 45_000)
    assert most_in_any(times, 3600.0) <= 2500
    assert most_in_any(times, 86400.0) <= 20_000
    assert times[-1] - times[0] >= 2 * 86400 - 86400 / 60  # the third day's events wait for the day window


def test_sparse_events_never_wait() -> None:
    t = FakeTime()
    windows = HostWindows(WindowLimits(per_hour=2500, per_day=20_000), clock=t.clock, sleep=t.sleep)
    for _ in range(5000):
        assert windows.wait() == 0.0
        t.now += 4.0  # 900 an hour: under both limits
    assert t.slept == []


def test_window_delay_is_until_the_oldest_slot_ages_out() -> None:
    window = Window(limit=3, seconds=60.0)  # 1 s slots
    for at in (0.5, 10.2, 10.7):
        window.add(at)
    assert window.count(11.0) == 3 and window.delay(11.0) == 60.0 - 11.0 + 1.0  # slot [0, 1) leaves at 61
    assert window.delay(61.0) == 0.0 and window.count(61.0) == 2


def test_limits_scale_with_the_account_limit_and_trust() -> None:
    assert window_limits(2500, 20_000, None) == WindowLimits(2500, 20_000)
    assert window_limits(2500, 20_000, 1000) == WindowLimits(3500, 30_000)
    assert window_limits(2500, 20_000, 0, trusted=True, trusted_multiplier=10) == WindowLimits(25_000, 200_000)
    assert window_limits(None, 0, 1000) == WindowLimits(None, None)  # 0 or unset: no limit
    assert HostWindows(WindowLimits(None, None)).windows == []


def test_a_bounded_wait_returns_so_new_limits_can_apply() -> None:
    t = FakeTime()
    windows = HostWindows(WindowLimits(per_hour=2, per_day=None), clock=t.clock, sleep=t.sleep)
    assert windows.wait(max_sleep=1.0) == 0.0 and windows.wait(max_sleep=1.0) == 0.0
    assert windows.wait(max_sleep=1.0) == -1.0  # full: slept one second, counted nothing
    assert t.slept == [1.0] and windows.windows[0].count(t.now) == 2


def test_settings_reach_the_subscriber_config() -> None:
    config = SubscriberConfig.from_settings(Settings())
    assert (config.events_per_hour, config.events_per_day, config.trusted_rate_multiplier) == (2500, 20_000, 10.0)


def test_a_hosts_own_limits_win_over_the_scaled_defaults_and_hold_delivery() -> None:
    scaled = window_limits(2500, 20_000, 1000)
    assert with_overrides(scaled, WindowLimits(None, None)) == scaled
    assert with_overrides(scaled, WindowLimits(10, None)) == WindowLimits(10, 30_000)  # not scaled
    assert with_overrides(scaled, WindowLimits(None, 40)) == WindowLimits(3500, 40)
    # a host set to 3 per hour and 5 per day: the 4th event waits an hour, the 6th a day
    t = FakeTime()
    start = t.now
    windows = HostWindows(with_overrides(scaled, WindowLimits(3, 5)), clock=t.clock, sleep=t.sleep)
    at = [when - start for when in delivered(windows, t, 6)]
    assert at[:3] == [0.0, 0.0, 0.0]
    assert 3600.0 <= at[3] <= 3600.0 + 3600.0 / 60 and at[4] == at[3]
    assert at[5] >= 86_400.0
