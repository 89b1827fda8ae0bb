"""Admin page sessions: sign-in with the admin password, the session cookie, CSRF tokens, number formatting.

The session is Flask's signed cookie (key: ``admin_session_secret``, or random per start-up),
HttpOnly, SameSite=Lax, Secure when the request came over TLS, and ends after
``admin_session_hours``. Sign-in checks the password with the admin API's ``AdminGuard``, so
the same passwords and the same failed-attempt throttle apply. Every form carries the session's
CSRF token; a POST without the right one is refused 400 before anything is done.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from flask import Flask, Request, request, session
from flask.sessions import SecureCookieSessionInterface

from config.settings import Settings

COOKIE_NAME = "skyrelay_admin"
CSRF_FIELD = "csrf_token"


class _AdminSessionInterface(SecureCookieSessionInterface):
    def get_cookie_secure(self, app: Flask) -> bool:
        return bool(request.is_secure)


def configure_sessions(app: Any, settings: Settings) -> None:
    """Set the app's session cookie up for the admin pages (the only users of sessions)."""
    secret = settings.admin_session_secret.reveal()
    app.secret_key = secret or secrets.token_bytes(32)
    app.session_interface = _AdminSessionInterface()
    app.config.update(SESSION_COOKIE_NAME=COOKIE_NAME, SESSION_COOKIE_HTTPONLY=True,
                      SESSION_COOKIE_SAMESITE="Lax", SESSION_COOKIE_PATH="/admin")  # fmt: skip


def csrf_token() -> str:
    """This session's CSRF token (made on first use)."""
    token = session.get(CSRF_FIELD)
    if not isinstance(token, str):
        token = session[CSRF_FIELD] = secrets.token_urlsafe(32)
    return token


def csrf_ok(req: Request) -> bool:
    expected = session.get(CSRF_FIELD)
    given = req.form.get(CSRF_FIELD, "")
    return isinstance(expected, str) and hmac.compare_digest(given.encode(), expected.encode())


def sign_in() -> None:
    session.clear()
    session["signed_in_at"] = time.time()
    session[CSRF_FIELD] = secrets.token_urlsafe(32)  # a new token after sign-in


def signed_in(max_hours: float, clock: Callable[[], float] = time.time) -> bool:
    at = session.get("signed_in_at")
    return isinstance(at, int | float) and 0 <= clock() - at <= max_hours * 3600


# -- formatting for people (Jinja filters) -----------------------------------------------------
def fmt_number(value: Any, digits: int = 0) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and digits:
        return f"{value:,.{digits}f}"
    return f"{round(value):,}"


def fmt_bytes(value: Any) -> str:
    if value is None:
        return "—"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    return f"{size:,.1f} TiB"  # pragma: no cover


def fmt_duration(seconds: Any) -> str:
    if seconds is None:
        return "—"
    s = int(max(0, seconds))
    if s < 60:
        return f"{s} s"
    parts = [(s // 86400, "d"), (s % 86400 // 3600, "h"), (s % 3600 // 60, "min")]
    shown = [f"{n} {u}" for n, u in parts if n][:2]
    return " ".join(shown)


def fmt_since(iso: Any, now: Callable[[], float] = time.time) -> str:
    """``2026-01-02T03:04:05Z`` -> ``5 min ago``."""
    if not isinstance(iso, str) or not iso:
        return "—"
    at = datetime.fromisoformat(iso.replace("Z", "+00:00")).astimezone(UTC).timestamp()
    return "just now" if now() - at < 5 else fmt_duration(now() - at) + " ago"


FILTERS: dict[str, Callable[..., str]] = {
    "num": fmt_number,
    "bytes": fmt_bytes,
    "duration": fmt_duration,
    "since": fmt_since,
}
