"""Sync 1.1 verification: real reference-PDS frames pass; every kind of forgery is dropped by reason."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest

from actors.accounts import AccountCache
from actors.verify import Accepted, Dropped, HostContext, Verifier, VerifyLimits
from protocol.crypto import PrivateKey, parse_verification_method
from protocol.frames import CommitEvent, decode_frame
from protocol.repo_writer import RepoWriter, Write
from store.db import open_database
from store.migrations import apply_migrations
from tests.support import forge
from tests.support.testdata import REFPDS_DID_DOCS, load_json, refpds_frame_seqs, refpds_frames, refpds_hostname

HOST = HostContext(host_id=1, hostname="pds.example.com")
DID = "did:plc:verifytestaccount0000001"


@dataclass
class Ident:
    signing_key: str | None
    pds_endpoint: str | None


class Identities:
    """A simple fake identity source: a dict, with a refresh counter."""

    def __init__(self) -> None:
        self.docs: dict[str, Ident] = {}
        self.refreshes = 0

    def resolve(self, did: str) -> Ident:
        if did not in self.docs:
            raise LookupError(did)
        return self.docs[did]

    def refresh(self, did: str) -> Ident:
        self.refreshes += 1
        return self.resolve(did)


@pytest.fixture
def cache(tmp_path: Path) -> AccountCache:
    db = open_database(f"sqlite:///{tmp_path / 'v.sqlite'}")
    apply_migrations(db)
    return AccountCache(db)


def accept(verifier: Verifier, event: object, host: HostContext = HOST) -> Accepted:
    verdict = verifier.check(event, host)  # type: ignore[arg-type]
    assert isinstance(verdict, Accepted), verdict
    verifier.accounts.put(verdict.account)
    return verdict


def dropped(verifier: Verifier, event: object, host: HostContext = HOST) -> str:
    verdict = verifier.check(event, host)  # type: ignore[arg-type]
    assert isinstance(verdict, Dropped), verdict
    return verdict.reason


def test_reference_pds_frames_all_verify(cache: AccountCache) -> None:
    docs = load_json(REFPDS_DID_DOCS)
    identities = Identities()
    for did, doc in docs.items():
        vm = next(v for v in doc["verificationMethod"] if v["id"].endswith("#atproto"))
        endpoint = next(s for s in doc["service"] if s["id"].endswith("#atproto_pds"))["serviceEndpoint"]
        identities.docs[did] = Ident(parse_verification_method(vm).did_key(), endpoint)
    verifier = Verifier(identities, cache, VerifyLimits())
    host = HostContext(1, refpds_hostname())
    seqs = []
    for _, raw in refpds_frames():
        event = decode_frame(raw)
        accept(verifier, event, host)
        seqs.append(event.seq)
    assert seqs == refpds_frame_seqs()
    assert identities.refreshes >= 4  # every #identity event refreshes the document


@pytest.fixture
def world(cache: AccountCache) -> tuple[Verifier, RepoWriter, Identities]:
    key = PrivateKey.generate("k256")
    identities = Identities()
    identities.docs[DID] = Ident(key.public_key().did_key(), "https://pds.example.com")
    writer = RepoWriter(DID, key)
    return Verifier(identities, cache, VerifyLimits()), writer, identities


def test_good_commits_pass_and_forgeries_between_them_drop(world: tuple[Verifier, RepoWriter, Identities]) -> None:
    verifier, writer, identities = world
    accept(verifier, writer.commit([], 1))
    good = writer.commit([Write("create", "app.bsky.feed.post/3aaaaaaaaaaaa", {"text": "one"})], 2)
    accept(verifier, good)

    # forged signature: another key signs the next commit
    forged = forge.bad_signature(writer, [Write("create", "app.bsky.feed.post/3bbbbbbbbbbbb", {"text": "evil"})], 3)
    assert dropped(verifier, forged) == "bad_signature"
    assert identities.refreshes == 1  # one refresh before giving up

    # the genuine next commit still passes
    accept(verifier, writer.commit([Write("create", "app.bsky.feed.post/3cccccccccccc", {"text": "two"})], 4))


def test_high_s_signature_is_dropped(world: tuple[Verifier, RepoWriter, Identities]) -> None:
    verifier, writer, _ = world
    accept(verifier, writer.commit([], 1))
    event = writer.commit([Write("create", "app.bsky.feed.post/3aaaaaaaaaaaa", {"text": "x"})], 2)
    forged = forge.high_s(event)
    assert dropped(verifier, forged) == "bad_signature"


def test_event_from_another_host_is_dropped(world: tuple[Verifier, RepoWriter, Identities]) -> None:
    verifier, writer, _ = world
    event = writer.commit([], 1)
    assert dropped(verifier, event, HostContext(2, "evil.example.com")) == "wrong_host"
    accept(verifier, event)


def test_rev_rollback_and_replay_are_dropped(world: tuple[Verifier, RepoWriter, Identities]) -> None:
    verifier, writer, _ = world
    first = writer.commit([], 1)
    accept(verifier, first)
    second = writer.commit([Write("create", "app.bsky.feed.post/3aaaaaaaaaaaa", {})], 2)
    accept(verifier, second)
    assert dropped(verifier, second) == "rev_not_newer"
    assert dropped(verifier, first) == "rev_not_newer"


def test_future_rev_is_dropped(world: tuple[Verifier, RepoWriter, Identities]) -> None:
    verifier, writer, _ = world
    accept(verifier, writer.commit([], 1))
    event = forge.future_rev_commit(writer, [Write("create", "app.bsky.feed.post/3aaaaaaaaaaaa", {})], 2)
    assert dropped(verifier, event) == "rev_in_future"


def test_broken_prev_data_is_dropped_strict_and_warned_lenient(
    world: tuple[Verifier, RepoWriter, Identities],
) -> None:
    verifier, writer, _ = world
    accept(verifier, writer.commit([], 1))
    accept(verifier, writer.commit([Write("create", "app.bsky.feed.post/3aaaaaaaaaaaa", {})], 2))
    event = writer.commit([Write("create", "app.bsky.feed.post/3bbbbbbbbbbbb", {})], 3)
    broken = forge.broken_prev_data(event)
    assert dropped(verifier, broken) == "bad_prev_data"
    missing = dataclasses.replace(event, prev_data=None)
    assert dropped(verifier, missing) == "no_prev_data"
    lenient = HostContext(1, "pds.example.com", lenient=True)
    verdict = verifier.check(broken, lenient)
    assert isinstance(verdict, Accepted) and verdict.warnings == ("bad_prev_data",)


def test_wrong_block_hash_is_dropped(world: tuple[Verifier, RepoWriter, Identities]) -> None:
    verifier, writer, _ = world
    accept(verifier, writer.commit([], 1))
    event = writer.commit([Write("create", "app.bsky.feed.post/3aaaaaaaaaaaa", {"text": "original"})], 2)
    forged = forge.tampered_block(event)
    assert dropped(verifier, forged) == "bad_block_hash"
    accept(verifier, event)


def test_gap_passes_and_marks_resync(world: tuple[Verifier, RepoWriter, Identities]) -> None:
    verifier, writer, _ = world
    accept(verifier, writer.commit([], 1))
    writer.commit([Write("create", "app.bsky.feed.post/3aaaaaaaaaaaa", {})], 2)  # never delivered
    event = writer.commit([Write("create", "app.bsky.feed.post/3bbbbbbbbbbbb", {})], 3)
    assert isinstance(event, CommitEvent)
    verdict = accept(verifier, event)
    assert verdict.gap and verdict.account.needs_resync


def test_inactive_and_unknown_identity(world: tuple[Verifier, RepoWriter, Identities]) -> None:
    verifier, writer, _ = world
    accept(verifier, writer.commit([], 1))
    state = verifier.accounts.get(DID)
    assert state is not None
    verifier.accounts.put(state.updated(upstream_status="deactivated"))
    event = writer.commit([Write("create", "app.bsky.feed.post/3aaaaaaaaaaaa", {})], 2)
    assert dropped(verifier, event) == "account_inactive"
    verifier.accounts.put(state.updated(status="takendown"))
    assert dropped(verifier, event) == "account_takendown"
    stranger = RepoWriter("did:plc:nobodyknowsthisaccount00", PrivateKey.generate("p256"))
    assert dropped(verifier, stranger.commit([], 1)) == "identity_unavailable"
