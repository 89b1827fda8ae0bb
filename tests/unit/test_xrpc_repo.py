"""The sync read API over a real carstore: getRepo (full and since), getRecord proofs, getBlocks,
getLatestCommit, listRepos, getRepoStatus, refusals of inactive accounts, every error, a little fuzz."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.relay_reads import MIRROR_READ_ERRORS, SyncReads, at_head
from protocol.car import read_car, write_car
from protocol.cid import cid_for_dag_cbor, cid_to_str
from protocol.crypto import PrivateKey
from protocol.errors import MissingBlock
from protocol.frames import CommitEvent
from protocol.repo_verify import verify_record_proof, verify_repo
from protocol.repo_writer import RepoWriter, Write
from store.accounts import AccountRow, upsert_accounts
from store.carstore import CarStore, RepoHead, SliceWrite
from store.db import open_database
from store.migrations import apply_migrations
from tests.support.fakes import BlueprintServices
from web.app import create_app
from web.xrpc_repo import repo_blueprint

KEY = PrivateKey.generate("k256")
PUB = KEY.public_key()
ALICE = "did:plc:alice00000000000000000000"
URL = "/xrpc/com.atproto.sync."


class Relay:
    """A main database, a carstore and the app serving them."""

    def __init__(self, tmp_path: Path, db_url: str) -> None:
        self.db = open_database(f"sqlite:///{tmp_path / 'relay.sqlite'}")
        apply_migrations(self.db)
        self.car_db = open_database(db_url)
        self.store = CarStore(tmp_path / "repos", self.car_db, fsync=False)
        self.store.open()
        self.app: Flask = create_app(BlueprintServices(repo_blueprint(reads=SyncReads(self.db, self.store))))
        self.client: FlaskClient = self.app.test_client()

    def close(self) -> None:
        self.store.close()
        close_all = getattr(self.car_db, "close_all", None)
        close_all() if close_all else self.car_db.close()
        self.db.close()

    def account(self, did: str, status: str = "active", upstream: str = "active", w: RepoWriter | None = None) -> None:
        rev, commit, data = (w.rev, w.commit_cid, w.data) if w else (None, None, None)
        with self.db.connection_context(), self.db.atomic():
            upsert_accounts(self.db, [AccountRow(did, None, status, upstream, rev, commit, data, False)])

    def commit(self, w: RepoWriter, writes: list[Write]) -> CommitEvent:
        event = w.commit(writes)
        self.store.write_slices([slice_of(event, w.data)])
        return event

    def get(self, method: str, **params: Any) -> Any:
        return self.client.get(URL + method, query_string=params)


def slice_of(event: CommitEvent, data_cid: bytes) -> SliceWrite:
    return SliceWrite(
        event.repo, event.rev, event.since, event.commit, data_cid, list(read_car(event.blocks).blocks.items())
    )


def post(n: int) -> dict[str, Any]:
    return {"$type": "app.bsky.feed.post", "text": f"post {n}", "createdAt": "2024-01-01T00:00:00Z"}


@pytest.fixture
def relay(tmp_path: Path, db_url: str) -> Iterator[Relay]:
    r = Relay(tmp_path, db_url)
    yield r
    r.close()


def grow(commit: Callable[[RepoWriter, list[Write]], object], w: RepoWriter, rng: random.Random, commits: int,
         start: int = 0) -> None:  # fmt: skip
    """``commits`` commits of creates, updates and deletes (a few ops each) made with ``commit``."""
    for c in range(commits):
        writes: list[Write] = []
        for i in range(rng.randint(1, 12)):
            n = start + c * 100 + i
            writes.append(Write("create", f"app.bsky.feed.post/3k{n:011d}", post(n)))
        live = sorted(set(w.records) - {x.path for x in writes})
        if live and rng.random() < 0.5:
            writes.append(Write("update", rng.choice(live), post(-c)))
        if len(live) > 3 and rng.random() < 0.4:
            victim = rng.choice(live)
            if all(x.path != victim for x in writes):
                writes.append(Write("delete", victim))
        commit(w, writes)


@pytest.fixture
def alice(relay: Relay) -> RepoWriter:
    w = RepoWriter(ALICE, KEY)
    relay.commit(w, [Write("create", "app.bsky.actor.profile/self", {"$type": "app.bsky.actor.profile"})])
    grow(relay.commit, w, random.Random(1), 25)
    relay.account(ALICE, w=w)
    return w


def car_of(resp: Any) -> bytes:
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.mimetype == "application/vnd.ipld.car"
    return bytes(resp.data)


def error_of(resp: Any) -> str:
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.get_data(as_text=True))
    assert resp.json is not None and resp.json["message"]
    return str(resp.json["error"])


# -- getRepo ------------------------------------------------------------------------------


def test_get_repo_is_the_writers_repo(relay: Relay, alice: RepoWriter) -> None:
    car = car_of(relay.get("getRepo", did=ALICE))
    repo = verify_repo(car, ALICE, PUB)
    assert repo.commit_cid == alice.commit_cid
    assert repo.records == dict(sorted(alice.records.items()))
    assert set(read_car(car).blocks) == set(repo.blocks)  # nothing unreachable
    relay.store.compact(ALICE)
    assert car_of(relay.get("getRepo", did=ALICE)) == car  # canonical order: same bytes from one file


def test_get_repo_after_backfill_and_more_commits(relay: Relay) -> None:
    w = RepoWriter(ALICE, KEY)
    grow(lambda w, writes: w.commit(writes), w, random.Random(2), 10)  # history the relay never saw
    full = read_car(w.repo_car())
    assert w.rev is not None and w.commit_cid is not None
    relay.store.replace_repo(SliceWrite(ALICE, w.rev, None, w.commit_cid, w.data, list(full.blocks.items())))
    grow(relay.commit, w, random.Random(3), 5, start=10_000)
    relay.account(ALICE, w=w)
    repo = verify_repo(car_of(relay.get("getRepo", did=ALICE)), ALICE, PUB)
    assert repo.commit_cid == w.commit_cid and repo.records == dict(sorted(w.records.items()))


def apply_diff(old_car: bytes, diff_car: bytes, w: RepoWriter) -> None:
    """The older copy plus the diff verifies as the writer's current repo."""
    diff = read_car(diff_car)
    assert w.commit_cid is not None and diff.roots == (w.commit_cid,)
    merged = {**read_car(old_car).blocks, **diff.blocks}
    repo = verify_repo(write_car([w.commit_cid], merged.items()), w.did, PUB)
    assert repo.records == dict(sorted(w.records.items()))


