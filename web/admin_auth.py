"""Admin API authentication: Basic ``admin:<password>`` or ``Bearer <password>``, and a failure throttle.

Several passwords may be valid at once (rotation). Every one is compared in constant time and
all are compared on each request, so timing tells nothing of which one nearly matched. A client
address with ``max_failures`` failed attempts in the last ``window_seconds`` is answered 429
(with ``Retry-After``) before its credentials are even looked at, until its failures age out.
A 401 carries ``WWW-Authenticate``. The failure table is bounded (oldest addresses dropped).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence

from prometheus_client import Counter

from web.xrpc_errors import XrpcError

ADMIN_AUTH_FAILURES = Counter("skyrelay_admin_auth_failures_total", "Refused admin API requests, by reason", ["reason"])
MAX_TRACKED_CLIENTS = 10_000


class AdminAuthError(XrpcError):
    """A refused admin request; ``headers`` go on the answer (``WWW-Authenticate``, ``Retry-After``)."""

    def __init__(self, error: str, message: str, status: int, headers: dict[str, str]) -> None:
        super().__init__(error, message, status)
        self.headers = headers


def given_password(header: str | None) -> str | None:
    """The password in an ``Authorization`` header (Basic as user ``admin``, or Bearer), else None."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        return value or None
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(":")
    return password if sep and user == "admin" else None


class AdminGuard:
    def __init__(self, passwords: Sequence[str], *, max_failures: int, window_seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self._passwords = [p.encode() for p in passwords]
        self.max_failures = max_failures
        self.window_seconds = window_seconds
        self.clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return bool(self._passwords)

    def check(self, remote: str, header: str | None) -> None:
        """Return if the request is authorized; raise ``AdminAuthError`` (401 or 429) if not."""
        now = self.clock()
        failures = self._recent(remote, now)
        if failures is not None and len(failures) >= self.max_failures:
            ADMIN_AUTH_FAILURES.labels("throttled").inc()
            retry = max(1, math.ceil(failures[0] + self.window_seconds - now))
            raise AdminAuthError("RateLimitExceeded", "too many failed admin sign-ins; try again later", 429,
                                 {"Retry-After": str(retry)})  # fmt: skip
        given = given_password(header)
        ok = False
        if given is not None:
            candidate = given.encode()
            for password in self._passwords:  # no early exit: every password is compared
                ok |= hmac.compare_digest(candidate, password)
        if ok:
            return
        ADMIN_AUTH_FAILURES.labels("missing" if given is None else "wrong").inc()
        if given is not None:  # a request without credentials is a prompt, not a guess
            self._record(remote, now)
        raise AdminAuthError("AuthRequired", "admin credentials required", 401,
                             {"WWW-Authenticate": 'Basic realm="skyrelay admin", charset="UTF-8"'})  # fmt: skip

    def _recent(self, remote: str, now: float) -> deque[float] | None:
        failures = self._failures.get(remote)
        if failures is None:
            return None
        while failures and failures[0] <= now - self.window_seconds:
            failures.popleft()
        if not failures:
            del self._failures[remote]
            return None
        return failures

    def _record(self, remote: str, now: float) -> None:
        failures = self._failures.setdefault(remote, deque())
        self._failures.move_to_end(remote)
        failures.append(now)
        while len(failures) > self.max_failures:
            failures.popleft()
        while len(self._failures) > MAX_TRACKED_CLIENTS:
            self._failures.popitem(last=False)
