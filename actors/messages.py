"""Messages between the relay's actors: frozen dataclasses holding immutable values.

Commands are imperative (``PersistEvent``), events past tense (``ChildFailed``), queries ``Get*``.
"""

from __future__ import annotations

from dataclasses import dataclass

from actors.accounts import AccountState


@dataclass(frozen=True, slots=True)
class PersistEvent:
    """A verified upstream event: sequence it, log it durably, broadcast it, persist ``account``.

    ``frame`` is the event as this relay re-encodes it (typed fields only) with seq 0; the
    sequencer puts its own seq in. Plain bytes, so it crosses process boundaries cheaply.
    """

    host_id: int
    upstream_seq: int
    kind: str  # "#commit", "#sync", "#identity", "#account"
    frame: bytes
    account: AccountState | None
    received_at: float


@dataclass(frozen=True, slots=True)
class PersistBatch:
    """Events in the order one ingest worker accepted them: each handled as a ``PersistEvent``.

    One message per batch read from a worker, so the sequencer's inbox costs one put and one
    get per batch rather than per event.
    """

    events: tuple[PersistEvent, ...]


@dataclass(frozen=True, slots=True)
class AdvanceCursor:
    """Everything from ``host_id`` up to ``upstream_seq`` is processed (logged or dropped).

    ``reset``: the host's history restarted (it answered FutureCursor); forget the saved cursor
    even though the new one is lower.
    """

    host_id: int
    upstream_seq: int
    reset: bool = False


@dataclass(frozen=True, slots=True)
class MovedHint:
    """A subscriber to the sequencer: ``did``'s event was dropped as ``wrong_host`` (it may have moved).

    Passed on to the spider's moved queue; it travels the ingest link as a ``moved`` message.
    """

    did: str


@dataclass(frozen=True, slots=True)
class FlushBatch:
    """Sequencer to itself: write what has accumulated."""


@dataclass(frozen=True, slots=True)
class Tick:
    """A periodic timer fired (flushes, retention, cursors)."""


@dataclass(frozen=True, slots=True)
class WriteBehind:
    """Sequencer: make everything durable and write its state to SQL before answering."""


@dataclass(frozen=True, slots=True)
class ChildFailed:
    """A supervised child stopped with an error."""

    name: str
    error: str


@dataclass(frozen=True, slots=True)
class RestartChild:
    """Time to start a failed child again (sent by the supervisor to itself after a backoff)."""

    name: str
    generation: int


@dataclass(frozen=True, slots=True)
class StartHost:
    """Subscribe to ``hostname`` (new from requestCrawl, or known at start-up)."""

    hostname: str


@dataclass(frozen=True, slots=True)
class StopHost:
    """Unsubscribe from a host (ban, admin)."""

    hostname: str
    reason: str


@dataclass(frozen=True, slots=True)
class HostGaveUp:
    """A subscriber failed repeatedly; its supervisor marks it offline and retries slowly."""

    hostname: str
    error: str


@dataclass(frozen=True, slots=True)
class GetTree:
    """Query: the supervision tree as nested dicts (for the admin interface)."""


@dataclass(frozen=True, slots=True)
class CheckProgress:
    """HostSupervisor to itself, on a timer: reconnect hosts whose reader is stuck on one frame."""