@pytest.mark.parametrize("compaction", ["none", "before the changes", "after the changes"])
def test_since_diff_applied_to_an_older_copy_gives_the_new_repo(
    relay: Relay, alice: RepoWriter, compaction: str
) -> None:
    old_car = car_of(relay.get("getRepo", did=ALICE))
    old_rev = alice.rev
    if compaction == "before the changes":
        relay.store.compact(ALICE)
    grow(relay.commit, alice, random.Random(4), 15, start=50_000)
    doomed = "app.bsky.feed.post/3kdoomed00000"
    relay.commit(alice, [Write("create", doomed, post(999_999))])
    doomed_cid = alice.records[doomed]
    relay.commit(alice, [Write("delete", doomed)])
    for path in sorted(alice.records)[:5]:  # old records change too
        relay.commit(alice, [Write("update", path, post(7))])
    if compaction == "after the changes":
        relay.store.compact(ALICE)

    diff_car = car_of(relay.get("getRepo", did=ALICE, since=old_rev))
    diff = read_car(diff_car)
    full = read_car(car_of(relay.get("getRepo", did=ALICE)))
    assert set(diff.blocks) <= set(full.blocks)  # only what the head reaches
    assert doomed_cid not in diff.blocks  # created and deleted after since: not served
    if compaction != "after the changes":
        assert len(diff.blocks) < len(full.blocks) / 2
    apply_diff(old_car, diff_car, alice)


