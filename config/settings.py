"""The settings schema: every setting, its type, its one default and what it means.

A ``Settings`` object is built once by ``config.loader`` and passed explicitly to whatever
needs it. Nothing outside ``config/`` reads the environment.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class Secret(str):
    """A string that never shows itself in a repr, a log line or an f-string's ``!r``."""

    def __repr__(self) -> str:
        return "Secret('********')"

    def reveal(self) -> str:
        return str.__str__(self)


@dataclass(frozen=True, slots=True)
class Settings:
    """Validated relay configuration. Field comments are the documentation of each setting."""

    # address and port the HTTP/websocket front end listens on
    bind: str = "0.0.0.0:2470"
    # folder for the SQLite files, the event log and the repo mirror
    data_dir: Path = Path("data")
    # main database; default: SQLite file relay.sqlite in data_dir
    database_url: str = ""
    # repo-mirror metadata database; default: SQLite file carstore.sqlite in data_dir
    carstore_database_url: str = ""
    # PLC directory used to resolve did:plc identities
    plc_url: str = "https://plc.directory"
    # password of the admin interface and admin API (user "admin"); empty disables admin
    admin_password: Secret = field(default_factory=lambda: Secret(""))
    # accept http://, explicit ports and loopback/private hosts (development and tests only)
    allow_insecure_hosts: bool = False
    # accept commits failing Sync 1.1 inversion / lacking prevData with a counted warning
    lenient_sync_validation: bool = False
    # how long accepted events stay replayable from the output log
    replay_window_hours: float = 72.0
    # largest upstream websocket frame accepted
    max_frame_bytes: int = 5 * 1024 * 1024
    # largest single block (record or node) accepted
    max_block_bytes: int = 2 * 1024 * 1024
    # most operations one commit may carry
    max_commit_ops: int = 200
    # how far in the future a commit rev may be, in seconds
    max_rev_future_seconds: int = 300
    # accounts one new upstream host may create before an operator raises its limit
    default_host_account_limit: int = 100_000
    # sustained events per second accepted from one upstream host
    default_host_events_per_second: float = 50.0
    # frames buffered per firehose consumer before it is cut with ConsumerTooSlow
    consumer_buffer_frames: int = 20_000
    # events in flight per upstream host before its subscriber stops reading
    host_inflight_events: int = 500
    # consecutive failed connections before an upstream host is marked offline
    upstream_max_failures: int = 8
    # seconds before an offline host is tried again
    offline_retry_seconds: float = 900.0
    # seconds of upstream silence before a connection is considered dead (pings every third of it)
    upstream_idle_timeout_seconds: float = 90.0
    # processes that run upstream subscribers and verification; 0 runs them in the relay process
    ingest_workers: int = 0
    # how long the sequencer gathers events before one fsync and broadcast (0: flush at once)
    sequencer_batch_window_seconds: float = 0.005
    # seconds between upstream cursor flushes to the database
    cursor_flush_seconds: float = 5.0
    # seconds an identity (DID document) stays fresh in the cache
    identity_ttl_seconds: float = 24 * 3600.0
    # hostnames subscribed to at start-up, besides those already known
    crawl_hosts: tuple[str, ...] = ()
    # keep a verified mirror of every account's repo (carstore) and serve the sync read API
    mirror_enabled: bool = True
    # whole-repo fetches (backfill and re-sync) running at once, overall and per upstream host
    backfill_concurrency: int = 8
    backfill_per_host: int = 2
    # an account is compacted once it has this many slices; how often compaction runs
    compaction_min_slices: int = 32
    compaction_interval_seconds: float = 60.0
    # live commits gathered this long into one mirror pack file and transaction (the log is replayed after a crash)
    mirror_flush_seconds: float = 0.25
    # log level: debug, info, warning or error
    log_level: str = "info"
    # log format: text or json
    log_format: str = "text"
    # -- control plane (admin API and CLI) --
    # more admin passwords, comma-separated, accepted beside admin_password (for rotation); 12+ chars each
    admin_extra_passwords: Secret = field(default_factory=lambda: Secret(""))
    # failed admin sign-ins from one client address within the window before it is answered 429
    admin_auth_max_failures: int = 10
    # the window over which failed admin sign-ins are counted, in seconds
    admin_auth_window_seconds: float = 300.0
    # new hosts public requestCrawl may add per day (the admin API changes it at run time)
    new_hosts_per_day: int = 50

    # -- web front end limits (issue 7: anonymous clients) --
    # seconds a client has to send a request line and headers (from connecting, or from its first byte)
    http_header_timeout_seconds: float = 10.0
    # seconds an idle kept-alive connection is held open waiting for its next request
    http_idle_timeout_seconds: float = 60.0
    # seconds a client has to send a request body
    http_body_timeout_seconds: float = 30.0
    # connections served at once, lowered at start-up to fit the open-file limit; beyond it: 503
    http_max_connections: int = 4096
    # largest request body accepted, chunked or not (requestCrawl: 16 KiB)
    http_max_body_bytes: int = 1024 * 1024
    # firehose replays (consumers catching up from a cursor) running at once; later ones wait their turn
    firehose_max_replays: int = 8
    # bytes queued per firehose consumer before it is cut with ConsumerTooSlow (besides consumer_buffer_frames)
    consumer_buffer_bytes: int = 64 * 1024 * 1024
    # seconds without a frame before a firehose consumer is pinged; no answer within as long again: cut
    firehose_ping_seconds: float = 30.0
    # public requestCrawl requests accepted per client address per minute (429 beyond)
    crawl_requests_per_minute: int = 30
    # upstream hosts the relay follows at most; requestCrawl of a new host beyond it is refused
    max_hosts: int = 10_000
    # -- outbound connections (actors/outbound.py: crawl probe, identity, backfill, upstream websockets)
    # non-public networks (CIDRs) outbound connections may reach; empty: none (loopback+private if insecure)
    outbound_allowed_networks: tuple[str, ...] = ()
    # DNS server ("IP" or "IP:PORT") that resolves outbound host names; empty: the system resolver
    outbound_dns_server: str = ""
    # longest one whole-repo backfill download (getRepo) may take, in seconds
    backfill_fetch_total_seconds: float = 900.0
    # -- process lifecycle and infrastructure failures --
    # seconds a stopping relay has to stop every actor and thread; then it exits hard (os._exit)
    shutdown_timeout_seconds: float = 60.0
    # seconds an actor retries a failing database or disk (with backoff) before the relay stops
    infra_retry_seconds: float = 300.0
    # -- hostile and stalled upstreams (issue 7) --
    # a connected host whose reader spends this long on one frame is logged, counted and reconnected
    host_stall_seconds: float = 60.0
    # -- observability (issue 10: traces, metrics listener, host status) --
    # HOST:PORT of a separate listener for /metrics only; empty: /metrics on the main listener
    metrics_bind: str = ""
    # share of upstream events given a trace when tracing is on (OTEL_TRACES_EXPORTER=otlp), above 0, at most 1
    trace_events_ratio: float = 0.001
    # seconds without an upstream event before a connected host shows as "idle" in getHostStatus/listHosts
    host_idle_status_seconds: float = 600.0
    # -- admin web pages (web/admin_pages.py) --
    # key that signs admin page session cookies; empty: a random one at each start (sign-ins end on restart)
    admin_session_secret: Secret = field(default_factory=lambda: Secret(""))
    # hours an admin page sign-in lasts before the password is asked again
    admin_session_hours: float = 12.0
    # -- per-host hour and day windows (actors/host_rate.py) --
    # events one host may send per hour, plus its account limit (limits slow reading, never drop)
    default_host_events_per_hour: int = 2500
    # events one host may send per day, plus ten times its account limit
    default_host_events_per_day: int = 20_000
    # how many times the hour and day limits a host in a trusted domain gets
    trusted_host_rate_multiplier: float = 10.0
    # -- discovery (actors/enumerator.py: every added host's listRepos walked, its accounts mirrored)
    # walk each added host's listRepos so accounts that never write again are known and mirrored
    enumerate_hosts: bool = True
    # hosts whose listRepos is walked at once
    enumerate_concurrent_hosts: int = 4
    # listRepos pages fetched per second from one host
    enumerate_pages_per_second: float = 2.0
    # accounts asked for in one listRepos page (the Lexicon allows 1 to 1000)
    enumerate_page_size: int = 1000
    # most listRepos pages walked on one host (a cursor that never ends stops there)
    enumerate_max_pages: int = 100_000
    # seconds before a walk that failed (host unreachable, server error) is tried again
    enumerate_retry_seconds: float = 300.0
    # how often the host table is scanned for hosts still to walk, in seconds
    enumerate_scan_seconds: float = 10.0
    # a walk pauses while more than this many accounts wait for a mirror backfill
    enumerate_max_backfill_queue: int = 10_000
    # spider: follow DIDs met in events, records and fetched repos to PDS hosts not yet followed
    spider_enabled: bool = True
    # DIDs (with their event's blocks) waiting for the spider; beyond it offers are dropped and counted
    spider_queue_size: int = 10_000
    # identity look-ups the spider makes per second at most
    spider_lookups_per_second: float = 5.0

    # -- fan-out nodes (issue 11: `skyrelay fanout`) --
    # the relay (or fan-out node) this node follows: ws:// or wss:// base URL; required by `skyrelay fanout`
    fanout_upstream: str = ""
    # firehose consumers one fan-out node serves at once; beyond it: 503 ConsumerLimitReached before the upgrade
    fanout_max_consumers: int = 1000
    # seconds the upstream connection may be down before /xrpc/_health answers 503
    fanout_unhealthy_after_seconds: float = 30.0
    # seconds a consumer whose cursor is ahead of this node's log waits for it before FutureCursor
    fanout_future_cursor_wait_seconds: float = 10.0
    # seconds between polls of the upstream's /xrpc/_health (its newest seq, for the lag metric)
    fanout_upstream_poll_seconds: float = 5.0
    # seconds a proxied read (getRepo, listHosts, ...) or forwarded requestCrawl may take upstream
    fanout_proxy_timeout_seconds: float = 30.0
    # largest response body a proxied read may stream back; larger ones are refused (502) or cut
    fanout_proxy_max_body_bytes: int = 256 * 1024 * 1024
    # seconds before the spider re-resolves a DID hinted as moved (wrong_host drop, #identity) again
    spider_recheck_moved_seconds: float = 60.0

    def admin_passwords(self) -> tuple[str, ...]:
        """Every accepted admin password (empty: the admin API is off)."""
        extra = [p.strip() for p in self.admin_extra_passwords.reveal().split(",")]
        return tuple(p for p in (self.admin_password.reveal(), *extra) if p)

    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'relay.sqlite'}"

    def effective_carstore_database_url(self) -> str:
        return self.carstore_database_url or f"sqlite:///{self.data_dir / 'carstore.sqlite'}"

    def bind_host_port(self) -> tuple[str, int]:
        host, _, port = self.bind.rpartition(":")
        return host.strip("[]") or "0.0.0.0", int(port)

    def metrics_host_port(self) -> tuple[str, int] | None:
        """Where the separate metrics listener binds, or None (``/metrics`` on the main listener)."""
        if not self.metrics_bind:
            return None
        host, _, port = self.metrics_bind.rpartition(":")
        return host.strip("[]") or "0.0.0.0", int(port)

    def public_dict(self) -> dict[str, Any]:
        """The settings as plain values with secrets masked (for `skyrelay config` and logs)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Secret):
                value = "********" if value else ""
            elif f.name.endswith("database_url") and value:
                value = mask_url_password(value)
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


def mask_url_password(url: str) -> str:
    """``scheme://user:secret@host`` -> ``scheme://user:****@host``."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    if ":" in creds:
        user = creds.split(":", 1)[0]
        creds = f"{user}:****"
    return f"{scheme}://{creds}@{host}"


FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Settings))


def settings_to_json(settings: Settings) -> str:
    """The settings as JSON for a child process (an ingest worker); secrets are left out."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if isinstance(value, Secret):
            continue
        out[f.name] = str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
    return json.dumps(out)


def settings_from_json(text: str) -> Settings:
    """Inverse of ``settings_to_json`` (values were validated by the parent)."""
    hints = typing.get_type_hints(Settings)
    values: dict[str, Any] = {}
    for name, value in json.loads(text).items():
        values[name] = Path(value) if hints[name] is Path else tuple(value) if isinstance(value, list) else value
    return Settings(**values)
