"""Where the admin CLI finds a running relay: flags first, then the environment, then the default."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from config.settings import Secret

DEFAULT_ADMIN_URL = "http://127.0.0.1:2470"
URL_ENV = "SKYRELAY_ADMIN_URL"  # base URL of the relay's admin API
PASSWORD_ENV = "SKYRELAY_ADMIN_PASSWORD"  # the same variable the relay reads its admin password from


@dataclass(frozen=True, slots=True)
class AdminClientConfig:
    url: str
    password: Secret


def admin_client_config(
    url: str | None, password: str | None, environ: Mapping[str, str] | None = None
) -> AdminClientConfig:
    """The relay's URL and admin password for ``skyrelay admin``; empty password when none is given."""
    env = os.environ if environ is None else environ
    chosen = url or env.get(URL_ENV) or DEFAULT_ADMIN_URL
    secret = password if password is not None else env.get(PASSWORD_ENV, "")
    return AdminClientConfig(chosen.rstrip("/"), Secret(secret))