def test_since_across_a_tree_that_changed_and_changed_back(relay: Relay, alice: RepoWriter) -> None:
    old_car = car_of(relay.get("getRepo", did=ALICE))
    old_rev = alice.rev
    path = sorted(alice.records)[len(alice.records) // 2]
    record = post(123)
    relay.commit(alice, [Write("update", path, record)])
    middle_rev, middle_car = alice.rev, car_of(relay.get("getRepo", did=ALICE))
    relay.commit(alice, [Write("delete", path)])
    relay.commit(alice, [Write("create", path, record)])  # the tree is the middle one again
    relay.commit(alice, [Write("create", "app.bsky.feed.like/3kzzz", {"$type": "app.bsky.feed.like"})])
    apply_diff(old_car, car_of(relay.get("getRepo", did=ALICE, since=old_rev)), alice)
    apply_diff(middle_car, car_of(relay.get("getRepo", did=ALICE, since=middle_rev)), alice)


def test_since_edges(relay: Relay, alice: RepoWriter) -> None:
    at_head = read_car(car_of(relay.get("getRepo", did=ALICE, since=alice.rev)))
    assert at_head.roots == (alice.commit_cid,) and at_head.blocks == {}
    before_all = car_of(relay.get("getRepo", did=ALICE, since="2222222222222"))
    verify_repo(before_all, ALICE, PUB)
    assert before_all == car_of(relay.get("getRepo", did=ALICE))


# -- getRecord ----------------------------------------------------------------------------


def test_get_record_proofs_of_presence_and_absence(relay: Relay, alice: RepoWriter) -> None:
    present = sorted(alice.records)
    for path in [*present[:3], present[len(present) // 2], present[-1], "app.bsky.actor.profile/self"]:
        collection, rkey = path.split("/")
        car = car_of(relay.get("getRecord", did=ALICE, collection=collection, rkey=rkey))
        assert verify_record_proof(car, ALICE, PUB, path) == alice.records[path]
    for path in ["app.bsky.feed.post/3k00000000000x", "app.bsky.feed.like/abc", "zzz.example.thing/1", "a.b.c/x"]:
        collection, rkey = path.split("/")
        car = car_of(relay.get("getRecord", did=ALICE, collection=collection, rkey=rkey))
        assert read_car(car).roots == (alice.commit_cid,)
        assert verify_record_proof(car, ALICE, PUB, path) is None


# -- getLatestCommit, getBlocks ------------------------------------------------------------


def test_get_latest_commit(relay: Relay, alice: RepoWriter) -> None:
    assert alice.commit_cid is not None
    assert relay.get("getLatestCommit", did=ALICE).json == {"cid": cid_to_str(alice.commit_cid), "rev": alice.rev}


def test_get_blocks_serves_only_current_blocks(relay: Relay, alice: RepoWriter) -> None:
    records = sorted(alice.records.items())
    wanted = [records[0][1], records[-1][1], alice.data]
    assert alice.commit_cid is not None
    wanted.append(alice.commit_cid)
    resp = relay.client.get(
        URL + "getBlocks", query_string=[("did", ALICE), *(("cids", cid_to_str(c)) for c in wanted)]
    )
    car = read_car(car_of(resp))
    assert car.roots == () and list(car.blocks) == wanted
    assert all(car.blocks[c] == alice.blocks[c] for c in wanted)

    gone_path = records[1][0]
    gone = alice.records[gone_path]
    relay.commit(alice, [Write("delete", gone_path)])
    assert gone in relay.store.load_blocks(ALICE)  # still in a slice file...
    assert gone not in alice.records.values()
    resp = relay.get("getBlocks", did=ALICE, cids=cid_to_str(gone))
    assert error_of(resp) == "BlockNotFound"  # ...but no longer part of the repo
    unknown = cid_to_str(cid_for_dag_cbor(b"\xa0"))
    query = [("did", ALICE), ("cids", cid_to_str(wanted[0])), ("cids", unknown)]
    resp = relay.client.get(URL + "getBlocks", query_string=query)
    assert error_of(resp) == "BlockNotFound" and unknown in str(resp.json)


# -- listRepos, getRepoStatus ---------------------------------------------------------------


def test_list_repos_pages_through_every_account(relay: Relay, alice: RepoWriter) -> None:
    bob = RepoWriter("did:plc:bob", KEY)
    relay.commit(bob, [Write("create", "app.bsky.feed.post/3k1", post(1))])
    relay.account("did:plc:bob", w=bob)
    relay.commit(bob, [Write("create", "app.bsky.feed.post/3k2", post(2))])  # account row now stale
    carol = RepoWriter("did:plc:carol", KEY)  # known commit, no mirror yet
    carol.commit([Write("create", "app.bsky.feed.post/3k1", post(1))])
    relay.account("did:plc:carol", upstream="deactivated", w=carol)
    relay.account("did:plc:dave")  # no commit known: not listed
    relay.account("did:web:erin.example", status="takendown", w=carol)

    seen: list[dict[str, Any]] = []
    cursor = None
    for _ in range(10):
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = relay.get("listRepos", **params).json
        seen.extend(page["repos"])
        cursor = page.get("cursor")
        if cursor is None:
            break
    by_did = {r["did"]: r for r in seen}
    assert (
        [r["did"] for r in seen]
        == sorted(by_did)
        == sorted([ALICE, "did:plc:bob", "did:plc:carol", "did:web:erin.example"])
    )
    assert alice.commit_cid is not None and bob.commit_cid is not None and carol.commit_cid is not None
    assert by_did[ALICE] == {"did": ALICE, "head": cid_to_str(alice.commit_cid), "rev": alice.rev, "active": True}
    assert by_did["did:plc:bob"]["head"] == cid_to_str(bob.commit_cid)  # the mirror's head wins
    assert by_did["did:plc:carol"] == {"did": "did:plc:carol", "head": cid_to_str(carol.commit_cid),
                                       "rev": carol.rev, "active": False, "status": "deactivated"}  # fmt: skip
    assert by_did["did:web:erin.example"]["status"] == "takendown"
    assert relay.get("listRepos").json == {"repos": list(seen)}  # default limit 500: one page, no cursor


def test_get_repo_status(relay: Relay, alice: RepoWriter) -> None:
    assert relay.get("getRepoStatus", did=ALICE).json == {"did": ALICE, "active": True, "rev": alice.rev}
    relay.account(ALICE, upstream="deactivated", w=alice)
    assert relay.get("getRepoStatus", did=ALICE).json == {"did": ALICE, "active": False, "status": "deactivated"}
    relay.account(ALICE, status="takendown", upstream="deactivated", w=alice)  # the relay's own takedown first
    assert relay.get("getRepoStatus", did=ALICE).json == {"did": ALICE, "active": False, "status": "takendown"}
    relay.account("did:plc:new")
    assert relay.get("getRepoStatus", did="did:plc:new").json == {"did": "did:plc:new", "active": True}
    assert error_of(relay.get("getRepoStatus", did="did:plc:nobody")) == "RepoNotFound"


# -- refusals and errors -------------------------------------------------------------------


def _data_requests(alice: RepoWriter) -> dict[str, dict[str, Any]]:
    assert alice.commit_cid is not None
    return {
        "getRepo": {"did": ALICE},
        "getRecord": {"did": ALICE, "collection": "app.bsky.actor.profile", "rkey": "self"},
        "getLatestCommit": {"did": ALICE},
        "getBlocks": {"did": ALICE, "cids": cid_to_str(alice.commit_cid)},
    }


@pytest.mark.parametrize(
    ("status", "upstream", "error"),
    [
        ("takendown", "active", "RepoTakendown"),
        ("takendown", "deactivated", "RepoTakendown"),
        ("active", "takendown", "RepoTakendown"),
        ("active", "suspended", "RepoSuspended"),
        ("active", "deactivated", "RepoDeactivated"),
        ("active", "deleted", "RepoNotFound"),
        ("active", "desynchronized", "RepoNotFound"),
        ("active", "throttled", "RepoNotFound"),
    ],
)
def test_inactive_accounts_are_refused(relay: Relay, alice: RepoWriter, status: str, upstream: str, error: str) -> None:
    relay.account(ALICE, status=status, upstream=upstream, w=alice)
    for method, params in _data_requests(alice).items():
        assert error_of(relay.get(method, **params)) == error, method
    relay.account(ALICE, w=alice)  # reversal: served again
    for method, params in _data_requests(alice).items():
        assert relay.get(method, **params).status_code == 200, method


def test_unknown_and_unmirrored_repos(relay: Relay, alice: RepoWriter) -> None:
    for method, params in _data_requests(alice).items():
        assert error_of(relay.get(method, **{**params, "did": "did:plc:nobody"})) == "RepoNotFound", method
    relay.account("did:plc:dave")  # known, active, nothing mirrored and no commit known
    for method, params in _data_requests(alice).items():
        assert error_of(relay.get(method, **{**params, "did": "did:plc:dave"})) == "RepoNotFound", method


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("getRepo", {}),
        ("getRepo", {"did": ""}),
        ("getRepo", {"did": "alice.example.com"}),
        ("getRepo", {"did": "did:PLC:x"}),
        ("getRepo", {"did": "did:plc:x\x00"}),
        ("getRepo", {"did": ALICE, "since": "notatid"}),
        ("getRepo", {"did": ALICE, "since": "kzzzzzzzzzzzz"}),
        ("getRecord", {"did": ALICE, "collection": "app.bsky.feed.post"}),
        ("getRecord", {"did": ALICE, "collection": "nope", "rkey": "x"}),
        ("getRecord", {"did": ALICE, "collection": "app.bsky.feed.post", "rkey": ".."}),
        ("getRecord", {"did": ALICE, "collection": "app.bsky.feed.post", "rkey": "a/b"}),
        ("getRecord", {"did": ALICE, "collection": "app.bsky.feed.post", "rkey": "é"}),
        ("getBlocks", {"did": ALICE}),
        ("getBlocks", {"did": ALICE, "cids": "bafynotacid"}),
        ("getBlocks", {"did": ALICE, "cids": "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG"}),
        ("getBlocks", {"did": ALICE, "cids": ["bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"] * 1001}),
        ("getLatestCommit", {"did": "did:"}),
        ("getRepoStatus", {}),
        ("listRepos", {"limit": "0"}),
        ("listRepos", {"limit": "1001"}),
        ("listRepos", {"limit": "-1"}),
        ("listRepos", {"limit": "1e3"}),
        ("listRepos", {"limit": "٣"}),
        ("listRepos", {"limit": "9" * 40}),
        ("listRepos", {"cursor": "not a did"}),
    ],
)
def test_bad_requests_are_invalid_request(relay: Relay, alice: RepoWriter, method: str, params: dict[str, Any]) -> None:
    assert error_of(relay.get(method, **params)) == "InvalidRequest"


def test_wrong_method(relay: Relay) -> None:
    assert relay.client.post(URL + "getRepo", query_string={"did": ALICE}).status_code == 405


_METHODS = ["getRepo", "getRecord", "getLatestCommit", "getBlocks", "listRepos", "getRepoStatus"]
_PARAMS = ["did", "since", "collection", "rkey", "cids", "limit", "cursor"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    method=st.sampled_from(_METHODS),
    params=st.lists(
        st.tuples(
            st.sampled_from(_PARAMS),
            st.one_of(
                st.text(max_size=40),
                st.sampled_from([ALICE, "did:plc:bob", "app.bsky.feed.post", "self", "3kabcdefghijk", "500", "1"]),
                st.from_regex(r"b[a-z2-7]{1,70}", fullmatch=True),
            ),
        ),
        max_size=6,
    ),
)
def test_fuzzed_queries_never_cause_a_server_error(
    relay: Relay, alice: RepoWriter, method: str, params: list[tuple[str, str]]
) -> None:
    resp = relay.client.get(URL + method, query_string=params)
    assert resp.status_code < 500, (params, resp.get_data(as_text=True))
    if resp.status_code >= 400:
        assert resp.json is not None and resp.json["error"] in (
            "InvalidRequest", "RepoNotFound", "BlockNotFound"
        )  # fmt: skip


def test_raw_garbage_query_strings(relay: Relay, alice: RepoWriter) -> None:
    rng = random.Random(5)
    for _ in range(200):
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(60)))
        query = b"did=" + raw + b"&cids=%" + raw[:5] + b"&since=" + raw[5:20]
        for method in _METHODS:
            environ = {"QUERY_STRING": query.decode("latin-1")}  # as a WSGI server passes raw bytes on
            assert relay.client.get(URL + method, environ_overrides=environ).status_code < 500


