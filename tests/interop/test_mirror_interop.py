"""Interop: the relay's repo mirror against the reference PDS (issue 4's evidence).

Accounts on two reference PDSes (npm) write, update and delete records while a relay
(subprocess) is subscribed to both. Once the relay has processed everything, what its sync read
API serves, over HTTP, must agree with what each PDS serves of itself:

- ``getRepo``: the same signed commit and the same set of (path, record CID), both CARs
  verified whole (``verify_repo``) with the key of the PLC DID document;
- ``getRecord``: proofs that verify, naming the right CID for a present record and proving the
  absence of a deleted one;
- ``getRepo?since=R``: merged into a full copy taken at rev R, a complete repo at the new head
  (with live slices and with compaction running underneath);
- an account first seen mid-history (it wrote before the relay crawled its PDS) is backfilled
  from the PDS's ``getRepo`` and then equals it;
- a taken-down (or deactivated) account's repo is refused and comes back on reversal; a
  deleted account's repo is ``RepoNotFound`` and its mirror is gone; the refusal holds from the
  moment the relay's own firehose announces the ``#account`` change.

"Processed everything" is observed, never slept for: the relay's ``getLatestCommit`` and the
root of its ``getRepo`` equal the PDS's own ``getLatestCommit``, polled with a deadline.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import libipld
import pytest
import websocket
from playhouse.pool import PooledDatabase

from protocol import mst
from protocol.car import read_car, write_car
from protocol.cid import cid_from_str, cid_to_str
from protocol.commit import decode_commit
from protocol.crypto import PublicKey, load_did_key
from protocol.diddoc import parse_did_document
from protocol.repo_verify import VerifiedRepo, verify_record_proof, verify_repo
from store import carstore_schema
from store.db import open_database
from tests.conftest import postgres_schema
from tests.interop.refpds import ReferenceNetwork, XrpcError, post, xrpc
from tests.support.procs import RelayProcess, wait_until

WAIT_S = 30.0  # an event reaches the relay within ~1 s here (the PDS polls its own outbox); generous for CI
POLL_S = 0.1
POST = "app.bsky.feed.post"
PROFILE = "app.bsky.actor.profile"
NOTE = "com.example.skyrelay.note"  # a collection without a Lexicon: the PDS stores it unvalidated
BEFORE_EVERY_REPO = "2222222222222"  # the smallest TID: older than any rev


# -- relay and PDS plumbing ------------------------------------------------------------------


@pytest.fixture
def carstore_url(db_url: str) -> Iterator[str | None]:
    """On PostgreSQL, a schema of its own for the carstore metadata; on SQLite the relay's default file."""
    if not db_url.startswith("postgresql"):
        yield None
        return
    with postgres_schema(db_url, prefix="c_") as url:
        yield url


def start_relay(data_dir: Path, db_url: str, carstore_url: str | None, plc_url: str, **env: str) -> RelayProcess:
    extra = {"CARSTORE_DATABASE_URL": carstore_url} if carstore_url else {}
    return RelayProcess(data_dir, database_url=db_url, plc_url=plc_url, extra_env={**extra, **env}).start()


@pytest.fixture
def relay(
    tmp_path: Path, db_url: str, carstore_url: str | None, reference_network: ReferenceNetwork
) -> Iterator[RelayProcess]:
    """A fresh relay (main database ``db_url``, carstore metadata on the same kind of database), not crawling yet."""
    # live mirroring only: no listRepos walk or spider racing the backfills these tests count
    off = {"SKYRELAY_ENUMERATE_HOSTS": "false", "SKYRELAY_SPIDER_ENABLED": "false"}
    process = start_relay(tmp_path / "relay", db_url, carstore_url, reference_network.plc_url, **off)
    try:
        yield process
    finally:
        assert process.stop() == 0, process.log()


def crawl(relay: RelayProcess, *pds_urls: str) -> None:
    """Have the relay subscribe to ``pds_urls`` (live: it sees only what they write from now on)."""
    for url in pds_urls:
        assert relay.request_crawl(urlsplit(url).netloc) == {}
    wait_until(lambda: relay.metric("skyrelay_upstream_hosts_connected") >= len(pds_urls), WAIT_S, "relay to subscribe")


