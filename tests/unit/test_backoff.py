"""Retrying infrastructure failures: backoff, repair between attempts, give-up, and the account cache's use of it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import peewee
import pytest

from actors.accounts import AccountCache, AccountState
from actors.backoff import RetryPolicy, retry
from actors.metrics import INFRA_FAILING, INFRA_RETRIES
from store.accounts import upsert_accounts
from store.db import TRANSIENT_DB_ERRORS, open_database
from store.migrations import apply_migrations

FAST = RetryPolicy(give_up_after_seconds=30, base_seconds=0.001, max_seconds=0.002)


def test_retry_backs_off_repairs_and_returns() -> None:
    attempts: list[str] = []
    sleeps: list[float] = []

    def flaky() -> str:
        attempts.append("try")
        if attempts.count("try") < 4:
            raise peewee.OperationalError("server closed the connection unexpectedly\nmore detail")
        return "done"

    before = INFRA_RETRIES.labels("unit_flaky")._value.get()
    result = retry(flaky, operation="unit_flaky", retry_on=TRANSIENT_DB_ERRORS,
                   policy=RetryPolicy(base_seconds=0.1, max_seconds=0.3), repair=lambda: attempts.append("repair"),
                   sleep=sleeps.append)  # fmt: skip
    assert result == "done"
    assert attempts == ["try", "repair", "try", "repair", "try", "repair", "try"]
    assert len(sleeps) == 3 and sleeps[0] < sleeps[1] and max(sleeps) <= 0.3 * 1.25  # exponential, capped
    assert INFRA_RETRIES.labels("unit_flaky")._value.get() - before == 3
    assert INFRA_FAILING.labels("unit_flaky")._value.get() == 0  # not failing any more


def test_retry_gives_up_after_the_policy_limit_and_other_errors_pass_through() -> None:
    clock = [0.0]

    def sleep(seconds: float) -> None:
        clock[0] += seconds

    def always_locked() -> None:
        raise peewee.OperationalError("database is locked")

    with pytest.raises(peewee.OperationalError, match="locked"):
        retry(always_locked, operation="unit_locked", retry_on=TRANSIENT_DB_ERRORS,
              policy=RetryPolicy(give_up_after_seconds=10, base_seconds=1, max_seconds=2), sleep=sleep,
              clock=lambda: clock[0])  # fmt: skip
    assert 10 <= clock[0] < 14
    assert INFRA_FAILING.labels("unit_locked")._value.get() == 0

    def bug() -> None:
        raise peewee.IntegrityError("UNIQUE constraint failed")  # a bug, not an outage: no retry

    with pytest.raises(peewee.IntegrityError):
        retry(bug, operation="unit_bug", retry_on=TRANSIENT_DB_ERRORS, policy=FAST)


class FlakyDatabase(peewee.SqliteDatabase):
    """SQLite whose next ``failures`` statements fail as a restarting server's would."""

    failures = 0

    def execute_sql(self, sql: str, params: Any = None, *args: Any, **kwargs: Any) -> Any:
        if self.failures:
            self.failures -= 1
            raise peewee.OperationalError("the database system is starting up")
        return super().execute_sql(sql, params, *args, **kwargs)


def test_account_cache_waits_for_the_database_instead_of_failing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'main.sqlite'}"
    setup = open_database(url)
    apply_migrations(setup)
    with setup.connection_context():
        upsert_accounts(setup, [AccountState("did:plc:a", None, rev="3kaaa").to_row()])
    setup.close()
    db = FlakyDatabase(str(tmp_path / "main.sqlite"))
    cache = AccountCache(db, retry_policy=FAST)
    db.failures = 3
    state = cache.get("did:plc:a")  # it used to raise: the subscriber crashed and re-read from an old cursor
    assert state is not None and state.rev == "3kaaa"
    assert db.failures == 0
