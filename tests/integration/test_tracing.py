"""Traces with the SDK's in-memory exporter: request spans, sampled upstream events, backfills.

The upstream-event test runs the real actors in this process (``HostSubscriber._handle`` fed
signed frames, a started ``Sequencer`` with its event log, a started ``Broadcaster``), so every
stage hook is exercised on the relay's own path. The backfill test fetches from a synthetic
PDS subprocess over loopback.
"""

from __future__ import annotations

import base64
import io
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from actors import tracing
from actors.accounts import AccountCache
from actors.broadcaster import Broadcaster, ConsumerRegistry
from actors.host_subscriber import HostSubscriber, SubscriberConfig
from actors.mirror import MirrorConfig, RepoMirror
from actors.outbound import OutboundClient
from actors.sequencer import Sequencer, recover
from actors.verify import HostContext, Verifier, VerifyLimits
from config.logs import JsonFormatter
from config.tracing import TracingConfig
from protocol.crypto import PrivateKey
from protocol.frames import encode_frame
from protocol.repo_writer import RepoWriter, Write
from store.db import open_database
from store.eventlog import EventLog
from store.hosts import ensure_host
from store.migrations import apply_migrations
from tests.support.fake_plc import new_plc_did
from tests.support.fakes import BlueprintServices, Recorder
from tests.support.procs import FrameHost, wait_until
from web.admin_api import admin_blueprint
from web.admin_auth import AdminGuard
from web.app import create_app

STAGES = ["event.decode", "event.verify", "event.sequence", "event.durable", "event.broadcast"]


def start_tracing(events_ratio: float = 1.0) -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    tracing.setup(TracingConfig(enabled=True, events_ratio=events_ratio), exporter=exporter)
    return exporter


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = start_tracing()
    yield exporter
    tracing.shutdown()


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


# -- XRPC requests and admin operations ------------------------------------------------------------
class ResyncOnlyRelay:
    """The one operation these tests ask for, logged as ``actors.relay_accounts`` logs it."""

    def resync(self, did: object) -> None:
        logging.getLogger("actors.relay_accounts").info("admin requested resync did=%s", did)


PASSWORD = "tracing-admin-pw"


def admin_app() -> Any:
    guard = AdminGuard((PASSWORD,), max_failures=10, window_seconds=60.0)
    return create_app(BlueprintServices(admin_blueprint(relay=ResyncOnlyRelay(), guard=guard))).test_client()


AUTH = {"Authorization": "Basic " + base64.b64encode(f"admin:{PASSWORD}".encode()).decode()}


def test_each_request_is_a_span_named_by_route_with_its_status(spans: InMemorySpanExporter) -> None:
    client = admin_app()
    assert client.get("/xrpc/_health").status_code == 200
    assert client.get("/_health").status_code == 200
    assert client.get("/xrpc/com.example.nothing").status_code == 404

    (health,) = named(spans, "GET /xrpc/_health")
    assert health.attributes is not None
    assert health.attributes["http.route"] == "/xrpc/_health"
    assert health.attributes["http.response.status_code"] == 200
    assert health.parent is None
    assert len(named(spans, "GET /_health")) == 1
    (unknown,) = named(spans, "GET unmatched")  # unknown paths share one name
    assert unknown.attributes is not None
    assert unknown.attributes["http.response.status_code"] == 404
    assert unknown.attributes["url.path"] == "/xrpc/com.example.nothing"


def test_admin_operation_is_a_child_of_its_request_and_its_log_line_carries_the_ids(
    spans: InMemorySpanExporter,
) -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("actors.relay_accounts")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        did = new_plc_did()
        reply = admin_app().post("/admin/repo/resync", json={"did": did}, headers=AUTH)
        assert reply.status_code == 200
        logger.info("a line outside any span")
    finally:
        logger.removeHandler(handler)
    (request,) = named(spans, "POST /admin/repo/resync")
    (operation,) = named(spans, "admin.repo_resync")
    assert parent_id(operation) == request.context.span_id
    assert operation.context.trace_id == request.context.trace_id

    import json

    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    inside = next(line for line in lines if line["msg"].startswith("admin requested resync"))
    assert inside["trace_id"] == format(operation.context.trace_id, "032x")
    assert inside["span_id"] == format(operation.context.span_id, "016x")
    outside = next(line for line in lines if line["msg"] == "a line outside any span")
    assert "trace_id" not in outside