def relay_get(relay: RelayProcess, nsid: str, **params: str) -> Any:
    """A GET of the relay's XRPC ``nsid``: bytes for the CAR endpoints, decoded JSON otherwise."""
    raw = nsid in ("com.atproto.sync.getRepo", "com.atproto.sync.getRecord", "com.atproto.sync.getBlocks")
    return xrpc(relay.url, nsid, params=params, raw=raw)


def refused(call: Callable[[], Any]) -> XrpcError | None:
    """The XRPC error ``call`` raises, or ``None`` when it succeeds."""
    try:
        call()
    except XrpcError as exc:
        return exc
    return None


def poll(relay: RelayProcess, check: Callable[[], object], what: str) -> None:
    """``wait_until`` with the relay's log in the failure message."""
    try:
        wait_until(check, WAIT_S, what, interval=POLL_S)
    except TimeoutError as exc:
        pytest.fail(f"{exc}\n--- relay log ---\n{relay.log()}")


class FirehoseWatch:
    """A live firehose (a PDS's or the relay's, via websocket-client), read on demand: frames wait in the socket."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._ws = websocket.create_connection(url, timeout=POLL_S)

    def __enter__(self) -> FirehoseWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self._ws.close()

    def wait_for(self, frame_type: str, did: str, **fields: object) -> None:
        """Read until a ``frame_type`` frame of ``did`` with ``fields`` arrives."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            try:
                raw = self._ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            assert isinstance(raw, bytes), "firehose frames are binary"
            header, body = libipld.decode_dag_cbor_multi(raw)
            if header.get("t") != frame_type or (body.get("repo") or body.get("did")) != did:
                continue
            if all(body.get(k) == v for k, v in fields.items()):
                return
        pytest.fail(f"no {frame_type} {did} {fields} on {self.url} within {WAIT_S} s")


@dataclass
class Account:
    """An account on a reference PDS, with what the test wrote (from the PDS's own answers)."""

    net: ReferenceNetwork
    did: str
    pds_url: str
    key: PublicKey
    records: dict[str, str] = field(default_factory=dict)  # path -> record CID, as the PDS reported them
    deleted: set[str] = field(default_factory=set)  # paths that existed and were deleted
    serial: int = 0

    @classmethod
    def create(cls, net: ReferenceNetwork, pds_url: str, name: str) -> Account:
        did, _ = net.create_account(pds_url, f"{name}{uuid.uuid4().hex[:6]}.test")
        signing_key = parse_did_document(net.did_doc(did), did).signing_key
        assert signing_key is not None
        return cls(net, did, pds_url, load_did_key(signing_key))

    def create_record(self, collection: str = POST, *, rkey: str | None = None) -> str:
        self.serial += 1
        record = post(f"post {self.serial}") if collection == POST else {"$type": collection, "n": self.serial}
        out = self.net.create_record(self.did, collection, record, rkey=rkey)
        path = f"{collection}/{out['uri'].rsplit('/', 1)[1]}"
        self.records[path] = out["cid"]
        self.deleted.discard(path)
        return path

    def put_record(self, path: str) -> None:
        """Create or replace ``path`` (a profile or a post, by its collection)."""
        self.serial += 1
        collection, rkey = path.split("/")
        if collection == PROFILE:
            record: dict[str, Any] = {"$type": PROFILE, "displayName": f"name {self.serial}"}
        elif collection == POST:
            record = post(f"edited {self.serial}")
        else:
            record = {"$type": collection, "n": self.serial}
        out = self.net.put_record(self.did, collection, rkey, record)
        assert out["cid"] != self.records.get(path), "an update must change the record"
        self.records[path] = out["cid"]
        self.deleted.discard(path)

    def delete_record(self, path: str) -> None:
        collection, rkey = path.split("/")
        self.net.delete_record(self.did, collection, rkey)
        del self.records[path]
        self.deleted.add(path)

    def pds_head(self) -> tuple[str, str]:
        out = xrpc(self.pds_url, "com.atproto.sync.getLatestCommit", params={"did": self.did})
        return out["cid"], out["rev"]

    def pds_repo(self) -> VerifiedRepo:
        return verify_repo(self.net.get_repo(self.pds_url, self.did), self.did, self.key)

    def relay_repo(self, relay: RelayProcess, **params: str) -> bytes:
        car: bytes = relay_get(relay, "com.atproto.sync.getRepo", did=self.did, **params)
        return car


