"""Fixtures of the end-to-end tests: a local PLC stand-in and a synthetic PDS (frame host)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.fake_plc import FakePlc
from tests.support.procs import FrameHost


@pytest.fixture
def plc() -> Iterator[FakePlc]:
    with FakePlc() as server:
        yield server


@pytest.fixture
def host() -> Iterator[FrameHost]:
    frame_host = FrameHost()
    yield frame_host
    frame_host.stop()
