"""Fill a relay's databases with known accounts before it starts, as a relay that already mirrored them.

``N`` accounts in all. The traffic's own accounts are known the way a relay that listed their
hosts knows them (``account`` rows without a head, as enumeration inserts them) with their
DID documents cached in ``identity``: their traffic opens with the reference PDS's account
creation (an empty genesis ``#commit`` whose ``since`` is null), which a head from before
would not follow, and the mirror writes their genesis slice as for an account first seen.
The other ``N - traffic`` accounts are synthetic, mirrored ones: an ``account`` row with a
head (rev, commit and data CIDs), an ``identity`` row and a ``car_repo`` head (no slices).
They are never in the traffic; they make every look-up a read of a million-row table.
Rows go in through the ``store`` bulk loaders (``execute_values`` pages on PostgreSQL).
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from store.accounts import ACTIVE, AccountRow, insert_accounts
from store.carstore import CarStore
from store.carstore_schema import RepoHead, insert_repo_heads
from store.db import open_database
from store.identities import IdentityRow, insert_identities
from store.migrations import apply_migrations

BATCH = 20_000
_KEY = "did:key:zQ3shXjHeiBuRCKmM36cuYnm7YEMzhGnCmCyW92sRJ9pribSF"  # any valid key: never checked
_REV = "3jzfcijpj2z2a"


@dataclass(frozen=True, slots=True)
class TrafficAccount:
    did: str
    handle: str
    signing_key: str  # did:key
    pds_url: str


def synthetic_did(i: int) -> str:
    digest = hashlib.sha256(f"known-{i}".encode()).digest()
    return "did:plc:" + base64.b32encode(digest).decode().lower()[:24]


def _cid(kind: str, i: int) -> bytes:
    return bytes([0x01, 0x71, 0x12, 0x20]) + hashlib.sha256(f"{kind}-{i}".encode()).digest()


def _doc(did: str, key: str, pds: str, handle: str) -> str:
    return json.dumps({"id": did, "alsoKnownAs": [f"at://{handle}"], "key": key, "pds": pds})


def _synthetic(start: int, stop: int, now: float) -> Iterator[tuple[AccountRow, IdentityRow, RepoHead]]:
    for i in range(start, stop):
        did = synthetic_did(i)
        commit, data = _cid("commit", i), _cid("data", i)
        handle, pds = f"known{i}.bench.test", "https://pds.bench.test"
        yield (
            AccountRow(did, None, ACTIVE, ACTIVE, _REV, commit, data, False),
            IdentityRow(did, handle, _KEY, pds, _doc(did, _KEY, pds, handle), now),
            RepoHead(did, _REV, commit, data),
        )


def seed_known_accounts(
    database_url: str, carstore_url: str, carstore_dir: Path, total: int, traffic: list[TrafficAccount]
) -> float:
    """Fill both databases (migrated here first); returns the seconds it took."""
    started = time.monotonic()
    now = time.time()
    db = open_database(database_url)
    apply_migrations(db)
    cdb = open_database(carstore_url)
    store = CarStore(carstore_dir, cdb)
    store.open()
    try:
        with db.connection_context(), db.atomic():
            insert_accounts(db, [AccountRow(a.did, None, ACTIVE, ACTIVE, None, None, None, False) for a in traffic])
            insert_identities(
                db,
                [IdentityRow(a.did, a.handle, a.signing_key, a.pds_url, _doc(a.did, a.signing_key, a.pds_url, a.handle),
                             now) for a in traffic],
            )  # fmt: skip
        synthetic = max(0, total - len(traffic))
        for start in range(0, synthetic, BATCH):
            rows = list(_synthetic(start, min(synthetic, start + BATCH), now))
            with db.connection_context(), db.atomic():
                insert_accounts(db, [r[0] for r in rows])
                insert_identities(db, [r[1] for r in rows])
            with cdb.connection_context(), cdb.atomic():
                insert_repo_heads(cdb, [r[2] for r in rows])
    finally:
        store.close()
        cdb.close()
        db.close()
    return time.monotonic() - started