def relay_has_head(relay: RelayProcess, account: Account, head: tuple[str, str]) -> bool:
    """True once the relay's getLatestCommit and the root of its getRepo are ``head`` (cid, rev)."""
    try:
        latest = relay_get(relay, "com.atproto.sync.getLatestCommit", did=account.did)
        if (latest["cid"], latest["rev"]) != head:
            return False
        return read_car(account.relay_repo(relay)).roots == (cid_from_str(head[0]),)
    except XrpcError as exc:
        if exc.error == "RepoNotFound":  # not seen yet, or the mirror is still fetching it
            return False
        raise


def wait_mirrored(relay: RelayProcess, *accounts: Account) -> None:
    """Wait until the relay's mirror of every account is at the PDS's current head."""
    for account in accounts:
        head = account.pds_head()
        poll(relay, partial(relay_has_head, relay, account, head), f"relay mirror of {account.did} at {head}")


def assert_same_repo(relay: RelayProcess, account: Account) -> VerifiedRepo:
    """The relay's getRepo is the PDS's: same commit, same records (and the ones the test wrote)."""
    theirs = account.pds_repo()
    ours = verify_repo(account.relay_repo(relay), account.did, account.key)
    assert ours.commit_cid == theirs.commit_cid, (account.did, ours.commit.rev, theirs.commit.rev)
    assert ours.records == theirs.records, account.did
    assert ours.blocks.keys() == theirs.blocks.keys(), account.did
    assert {path: cid_to_str(cid) for path, cid in theirs.records.items()} == account.records
    return ours


def mirror_slices(relay: RelayProcess, did: str) -> int | None:
    """Live slices of ``did`` in the relay's carstore metadata; ``None`` when the mirror has no repo for it."""
    url = relay.extra_env.get("CARSTORE_DATABASE_URL") or f"sqlite:///{relay.data_dir / 'carstore.sqlite'}"
    db = open_database(url)
    try:
        with db.connection_context():
            if carstore_schema.load_repo(db, did) is None:
                return None
            return len(carstore_schema.live_slices(db, did))
    finally:
        if isinstance(db, PooledDatabase):
            db.close_all()


def write_history(account: Account, posts: int = 6) -> None:
    """A dozen writes: posts, notes under chosen rkeys, a profile created then updated, edits and deletions."""
    paths = [account.create_record() for _ in range(posts)]
    account.create_record(NOTE, rkey="alpha")
    account.create_record(NOTE, rkey="omega")
    account.put_record(f"{PROFILE}/self")  # putRecord creating
    account.put_record(f"{PROFILE}/self")  # putRecord updating
    account.put_record(paths[0])  # an edited post
    account.delete_record(paths[1])
    account.delete_record(paths[2])
    account.delete_record(f"{NOTE}/omega")


# -- the tests ---------------------------------------------------------------------------------


