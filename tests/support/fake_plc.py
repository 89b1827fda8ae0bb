"""A stand-in PLC directory (and did:web host) for tests: a real HTTP server on 127.0.0.1.

``GET /{did}`` answers the stored DID document (404 when unknown, 410 when tombstoned);
``GET /.well-known/did.json`` answers the document of ``did:web:{Host header}`` (a port as
``%3A``), so one server also plays a did:web host. It can be told to fail (answer 500, or
close the connection without answering), to be slow, or to hold every request until
released, and it counts requests. In-process::

    with FakePlc({did: doc}) as plc:
        directory = IdentityDirectory(db, plc_url=plc.url)

or as a process: ``python -m tests.support.fake_plc --port P --docs docs.json`` (a JSON object
of DID -> document, like ``tests/fixtures/refpds/did-docs.json``).
"""

from __future__ import annotations

import argparse
import json
import secrets
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import unquote

FailureMode = Literal["error", "close"]
_PLC_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
_HOLD_LIMIT_SECONDS = 30.0  # a held request is answered after this even if never released


def new_plc_did() -> str:
    """A random, syntactically valid did:plc."""
    return "did:plc:" + "".join(secrets.choice(_PLC_ALPHABET) for _ in range(24))


def make_did_doc(did: str, signing_key: str, pds_endpoint: str, *, handle: str | None = None) -> dict[str, Any]:
    """A DID document as the PLC directory serves it today (Multikey, full-DID fragment ids)."""
    if not signing_key.startswith("did:key:"):
        raise ValueError("signing_key must be a did:key")
    return {
        "@context": [
            "https://www.w3.org/ns/did/v1",
            "https://w3id.org/security/multikey/v1",
            "https://w3id.org/security/suites/secp256k1-2019/v1",
        ],
        "id": did,
        "alsoKnownAs": [f"at://{handle}"] if handle else [],
        "verificationMethod": [
            {
                "id": f"{did}#atproto",
                "type": "Multikey",
                "controller": did,
                "publicKeyMultibase": signing_key[len("did:key:") :],
            }
        ],
        "service": [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": pds_endpoint}],
    }


class _Server(ThreadingHTTPServer):
    # socketserver's default listen backlog is 5: a relay resolving many new accounts at once
    # overflowed it, and every dropped SYN cost the client a 1 s retransmit (seconds of
    # start-up backlog in scripts/bench_realistic.py that were the stand-in's, not the relay's)
    request_queue_size = 1024
    daemon_threads = True


class FakePlc:
    """An HTTP server answering DID documents from a dict; thread-safe controls for tests."""

    def __init__(
        self, docs: Mapping[str, Mapping[str, Any]] | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self._lock = threading.Condition()
        self._docs: dict[str, Mapping[str, Any]] = dict(docs or {})
        self._tombstoned: set[str] = set()
        self._counts: Counter[str] = Counter()
        self._total = 0
        self._connections = 0
        self._failure: FailureMode | None = None
        self._released = threading.Event()
        self._released.set()
        self.delay_seconds = 0.0
        self._server = _Server((host, port), _Handler)
        self._server.plc = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> FakePlc:
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fake-plc", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._released.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> FakePlc:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- documents -----------------------------------------------------------------------------
    def put(self, did: str, doc: Mapping[str, Any]) -> None:
        with self._lock:
            self._docs[did] = doc
            self._tombstoned.discard(did)

    def remove(self, did: str) -> None:
        with self._lock:
            self._docs.pop(did, None)

    def tombstone(self, did: str) -> None:
        """Answer 410 Gone for ``did`` from now on, as the PLC does for a deactivated DID."""
        with self._lock:
            self._docs.pop(did, None)
            self._tombstoned.add(did)

    # -- behaviour -----------------------------------------------------------------------------
    def fail(self, mode: FailureMode = "error") -> None:
        """Answer every request with a 500 (``"error"``) or by closing the connection (``"close"``)."""
        with self._lock:
            self._failure = mode

    def recover(self) -> None:
        with self._lock:
            self._failure = None

    def hold(self) -> None:
        """Keep every request waiting (counted, unanswered) until ``release``."""
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    # -- counters ------------------------------------------------------------------------------
    @property
    def requests(self) -> int:
        with self._lock:
            return self._total

    @property
    def connections(self) -> int:
        """Connections accepted so far (a client that keeps its connection alive makes few)."""
        with self._lock:
            return self._connections

    def requests_for(self, did: str) -> int:
        with self._lock:
            return self._counts[did]

    def wait_for_requests(self, n: int, timeout: float = 10.0) -> bool:
        """True once at least ``n`` requests have arrived (answered or not), False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: self._total >= n, timeout=timeout)

    # -- used by the handler -------------------------------------------------------------------
    def _connected(self) -> None:
        with self._lock:
            self._connections += 1

    def _arrived(self, did: str) -> None:
        with self._lock:
            self._counts[did] += 1
            self._total += 1
            self._lock.notify_all()

    def _answer(self, did: str) -> tuple[int, bytes | None]:
        """(status, body); body ``None`` means: close the connection without answering."""
        self._released.wait(timeout=_HOLD_LIMIT_SECONDS)
        if self.delay_seconds:
            time.sleep(self.delay_seconds)  # simulated slowness of the server, not a test wait
        with self._lock:
            if self._failure == "close":
                return 0, None
            if self._failure == "error":
                return 500, b'{"message":"simulated failure"}'
            if did in self._tombstoned:
                return 410, b'{"message":"DID not available"}'
            doc = self._docs.get(did)
        if doc is None:
            return 404, json.dumps({"message": f"DID not registered: {did}"}).encode()
        return 200, json.dumps(doc).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the PLC directory (the relay keeps its connections)

    def setup(self) -> None:
        super().setup()
        self.server.plc._connected()  # type: ignore[attr-defined]

    def do_GET(self) -> None:
        plc: FakePlc = self.server.plc  # type: ignore[attr-defined]
        path = self.path.split("?", 1)[0]
        if path == "/.well-known/did.json":
            did = "did:web:" + (self.headers.get("Host") or "").replace(":", "%3A")
        else:
            did = unquote(path.lstrip("/"))
        plc._arrived(did)
        status, body = plc._answer(did)
        if body is None:
            self.close_connection = True
            return
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/did+ld+json" if status == 200 else "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (a timeout under test): not an error here

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--docs", type=Path, help="JSON object of DID -> DID document")
    args = parser.parse_args(argv)
    docs = json.loads(args.docs.read_text()) if args.docs else {}
    plc = FakePlc(docs, host=args.host, port=args.port).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"fake PLC listening on http://{args.host}:{plc.port} with {len(docs)} documents", flush=True)
    while not stop.wait(1.0):
        pass
    plc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