# -- a damaged mirror, a moving head, no mirror ----------------------------------------------


def test_damaged_mirror_is_a_logged_server_error_not_a_crash(relay: Relay) -> None:
    w = RepoWriter(ALICE, KEY)
    event = w.commit([Write("create", "app.bsky.feed.post/3k1", post(1))])
    record = w.records["app.bsky.feed.post/3k1"]
    s = slice_of(event, w.data)
    relay.store.write_slices([SliceWrite(s.did, s.rev, s.since, s.commit_cid, s.data_cid,
                                         [(c, b) for c, b in s.blocks if c != record])])  # fmt: skip
    relay.account(ALICE, w=w)
    before = MIRROR_READ_ERRORS.labels("missing_block")._value.get()
    resp = relay.get("getRepo", did=ALICE)
    assert resp.status_code == 500 and resp.json == {
        "error": "InternalServerError", "message": "the relay's copy of this repo is damaged"
    }  # fmt: skip
    assert MIRROR_READ_ERRORS.labels("missing_block")._value.get() == before + 1
    assert relay.get("getLatestCommit", did=ALICE).status_code == 200


class _MovingStore:
    """A head that moves once, and a first read that misses a block (a compaction raced it)."""

    def __init__(self) -> None:
        self.heads = [RepoHead(ALICE, "3k1", b"a", b"d"), RepoHead(ALICE, "3k2", b"b", b"d")]
        self.calls = 0

    def head(self, did: str) -> RepoHead:
        self.calls += 1
        return self.heads[0] if self.calls == 1 else self.heads[1]