@pytest.mark.interop
def test_mirror_equals_each_pds_and_proves_records(reference_network: ReferenceNetwork, relay: RelayProcess) -> None:
    net = reference_network
    crawl(relay, *net.pds_urls)
    accounts = [Account.create(net, net.pds_urls[i % 2], f"m{i}") for i in range(4)]
    for account in accounts:
        write_history(account)
    assert sum(len(a.records) + len(a.deleted) for a in accounts) >= 30
    wait_mirrored(relay, *accounts)

    for account in accounts:
        assert_same_repo(relay, account)
        cid, rev = account.pds_head()
        assert relay_get(relay, "com.atproto.sync.getLatestCommit", did=account.did) == {"cid": cid, "rev": rev}
        assert relay_get(relay, "com.atproto.sync.getRepoStatus", did=account.did) == {
            "did": account.did,
            "active": True,
            "rev": rev,
        }

        def proof(path: str, did: str = account.did, key: PublicKey = account.key, head: str = cid) -> bytes | None:
            collection, rkey = path.split("/")
            car = relay_get(relay, "com.atproto.sync.getRecord", did=did, collection=collection, rkey=rkey)
            assert read_car(car).roots == (cid_from_str(head),)
            return verify_record_proof(car, did, key, path)

        for path, record_cid in account.records.items():
            assert proof(path) == cid_from_str(record_cid), (account.did, path)
        assert account.deleted
        for path in account.deleted:
            assert proof(path) is None, (account.did, path)
        assert proof(f"{NOTE}/beta") is None  # never written: between two existing notes' keys

        # getBlocks answers blocks of the current repo, and only those
        record_cids = sorted(account.records.values())
        car = relay_get(relay, "com.atproto.sync.getBlocks", did=account.did, cids=record_cids[0])
        assert list(read_car(car).blocks) == [cid_from_str(record_cids[0])]

    listed = {r["did"]: r for r in relay_get(relay, "com.atproto.sync.listRepos", limit="1000")["repos"]}
    for account in accounts:
        cid, rev = account.pds_head()
        assert listed[account.did] == {"did": account.did, "head": cid, "rev": rev, "active": True}

    assert relay.metric("skyrelay_events_dropped_total") == 0, relay.log()
    assert relay.metric("skyrelay_mirror_backfills_total", result="failed") == 0, relay.log()
    assert relay.metric("skyrelay_repo_api_mirror_errors_total") == 0, relay.log()


@pytest.mark.interop
@pytest.mark.parametrize("compacting", [False, True], ids=["slices", "compacting"])
def test_since_diff_completes_an_older_copy(
    reference_network: ReferenceNetwork,
    tmp_path: Path,
    db_url: str,
    carstore_url: str | None,
    compacting: bool,
) -> None:
    """getRepo?since=R1 merged into the full copy at R1 is the repo at the new head.

    ``compacting`` runs compaction every half second from two slices up, and waits for it
    (one live slice per account) before each read, so ``since`` is answered from compacted
    slices: the answer may then be a superset of the change, but merged with the old copy it
    must still be complete.
    """
    net = reference_network
    env = {"SKYRELAY_COMPACTION_MIN_SLICES": "2", "SKYRELAY_COMPACTION_INTERVAL_SECONDS": "0.5"} if compacting else {}
    relay = start_relay(tmp_path / "relay", db_url, carstore_url, net.plc_url, **env)
    try:
        crawl(relay, *net.pds_urls)
        accounts = [Account.create(net, url, "s") for url in net.pds_urls]
        kept: dict[str, list[str]] = {}  # did -> records written before R1 and never touched after
        for account in accounts:
            paths = [account.create_record() for _ in range(5)]
            account.put_record(f"{PROFILE}/self")
            account.create_record(NOTE, rkey="alpha")
            kept[account.did] = paths[2:]
        wait_mirrored(relay, *accounts)
        if compacting:
            poll(relay, lambda: all(mirror_slices(relay, a.did) == 1 for a in accounts), "compaction")

        older = {a.did: verify_repo(a.relay_repo(relay), a.did, a.key) for a in accounts}
        for account in accounts:
            r1 = older[account.did].commit.rev
            # since = the head's rev: nothing is new, only the root is named (as the PDS answers);
            # since older than the repo: the full CAR
            at_head = read_car(account.relay_repo(relay, since=r1))
            pds_at_head = read_car(
                xrpc(account.pds_url, "com.atproto.sync.getRepo", params={"did": account.did, "since": r1}, raw=True)
            )
            assert (
                (at_head.roots, at_head.blocks)
                == (pds_at_head.roots, pds_at_head.blocks)
                == ((older[account.did].commit_cid,), {})
            )
            assert account.relay_repo(relay, since=BEFORE_EVERY_REPO) == account.relay_repo(relay)

        for account in accounts:
            paths = [p for p in account.records if p.startswith(POST)]
            account.delete_record(paths[0])  # a record of the older copy deleted
            account.put_record(paths[1])  # one updated
            account.put_record(f"{PROFILE}/self")
            for _ in range(3):
                account.create_record()
            account.create_record(NOTE, rkey="zulu")
        wait_mirrored(relay, *accounts)
        if compacting:
            poll(relay, lambda: all(mirror_slices(relay, a.did) == 1 for a in accounts), "compaction")
        else:
            assert all((mirror_slices(relay, a.did) or 0) > 1 for a in accounts)

        for account in accounts:
            old = older[account.did]
            now = account.pds_repo()
            diff = read_car(account.relay_repo(relay, since=old.commit.rev))
            assert diff.roots == (now.commit_cid,)
            assert set(diff.blocks) <= set(now.blocks), "since serves only blocks of the current repo"
            if not compacting:  # from live slices: what changed, not what the older copy has
                untouched = {cid_from_str(account.records[p]) for p in kept[account.did] if p in account.records}
                assert untouched and not untouched & set(diff.blocks), account.did
            merged = {**old.blocks, **diff.blocks}
            commit = decode_commit(merged[now.commit_cid])
            assert commit.rev > old.commit.rev and commit.verify(account.key)
            assert dict(mst.walk(merged, commit.data)) == now.records
            # and the merged blocks are a complete, valid repo at the new head
            complete = verify_repo(write_car([now.commit_cid], merged.items()), account.did, account.key)
            assert complete.records == now.records
            assert complete.blocks.keys() == now.blocks.keys()
            assert_same_repo(relay, account)
        assert relay.metric("skyrelay_repo_api_mirror_errors_total") == 0, relay.log()
    finally:
        assert relay.stop() == 0, relay.log()


