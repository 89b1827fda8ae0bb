"""Messages to the RepoMirror actor: durable repo events to mirror, and its own bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class MirrorEvent:
    """One durable event as the mirror needs it (built by the sequencer after fsync)."""

    did: str
    kind: str  # "#commit", "#sync", "#account"
    rev: str | None = None
    since: str | None = None
    commit_cid: bytes | None = None
    data_cid: bytes | None = None
    car: bytes | None = None  # the commit's blocks, a CAR (for #commit)
    deleted: bool = False  # for #account: the account is gone; drop its mirror
    seq: int = 0  # the relay seq of the event (0: not from the event log)


@dataclass(frozen=True, slots=True)
class MirrorBatch:
    events: tuple[MirrorEvent, ...]


@dataclass(frozen=True, slots=True)
class FlushMirror:
    """RepoMirror to itself: write the slices gathered so far."""


@dataclass(frozen=True, slots=True)
class RequestResync:
    """Fetch the account's whole repo from its PDS again (gap, #sync, admin)."""

    did: str
    reason: str


@dataclass(frozen=True, slots=True)
class BackfillDone:
    """A fetch finished: ``repo`` is a verified whole repo (protocol.repo_verify.VerifiedRepo) or None."""

    did: str
    repo: Any
    error: str | None


@dataclass(frozen=True, slots=True)
class CompactNow:
    """Compact the accounts with the most slices now (also sent by a timer)."""

    limit: int = 100


@dataclass(frozen=True, slots=True)
class ResetRepo:
    """Admin (asked): delete the account's mirrored repo and fetch it again from its PDS."""

    did: str


@dataclass(frozen=True, slots=True)
class CompactRepo:
    """Admin (asked): compact one account now; answers its ``CompactStats`` or None (busy or absent)."""

    did: str
