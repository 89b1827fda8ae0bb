"""Messages the control plane (``actors.relay_api.Relay``) sends to actors, and the unknown-message rule.

Every operator change is written to SQL first; these messages then bring the change to the
actors that hold state in memory. Recipients:

- ``HostSupervisor`` (in the relay process, or in each ingest worker through ``IngestPool`` and
  the link, ``actors.ingest_link``): ``StopHost`` (kill, block, ban; in ``actors.messages``),
  ``RestartHost``, ``ApplyHostLimits``, ``ForgetAccount``.
- ``HostSubscriber`` (from its supervisor): ``SetSubscriberLimits``.
- ``Sequencer`` (asked): ``SetAccountStatus``, which announces the change as an ``#account``
  event and from then on drops (and counts) the events of taken-down accounts.
- ``RepoMirror`` (asked): ``ResetRepo`` and ``CompactRepo`` in ``actors.messages_mirror``.

A message an actor does not know is a bug in the sender: ``unknown_message`` logs it and
counts it in ``skyrelay_actor_unknown_messages_total{actor}``; it is never ignored silently.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from prometheus_client import Counter

log = logging.getLogger(__name__)

UNKNOWN_MESSAGES = Counter(
    "skyrelay_actor_unknown_messages_total", "Messages an actor received but does not handle", ["actor"]
)


def unknown_message(actor: str, message: object) -> None:
    """Log and count a message ``actor`` does not handle (call from its ``on_receive``)."""
    UNKNOWN_MESSAGES.labels(actor).inc()
    name = message if isinstance(message, str) else type(message).__name__
    log.warning("actor got an unknown message actor=%s message=%s", actor, name)


@dataclass(frozen=True, slots=True)
class RestartHost:
    """Stop the host's subscriber and start it again (re-reading its row from SQL)."""

    hostname: str


@dataclass(frozen=True, slots=True)
class ApplyHostLimits:
    """The host's limits changed in SQL; a running subscriber applies them at once."""

    hostname: str
    account_limit: int | None
    events_per_second: float | None
    events_per_hour: int | None = None  # the host's own hour and day limits (None: the scaled defaults)
    events_per_day: int | None = None


@dataclass(frozen=True, slots=True)
class SetSubscriberLimits:
    """To one ``HostSubscriber``: new account limit and event rate (None: unlimited)."""

    account_limit: int | None
    events_per_second: float | None
    events_per_hour: int | None = None  # the host's own hour and day limits (None: the scaled defaults)
    events_per_day: int | None = None


@dataclass(frozen=True, slots=True)
class ForgetAccount:
    """An account's state changed in SQL (takedown, reversal, reset): drop it from the account cache."""

    did: str


@dataclass(frozen=True, slots=True)
class SetAccountStatus:
    """To the sequencer (asked): set the account's relay-level status and announce it on the firehose.

    Answers the relay seq of the ``#account`` event, or None when the account is unknown.
    """

    did: str
    status: str  # store.accounts.ACTIVE or TAKENDOWN