@pytest.mark.interop
def test_account_first_seen_mid_history_is_backfilled(reference_network: ReferenceNetwork, relay: RelayProcess) -> None:
    net = reference_network
    pds = net.pds_urls[0]
    with FirehoseWatch(net.firehose_url(pds, cursor=None)) as watch:
        account = Account.create(net, pds, "late")
        write_history(account)  # all before the relay knows the PDS
        # The PDS hands a new live subscriber every event it has not published yet (it polls its
        # outbox about once a second): crawl only once the history is out, or the relay sees it.
        watch.wait_for("#commit", account.did, rev=account.pds_head()[1])
    before = dict(account.records)
    crawl(relay, pds)
    backfills = relay.metric("skyrelay_mirror_backfills_total", result="ok")
    # The first commit the relay sees has a `since` the mirror cannot follow: it must fetch the repo.
    account.create_record()
    wait_mirrored(relay, account)
    ours = assert_same_repo(relay, account)
    assert {p: cid_to_str(ours.records[p]) for p in before} == before  # written before the crawl
    assert relay.metric("skyrelay_mirror_backfills_total", result="ok") >= backfills + 1, relay.log()
    queued = f"mirror backfill queued did={account.did} reason="
    assert [line.split(queued)[1] for line in relay.log_path.read_text().splitlines() if queued in line] == [
        "first_seen"
    ], relay.log()

    # and live commits after the backfill are slices on top of it
    account.put_record(f"{PROFILE}/self")
    account.delete_record(next(p for p in before if p.startswith(POST)))
    wait_mirrored(relay, account)
    assert_same_repo(relay, account)
    assert relay.metric("skyrelay_events_dropped_total") == 0, relay.log()


