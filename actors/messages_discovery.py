"""Messages to the discovery actors: the host enumerator (``actors.enumerator``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EnumerateHost:
    """Walk this host's listRepos now (if it has not been walked to the end yet)."""

    hostname: str


@dataclass(frozen=True, slots=True)
class ScanHosts:
    """HostEnumerator to itself, on a timer: find hosts whose walk is new, unfinished or due a retry."""


@dataclass(frozen=True, slots=True)
class HostEnumerated:
    """A walk's greenlet to its HostEnumerator: the walk of ``hostname`` ended (any result)."""

    hostname: str
