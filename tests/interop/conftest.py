"""Interop fixtures: one reference network (PLC + two reference PDSes from npm) per test session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.interop.refpds import ReferenceNetwork


@pytest.fixture(scope="session")
def reference_network() -> Iterator[ReferenceNetwork]:
    """A PLC and two PDSes on loopback, shared by the session: use fresh handles in every test.

    Installing the npm packages (once per lock, ~1.5 min) needs node and npm; a failure to
    install or start fails the test rather than skipping it.
    """
    with ReferenceNetwork(pds_count=2) as network:
        yield network
