"""Shared test fixtures: where ../shared lives, and the database URLs under test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """The ../shared folder beside the checkout (or SKYRELAY_SHARED_DIR); missing is a failure."""
    path = Path(os.environ.get("SKYRELAY_SHARED_DIR", REPO_ROOT.parent / "shared"))
    if not (path / "interop").is_dir():
        pytest.fail(f"shared test data not found at {path}: the interop vectors are required")
    return path


@pytest.fixture(scope="session")
def shared() -> Path:
    return shared_dir()