def test_reads_retry_when_the_head_moved_under_them() -> None:
    store = _MovingStore()
    seen: list[str] = []

    def read(head: RepoHead) -> str:
        seen.append(head.rev)
        if head.rev == "3k1":
            raise MissingBlock("dropped by a compaction")
        return head.rev

    assert at_head(store, ALICE, read) == "3k2"  # type: ignore[arg-type]
    assert seen == ["3k1", "3k2"]


def test_without_a_mirror(tmp_path: Path, alice: RepoWriter) -> None:
    db = open_database(f"sqlite:///{tmp_path / 'plain.sqlite'}")
    apply_migrations(db)
    with db.connection_context(), db.atomic():
        upsert_accounts(
            db, [AccountRow(ALICE, None, "active", "active", alice.rev, alice.commit_cid, alice.data, False)]
        )
    client = create_app(BlueprintServices(repo_blueprint(reads=SyncReads(db, None)))).test_client()
    assert client.get(URL + "getRepo", query_string={"did": ALICE}).status_code == 501
    assert alice.commit_cid is not None
    head = {"cid": cid_to_str(alice.commit_cid), "rev": alice.rev}
    assert client.get(URL + "getLatestCommit", query_string={"did": ALICE}).json == head
    page = client.get(URL + "listRepos").json
    assert page == {"repos": [{"did": ALICE, "head": head["cid"], "rev": alice.rev, "active": True}]}
