"""The relay's own ``#account`` announcements (status changes it makes), as events for the sequencer.

A takedown, a reversal, a throttled account and its release are all announced the same way:
an ``#account`` frame with ``active`` and, when inactive, the relay status (or the upstream
one). The event carries the account's new state, so the sequencer's write-behind makes the
status durable with it. Host id 0 marks events the relay originates.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from actors.accounts import AccountState
from actors.messages import PersistEvent
from protocol.frames import AccountEvent, encode_frame
from store.accounts import ACTIVE

RELAY_HOST_ID = 0  # the host_id of events the relay itself originates (admin #account announcements)


def announcement(state: AccountState) -> PersistEvent:
    """An ``#account`` event announcing ``state`` (already updated to its new relay status)."""
    announced = None if state.active else (state.status if state.status != ACTIVE else state.upstream_status)
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    frame = encode_frame(AccountEvent(seq=0, did=state.did, time=stamp, active=state.active, status=announced), 0)
    return PersistEvent(RELAY_HOST_ID, 0, "#account", frame, state, time.time())
