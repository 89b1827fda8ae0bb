"""The admin API's edge: authentication, the failure throttle, parameter parsing, refusals change nothing."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from actors.control_errors import ControlError
from config import ConfigError, load_settings
from tests.support.fakes import BlueprintServices
from web.admin_api import admin_blueprint
from web.admin_auth import AdminGuard, given_password
from web.app import create_app

DID = "did:plc:ewvi7nxzyoun6zhxrhs64oiz"
PASSWORD = "correct-horse-battery"
OTHER = "rotated-password-2"


def basic(password: str, user: str = "admin") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


class FakeRelay:
    """Records the operations asked for; refuses a did of 'did:plc:unknown' like the real one."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def take_down(self, did: object) -> int:
        if did == "did:plc:unknown":
            raise ControlError("RepoNotFound", "unknown", 404)
        self.calls.append(("take_down", did))
        return 7

    def set_per_day_limit(self, limit: object) -> None:
        self.calls.append(("set_per_day_limit", limit))

    def set_crawl_enabled(self, enabled: bool) -> None:
        self.calls.append(("set_crawl_enabled", enabled))

    def upstream_conns(self) -> list[str]:
        return ["pds.example.com"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def client(relay: Any, passwords: tuple[str, ...] = (PASSWORD, OTHER), clock: Any = None) -> Any:
    guard = AdminGuard(passwords, max_failures=3, window_seconds=60, clock=clock or Clock())
    return create_app(BlueprintServices(admin_blueprint(relay=relay, guard=guard))).test_client()


def test_basic_and_bearer_with_any_configured_password() -> None:
    relay = FakeRelay()
    c = client(relay)
    for headers in (basic(PASSWORD), basic(OTHER), {"Authorization": f"Bearer {PASSWORD}"}):
        resp = c.get("/admin/subs/getUpstreamConns", headers=headers)
        assert resp.status_code == 200 and resp.json == ["pds.example.com"]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        basic("wrong-password-1"),
        basic(PASSWORD, "root"),
        {"Authorization": "Bearer "},
        {"Authorization": "Basic !!!"},
        {"Authorization": f"Token {PASSWORD}"},
    ],
)
def test_refused_credentials_get_401_with_www_authenticate_and_change_nothing(headers: dict[str, str]) -> None:
    relay = FakeRelay()
    resp = client(relay).post("/admin/repo/takeDown", json={"did": DID}, headers=headers)
    assert resp.status_code == 401
    assert resp.json["error"] == "AuthRequired"
    assert resp.headers["WWW-Authenticate"].startswith("Basic realm=")
    assert relay.calls == []


def test_failed_attempts_are_throttled_per_address_until_the_window_passes() -> None:
    relay, clock = FakeRelay(), Clock()
    c = client(relay, clock=clock)
    for _ in range(3):
        assert c.post("/admin/repo/takeDown", json={"did": DID}, headers=basic("guess-guess-guess")).status_code == 401
    # even the right password is refused now, from this address
    throttled = c.post("/admin/repo/takeDown", json={"did": DID}, headers=basic(PASSWORD))
    assert throttled.status_code == 429 and throttled.json["error"] == "RateLimitExceeded"
    assert 1 <= int(throttled.headers["Retry-After"]) <= 60
    other = c.post(
        "/admin/repo/takeDown", json={"did": DID}, headers=basic(PASSWORD), environ_base={"REMOTE_ADDR": "10.1.2.3"}
    )
    assert other.status_code == 200
    assert relay.calls == [("take_down", DID)]
    clock.now += 61
    assert c.post("/admin/repo/takeDown", json={"did": DID}, headers=basic(PASSWORD)).status_code == 200


def test_admin_api_is_off_without_a_password() -> None:
    resp = client(FakeRelay(), passwords=()).post("/admin/repo/takeDown", json={"did": DID}, headers=basic(""))
    assert resp.status_code == 404 and resp.json["error"] == "NotFound"


def test_malformed_parameters_are_4xx_and_change_nothing() -> None:
    relay = FakeRelay()
    c = client(relay)
    h = basic(PASSWORD)
    assert c.post("/admin/subs/setPerDayLimit?limit=abc", headers=h).status_code == 400
    assert c.post("/admin/subs/setPerDayLimit?limit=-1", headers=h).status_code == 400
    assert c.post("/admin/subs/setPerDayLimit?limit=%C2%B2", headers=h).status_code == 400
    assert c.post("/admin/subs/setEnabled?enabled=maybe", headers=h).status_code == 400
    assert c.post("/admin/repo/takeDown", data=b"{not json", headers=h).status_code == 400
    assert c.post("/admin/repo/takeDown", json=["a list"], headers=h).status_code == 400
    big = c.post("/admin/repo/takeDown", data=b'{"did": "' + b"x" * 70_000 + b'"}', headers=h)
    assert big.status_code == 413
    unknown = c.post("/admin/repo/takeDown", json={"did": "did:plc:unknown"}, headers=h)
    assert unknown.status_code == 404 and unknown.json["error"] == "RepoNotFound"
    assert relay.calls == []
    assert c.post("/admin/subs/setPerDayLimit?limit=12", headers=h).status_code == 200
    assert c.post("/admin/subs/setEnabled?enabled=false", headers=h).status_code == 200
    ok = c.post("/admin/repo/takeDown", json={"did": DID}, headers=h)
    assert ok.status_code == 200 and ok.json == {"success": "true", "seq": 7}
    assert relay.calls == [("set_per_day_limit", 12), ("set_crawl_enabled", False), ("take_down", DID)]


def test_given_password_parses_basic_and_bearer_only() -> None:
    assert given_password("Bearer abc") == "abc"
    assert given_password("Basic " + base64.b64encode(b"admin:a:b").decode()) == "a:b"
    assert given_password("Basic " + base64.b64encode(b"root:x").decode()) is None
    assert given_password(None) is None


@pytest.mark.parametrize(
    "env",
    [
        {"SKYRELAY_ADMIN_PASSWORD": "short"},
        {"SKYRELAY_ADMIN_PASSWORD": " "},
        {"SKYRELAY_ADMIN_PASSWORD": PASSWORD, "SKYRELAY_ADMIN_EXTRA_PASSWORDS": "ok-long-password,tiny"},
    ],
)
def test_short_admin_passwords_are_refused_at_start_up(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ=env)
    assert "at least 12 characters" in str(info.value)


def test_several_admin_passwords_from_settings() -> None:
    s = load_settings(environ={"SKYRELAY_ADMIN_PASSWORD": PASSWORD, "SKYRELAY_ADMIN_EXTRA_PASSWORDS": f"{OTHER}, "})
    assert s.admin_passwords() == (PASSWORD, OTHER)
    assert load_settings(environ={}).admin_passwords() == ()
