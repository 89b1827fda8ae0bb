"""Test fixtures for every suite: the database URLs under test."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def postgres_schema(base_url: str, *, prefix: str) -> Iterator[str]:
    """A URL for a fresh PostgreSQL schema (via search_path) on ``base_url``'s database; dropped after.

    ``options`` already in ``base_url`` (another schema's search_path) are replaced.
    """
    import uuid
    from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

    import psycopg2

    parts = urlsplit(base_url)
    base = urlunsplit(parts._replace(query=urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != "options"])))
    schema = prefix + uuid.uuid4().hex[:12]
    conn = psycopg2.connect(base)
    conn.autocommit = True
    conn.cursor().execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in base else "?"
    try:
        yield f"{base}{sep}options={quote('-csearch_path=' + schema)}"
    finally:
        conn.cursor().execute(f"DROP SCHEMA {schema} CASCADE")
        conn.close()


def _postgres_params() -> list[object]:
    url = os.environ.get("TEST_DATABASE_URL")
    return [pytest.param(url, id="postgres", marks=pytest.mark.postgres)] if url else []


@pytest.fixture(params=["sqlite", *_postgres_params()])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> object:
    """A fresh, empty database URL: SQLite always, PostgreSQL too when TEST_DATABASE_URL is set.

    Each PostgreSQL test gets a schema of its own (dropped afterwards) through search_path.
    """
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.sqlite'}"
        return
    with postgres_schema(str(request.param), prefix="t_") as url:
        yield url
