"""Admin page sign-in, cookie and CSRF rules, and the number formatting of the pages (Flask test client)."""

from __future__ import annotations

import re
from typing import Any

from flask import Flask
from flask.testing import FlaskClient

from config.settings import Secret, Settings
from web.admin_auth import AdminGuard
from web.admin_pages import admin_pages_blueprint
from web.admin_session import fmt_bytes, fmt_duration, fmt_number

PASSWORD = "a-long-admin-password"


class FakeRelay:
    """The one ``Relay`` operation these tests reach, recorded."""

    def __init__(self) -> None:
        self.banned: list[str] = []

    def list_domain_bans(self) -> list[str]:
        return list(self.banned)

    def trusted_domains(self) -> list[str]:
        return []

    def ban_domain(self, domain: Any) -> list[str]:
        self.banned.append(domain)
        return []


def make(max_failures: int = 3, **settings: Any) -> tuple[FlaskClient, FakeRelay]:
    relay = FakeRelay()
    guard = AdminGuard([PASSWORD], max_failures=max_failures, window_seconds=300)
    app = Flask("test")
    app.register_blueprint(admin_pages_blueprint(relay=relay, guard=guard, settings=Settings(**settings)))
    return app.test_client(), relay


def token(client: FlaskClient, path: str = "/admin/ui/login") -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', client.get(path).get_data(as_text=True))
    assert found is not None
    return found[1]


def sign_in(client: FlaskClient, password: str = PASSWORD) -> Any:
    return client.post("/admin/ui/login", data={"password": password, "csrf_token": token(client)})


def test_pages_need_a_sign_in_and_the_cookie_is_httponly_lax() -> None:
    client, _ = make()
    answer = client.get("/admin/ui/domains")
    assert answer.status_code == 302 and "/admin/ui/login" in answer.headers["Location"]
    answer = sign_in(client)
    assert answer.status_code == 303
    cookie = answer.headers["Set-Cookie"]
    assert "skyrelay_admin=" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert "Secure" not in cookie and "Path=/admin" in cookie
    assert client.get("/admin/ui/domains").status_code == 200


def test_cookie_is_secure_over_tls() -> None:
    client, _ = make()
    found = re.search(r'value="([^"]+)"', client.get("/admin/ui/login", base_url="https://relay.test").get_data(True))
    assert found is not None
    answer = client.post("/admin/ui/login", base_url="https://relay.test",
                         data={"password": PASSWORD, "csrf_token": found[1]})  # fmt: skip
    assert answer.status_code == 303 and "Secure" in answer.headers["Set-Cookie"]


def test_a_post_without_the_csrf_token_changes_nothing() -> None:
    client, relay = make()
    sign_in(client)
    for data in ({"domain": "evil.example"}, {"domain": "evil.example", "csrf_token": "forged"}):
        answer = client.post("/admin/ui/domains/ban", data=data)
        assert answer.status_code == 400 and "did not come from this site" in answer.get_data(as_text=True)
    assert relay.banned == []
    good = client.post(
        "/admin/ui/domains/ban", data={"domain": "evil.example", "csrf_token": token(client, "/admin/ui/domains")}
    )
    assert good.status_code == 303 and relay.banned == ["evil.example"]
    # a sign-in form without its token is refused too (login CSRF)
    assert client.post("/admin/ui/login", data={"password": PASSWORD}).status_code == 400


def test_wrong_passwords_are_refused_then_throttled_like_the_api() -> None:
    client, _ = make(max_failures=2)
    for _ in range(2):
        answer = sign_in(client, "wrong-password-123")
        assert answer.status_code == 401 and "WWW-Authenticate" not in answer.headers
        assert "Wrong password." in answer.get_data(as_text=True)
    answer = sign_in(client)  # the right password, but too many failures from this address
    assert answer.status_code == 429 and int(answer.headers["Retry-After"]) > 0
    assert client.get("/admin/ui/domains").status_code == 302


def test_sign_out_and_session_expiry() -> None:
    client, _ = make()
    sign_in(client)
    answer = client.post("/admin/ui/logout", data={"csrf_token": token(client, "/admin/ui/domains")})
    assert answer.status_code == 303
    assert client.get("/admin/ui/domains").status_code == 302
    expired, _ = make(admin_session_hours=0.0)
    sign_in(expired)
    assert expired.get("/admin/ui/domains").status_code == 302  # even a second old is too old


def test_without_a_password_the_pages_are_off() -> None:
    app = Flask("test")
    guard = AdminGuard([], max_failures=3, window_seconds=300)
    app.register_blueprint(admin_pages_blueprint(relay=FakeRelay(), guard=guard, settings=Settings()))
    assert app.test_client().get("/admin/ui/login").status_code == 404


def test_session_secret_from_settings() -> None:
    app = Flask("test")
    guard = AdminGuard([PASSWORD], max_failures=3, window_seconds=300)
    settings = Settings(admin_session_secret=Secret("s" * 40))
    app.register_blueprint(admin_pages_blueprint(relay=FakeRelay(), guard=guard, settings=settings))
    assert app.secret_key == "s" * 40


def test_numbers_for_people() -> None:
    assert fmt_number(1234567) == "1,234,567" and fmt_number(None) == "—" and fmt_number(2.25, 1) == "2.2"
    assert fmt_bytes(512) == "512 B" and fmt_bytes(5 * 1024 * 1024) == "5.0 MiB"
    assert fmt_duration(42) == "42 s" and fmt_duration(3 * 86400 + 7200 + 60) == "3 d 2 h"
    assert fmt_duration(3600 + 120) == "1 h 2 min"