def test_refused_admin_request_has_no_operation_span(spans: InMemorySpanExporter) -> None:
    assert admin_app().post("/admin/repo/resync", json={"did": new_plc_did()}).status_code == 401
    (request,) = named(spans, "POST /admin/repo/resync")
    assert request.attributes is not None and request.attributes["http.response.status_code"] == 401
    assert named(spans, "admin.repo_resync") == []


# -- upstream events through the real actors ------------------------------------------------------
class Identities:
    def __init__(self, key: str, endpoint: str) -> None:
        self.signing_key = key
        self.pds_endpoint = endpoint

    def resolve(self, did: str) -> Identities:
        return self

    def refresh(self, did: str) -> Identities:
        return self


class Spine:
    """Subscriber (driven by hand) -> started Sequencer -> started Broadcaster, on SQLite and an event log."""

    HOST = "pds.test:8443"

    def __init__(self, tmp_path: Path) -> None:
        self.db = open_database(f"sqlite:///{tmp_path / 'relay.sqlite'}")
        apply_migrations(self.db)
        with self.db.connection_context():
            host_id = ensure_host(self.db, self.HOST).id
        event_log = EventLog(tmp_path / "events", self.db, retention_seconds=3600)
        recover(self.db, event_log)
        self.registry = ConsumerRegistry()
        self.consumer = self.registry.register()
        self.consumer.start_buffering()
        self.broadcaster = Broadcaster.start(self.registry)
        self.sequencer = Sequencer.start(self.db, event_log, self.broadcaster)
        key = PrivateKey.generate("k256")
        self.writer = RepoWriter(new_plc_did(), key)
        identities = Identities(key.public_key().did_key(), f"https://{self.HOST}")
        self.subscriber = HostSubscriber(
            host=HostContext(host_id, self.HOST),
            cursor=-1,
            account_count=0,
            events_per_second=None,
            verifier=Verifier(identities, AccountCache(self.db), VerifyLimits()),
            sequencer=self.sequencer,
            parent=Recorder(),
            config=SubscriberConfig(max_frame_bytes=1 << 22, max_ops=200, max_queue=1000, cursor_flush_seconds=60),
        )
        self.upstream_seq = 0

    def feed(self, count: int) -> None:
        for i in range(count):
            self.upstream_seq += 1
            writes = [] if self.writer.rev is None else [Write("create", f"app.bsky.feed.post/3k{i:011d}", {"t": i})]
            self.subscriber._handle(encode_frame(self.writer.commit(writes, self.upstream_seq)), time.time())

    def delivered(self) -> int:
        return self.consumer.queued

    def stop(self) -> None:
        self.sequencer.stop()
        self.broadcaster.stop()


@pytest.fixture
def spine(tmp_path: Path) -> Iterator[Spine]:
    s = Spine(tmp_path)
    yield s
    s.stop()


def test_a_sampled_upstream_event_gets_a_span_per_stage(spans: InMemorySpanExporter, spine: Spine) -> None:
    spine.feed(3)
    wait_until(lambda: len(named(spans, "upstream.event")) == 3, 20, "three event traces")
    assert spine.delivered() == 3
    roots = sorted(named(spans, "upstream.event"), key=lambda s: (s.attributes or {})["seq"])
    children = [s for s in spans.get_finished_spans() if s.name.startswith("event.")]
    for relay_seq, root in enumerate(roots, start=1):
        assert root.parent is None
        attrs = root.attributes or {}
        assert attrs["seq"] == relay_seq
        assert attrs["upstream.seq"] == relay_seq
        assert attrs["host"] == Spine.HOST
        assert attrs["event.type"] == "#commit"
        assert attrs["did"] == spine.writer.did
        mine = [c for c in children if parent_id(c) == root.context.span_id]
        assert [c.name for c in mine] == STAGES
        assert all(c.context.trace_id == root.context.trace_id for c in mine)
        starts = [c.start_time or 0 for c in mine]
        assert starts == sorted(starts)  # the stages follow each other
        assert (root.start_time or 0) <= starts[0] and (mine[-1].end_time or 0) <= (root.end_time or 0)
    assert not tracing._by_upstream and not tracing._by_seq  # nothing left in flight


