"""Messages of the identity resolver actor (``actors.identity.IdentityResolver``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RefreshIdentity:
    """Fetch the DID document of ``did`` again soon (told on ``#identity`` events); rate-limited."""

    did: str


@dataclass(frozen=True, slots=True)
class FlushIdentities:
    """Write the queued resolved identities to the database now."""