@pytest.mark.interop
def test_inactive_accounts_are_refused_and_deleted_ones_gone(
    reference_network: ReferenceNetwork, relay: RelayProcess
) -> None:
    net = reference_network
    crawl(relay, *net.pds_urls)
    account = Account.create(net, net.pds_urls[1], "td")
    paths = [account.create_record() for _ in range(3)]
    wait_mirrored(relay, account)
    assert_same_repo(relay, account)
    collection, rkey = paths[0].split("/")

    def repo_error() -> str | None:
        exc = refused(lambda: account.relay_repo(relay))
        if exc is not None:
            assert exc.status == 400, exc
        return exc.error if exc is not None else None

    net.takedown(account.did, True)
    poll(relay, lambda: repo_error() == "RepoTakendown", "getRepo to answer RepoTakendown")
    for nsid, params in [
        ("com.atproto.sync.getRecord", {"collection": collection, "rkey": rkey}),
        ("com.atproto.sync.getLatestCommit", {}),
        ("com.atproto.sync.getBlocks", {"cids": account.records[paths[0]]}),
    ]:
        exc = refused(lambda n=nsid, p=params: relay_get(relay, n, did=account.did, **p))  # type: ignore[misc]
        assert exc is not None and (exc.status, exc.error) == (400, "RepoTakendown"), (nsid, exc)
    status = relay_get(relay, "com.atproto.sync.getRepoStatus", did=account.did)
    assert status == {"did": account.did, "active": False, "status": "takendown"}

    backfills = relay.metric("skyrelay_mirror_backfills_total")
    net.takedown(account.did, False)
    poll(relay, lambda: repo_error() is None, "getRepo to serve again after the reversal")
    assert_same_repo(relay, account)  # the mirror was kept through the takedown, not fetched again
    assert relay.metric("skyrelay_mirror_backfills_total") == backfills
    account.create_record()
    wait_mirrored(relay, account)
    assert_same_repo(relay, account)

    net.deactivate(account.did)
    poll(relay, lambda: repo_error() == "RepoDeactivated", "getRepo to answer RepoDeactivated")
    net.activate(account.did)
    poll(relay, lambda: repo_error() is None, "getRepo to serve again after activation")
    wait_mirrored(relay, account)
    assert_same_repo(relay, account)

    net.delete_account(account.did)
    poll(relay, lambda: repo_error() == "RepoNotFound", "getRepo to answer RepoNotFound after deletion")
    exc = refused(
        lambda: relay_get(relay, "com.atproto.sync.getRecord", did=account.did, collection=collection, rkey=rkey)
    )
    assert exc is not None and exc.error == "RepoNotFound", exc
    gone = {"did": account.did, "active": False, "status": "deleted"}
    # account state reaches SQL write-behind (within a tick, HACKING.md): the status follows shortly
    poll(relay, lambda: relay_get(relay, "com.atproto.sync.getRepoStatus", did=account.did) == gone, "status deleted")
    listed = relay_get(relay, "com.atproto.sync.listRepos", limit="1000")["repos"]
    assert [(r["active"], r.get("status")) for r in listed if r["did"] == account.did] == [(False, "deleted")]
    poll(relay, lambda: mirror_slices(relay, account.did) is None, "the deleted account's mirror to go")
    assert relay.metric("skyrelay_events_dropped_total") == 0, relay.log()


@pytest.mark.interop
def test_takedown_is_refused_once_the_relay_has_announced_it(
    reference_network: ReferenceNetwork, relay: RelayProcess
) -> None:
    """The moment the relay's own firehose says an account is taken down, its repo is no longer served.

    Three rounds, so that a round whose SQL write-behind happens to land between the broadcast and
    the read (a few ms out of a 1 s tick) cannot make the whole test pass by chance.
    """
    net = reference_network
    crawl(relay, net.pds_urls[0])
    account = Account.create(net, net.pds_urls[0], "tdnow")
    for _ in range(2):
        account.create_record()
    wait_mirrored(relay, account)
    served_after_broadcast = []
    for _ in range(3):
        with FirehoseWatch(f"{relay.ws_url}/xrpc/com.atproto.sync.subscribeRepos") as watch:
            net.takedown(account.did, True)
            watch.wait_for("#account", account.did, active=False, status="takendown")
            served_after_broadcast.append(refused(lambda: account.relay_repo(relay)) is None)
        poll(
            relay,
            lambda: getattr(refused(lambda: account.relay_repo(relay)), "error", None) == "RepoTakendown",
            "refusal",
        )
        net.takedown(account.did, False)
        poll(relay, lambda: refused(lambda: account.relay_repo(relay)) is None, "getRepo to serve again")
    assert not any(served_after_broadcast), f"getRepo served after the broadcast takedown: {served_after_broadcast}"