def test_one_event_in_n_is_sampled(spine: Spine) -> None:
    exporter = start_tracing(events_ratio=0.25)
    try:
        spine.feed(8)
        wait_until(lambda: spine.delivered() == 8, 20, "eight events broadcast")
        wait_until(lambda: len(named(exporter, "upstream.event")) == 2, 20, "two event traces")
        assert sorted((s.attributes or {})["upstream.seq"] for s in named(exporter, "upstream.event")) == [4, 8]
    finally:
        tracing.shutdown()


def test_with_tracing_off_no_event_hook_runs(spine: Spine, monkeypatch: pytest.MonkeyPatch) -> None:
    assert not tracing.ENABLED

    def boom(*args: Any) -> None:
        raise AssertionError("a tracing hook ran while tracing is off")

    for name in ("start_event", "event_handed_over", "events_durable", "events_broadcast", "start_span"):
        monkeypatch.setattr(tracing, name, boom)
    spine.feed(3)
    wait_until(lambda: spine.delivered() == 3, 20, "three events broadcast")


# -- backfill -------------------------------------------------------------------------------------
@pytest.fixture
def frame_host() -> Iterator[FrameHost]:
    host = FrameHost()
    yield host
    host.stop()


class _Store:
    def __init__(self, directory: Path) -> None:
        self.directory = directory


def test_backfill_fetch_and_verification_are_spans(
    spans: InMemorySpanExporter, frame_host: FrameHost, tmp_path: Path
) -> None:
    key = PrivateKey.generate("k256")
    writer = RepoWriter(new_plc_did(), key)
    writer.commit([], 0)
    writer.commit([Write("create", "app.bsky.feed.post/3k00000000001", {"text": "hi"})], 0)
    frame_host.upload_repo(writer.did, writer.repo_car())
    mirror = RepoMirror(_Store(tmp_path), None, MirrorConfig(), outbound=OutboundClient.for_settings(True))
    ident = Identities(key.public_key().did_key(), frame_host.url)
    mirror._fetch(writer.did, ident)  # the actor is not started: its BackfillDone goes nowhere
    mirror._fetch(new_plc_did(), ident)  # not on the host: a failed fetch

    ok, failed = sorted(named(spans, "mirror.backfill"), key=lambda s: "error" in (s.attributes or {}))
    assert (ok.attributes or {})["did"] == writer.did
    (fetch,) = [s for s in named(spans, "mirror.fetch") if parent_id(s) == ok.context.span_id]
    (verify,) = [s for s in named(spans, "mirror.verify") if parent_id(s) == ok.context.span_id]
    assert (fetch.attributes or {})["bytes"] == len(writer.repo_car())
    assert (verify.attributes or {})["rev"] == writer.rev
    assert (failed.attributes or {})["error"] == "BadStatus"
    assert not [s for s in named(spans, "mirror.verify") if parent_id(s) == failed.context.span_id]


class _CompactingStore(_Store):
    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.compacted: list[str] = []

    def accounts_needing_compaction(self, min_slices: int, limit: int) -> list[str]:
        return ["did:plc:aaaaaaaaaaaaaaaaaaaaaaaa", "did:plc:bbbbbbbbbbbbbbbbbbbbbbbb"]

    def compact(self, did: str) -> None:
        with tracing.span("carstore.compact_one", did=did):  # stands for work done inside the run
            self.compacted.append(did)


def test_a_compaction_run_is_one_span(spans: InMemorySpanExporter, tmp_path: Path) -> None:
    store = _CompactingStore(tmp_path)
    RepoMirror(store, None, MirrorConfig(), outbound=OutboundClient.for_settings(True))._compact(10)  # type: ignore[arg-type]
    assert len(store.compacted) == 2
    (run,) = named(spans, "mirror.compact")
    inner = named(spans, "carstore.compact_one")
    assert len(inner) == 2 and all(parent_id(s) == run.context.span_id for s in inner)
