"""A synthetic upstream PDS for tests and benchmarks: serves a firehose of given or generated frames.

Run as ``python -m tests.support.frame_host --port P``. It speaks real websockets (gevent) and
answers ``describeServer`` like a PDS. Frames reach it through a control API on the same port:

- ``POST /control/frames``: a body of length-prefixed frames (4-byte big-endian length, then
  the frame), each already carrying its upstream ``seq``; appended and pushed to subscribers. A
  frame without one (error, info, broken) is given the seq after the frame before it.
- ``POST /control/generate``: JSON ``{"accounts": [{"did", "curve", "key_hex"}], "commits": N,
  "start_seq": S, "hold": false}``: builds N signed Sync 1.1 commits round-robin over the
  accounts (with their genesis commits first), appends them, answers with the number of frames.
  With ``"hold": true`` the frames are kept aside, unseen by subscribers, until released; the
  accounts' repos carry on from one call to the next (a later call may repeat the accounts).
  With ``"creation": true`` each new account arrives as the reference PDS creates one:
  ``#identity``, ``#account`` (active), the empty genesis ``#commit``, then ``#sync`` of that rev.
- ``POST /control/release``: JSON ``{"count": n, "rate": r, "record_sends": bool}`` (all
  optional): hands the first ``n`` held frames (default all) to subscribers, at once or paced at
  ``r`` frames/s; with ``record_sends`` the time each frame is handed to a subscriber's socket is
  recorded. Answers at once with ``{"released": n}``; releases run one after another.
- ``GET /control/sends``: ``{"clock": "monotonic", "sends": [[seq, did, rev, t], ...]}``, the
  first send time (``time.monotonic()``, comparable between processes on one Linux machine)
  of every recorded frame.
- ``GET /control/status``: ``{"frames": n, "last_seq": s, "subscribers": k, "held": h,
  "releasing": bool}``.
- ``POST /control/close``: drops every subscriber connection (to test reconnects).
- ``POST /control/broken_getrepo?did=D``: from now on ``getRepo`` of ``D`` answers a malformed
  HTTP status line and closes the connection (a broken PDS).
- ``GET /control/subscriptions``: ``{"subscriptions": [{"cursor": c, "answer": a}, ...]}``, every
  subscribeRepos request so far in arrival order: its ``cursor`` query (``null`` without one)
  and ``"FutureCursor"`` or ``null`` (served).

A subscription whose cursor is beyond the newest seq is answered, as the reference PDS does,
with an error frame (``FutureCursor``) and closed. ``--frames FILE`` starts the host with a
history (length-prefixed frames, as ``/control/frames`` takes them), so a test can bring a
host back on the same port with its events already there before any subscriber can connect.

For benchmarks, ``--held FILE`` starts it with frames made ahead of time (the same format) held
back, to be released at a pace with ``/control/release``; ``POST /control/rewind`` drops every
subscriber and puts the host back as it started (every frame of ``--held`` held again, nothing
served, no send times), so one host can feed a fresh relay several times on the same port.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.parse  # noqa: E402
from collections import deque  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402
from geventwebsocket.handler import WebSocketHandler  # noqa: E402

from protocol.crypto import PrivateKey  # noqa: E402
from protocol.frames import AccountEvent, IdentityEvent, decode_frame, encode_frame, error_frame  # noqa: E402
from protocol.repo_writer import RepoWriter, Write, now_iso  # noqa: E402
from tests.support.framing import split_frames  # noqa: E402


class FrameStore:
    def __init__(self) -> None:
        self.frames: list[tuple[int, bytes]] = []
        self.changed = gevent.event.Event()
        self.subscribers: set[Any] = set()
        self.writers: dict[str, RepoWriter] = {}  # generated accounts' repos, by DID
        self.repos: dict[str, bytes] = {}  # uploaded repo CARs served by getRepo, by DID
        self.repo_fetches: list[str] = []  # DIDs whose repo was fetched
        self.held: deque[tuple[int, bytes]] = deque()  # generated with "hold", not yet released
        self.meta: dict[int, tuple[str, str]] = {}  # seq -> (did, rev) of generated frames
        self.track: set[int] = set()  # seqs whose send time is recorded
        self.sent_at: dict[int, float] = {}  # seq -> time.monotonic() of its first send
        self.releaser: gevent.Greenlet | None = None
        self.subscriptions: list[dict[str, Any]] = []  # {"cursor": int | None, "answer": str | None}
        self.max_seq = 0  # highest seq of any frame added (pushed frames may come out of order)
        self.initial_held: list[tuple[int, bytes]] = []  # --held frames, held again by a rewind
        self.broken_getrepo: set[str] = set()  # DIDs whose getRepo answers a malformed status line

    def add(self, items: list[tuple[int, bytes]]) -> None:
        self.frames.extend(items)
        self.max_seq = max([self.max_seq, *(seq for seq, _ in items)])
        self.changed.set()
        self.changed = gevent.event.Event()

    @property
    def last_seq(self) -> int:
        return self.frames[-1][0] if self.frames else 0


def with_seqs(store: FrameStore, frames: list[bytes]) -> list[tuple[int, bytes]]:
    """Pushed frames with the seq each carries; one without (error, info or broken) gets the next seq.

    So a subscriber resuming after the frame before it is served it again.
    """
    items: list[tuple[int, bytes]] = []
    for frame in frames:
        following = (items[-1][0] if items else store.last_seq) + 1
        try:
            seq = getattr(decode_frame(frame), "seq", following)
        except Exception:  # a deliberately broken frame
            seq = following
        items.append((seq, frame))
    return items


def generate(spec: dict[str, Any], store: FrameStore | None = None) -> list[tuple[int, bytes]]:
    """Frames of the spec; with a ``store``, accounts it already knows continue their repos."""
    seq = int(spec.get("start_seq", 1))
    known = store.writers if store is not None else {}
    writers = []
    out: list[tuple[int, bytes]] = []

    def add(event: Any) -> None:
        nonlocal seq
        out.append((seq, encode_frame(event)))
        if store is not None and hasattr(event, "repo"):
            store.meta[seq] = (event.repo, event.rev)
        seq += 1

    creation = bool(spec.get("creation"))

    for acct in spec["accounts"]:
        writer = known.get(acct["did"])
        if writer is None:
            key = PrivateKey.from_bytes(acct["curve"], bytes.fromhex(acct["key_hex"]))
            writer = RepoWriter(acct["did"], key)
            if store is not None:
                store.writers[writer.did] = writer
            if creation:
                add(IdentityEvent(seq, writer.did, now_iso()))
                add(AccountEvent(seq, writer.did, now_iso(), active=True))
            add(writer.commit([], seq))
            if creation:
                add(writer.sync_event(seq))
        writers.append(writer)
    for i in range(int(spec["commits"])):
        writer = writers[i % len(writers)]
        rkey = 3_000_000_000_000 + len(writer.records)
        add(writer.commit([Write("create", f"app.bsky.feed.post/{rkey:013d}", {"t": i})], seq))
    return out


def release(store: FrameStore, count: int, rate: float | None, record_sends: bool) -> None:
    """Move ``count`` held frames to subscribers, all at once or ``rate`` frames/s (a greenlet's body)."""
    items = [store.held.popleft() for _ in range(min(count, len(store.held)))]
    if record_sends:
        store.track.update(seq for seq, _ in items)
    if not rate:
        store.add(items)
        return
    started = time.monotonic()
    done = 0
    while done < len(items):
        due = min(len(items), int((time.monotonic() - started) * rate) + 1)
        if due > done:
            store.add(items[done:due])
            done = due
        gevent.sleep(max(0.0005, min(0.005, 1.0 / rate)))  # about one frame a tick; send times are recorded


def start_release(store: FrameStore, count: int, rate: float | None, record_sends: bool) -> None:
    previous = store.releaser

    def run() -> None:
        if previous is not None:
            previous.join()
        release(store, count, rate, record_sends)

    store.releaser = gevent.spawn(run)


def rewind(store: FrameStore) -> None:
    """Back to the start: no subscriber, nothing served or recorded, every ``--held`` frame held."""
    if store.releaser is not None:
        store.releaser.kill()
        store.releaser = None
    for ws in list(store.subscribers):
        ws.close()
    store.frames = []
    store.max_seq = 0
    store.held = deque(store.initial_held)
    store.track.clear()
    store.sent_at.clear()
    store.subscriptions.clear()
    store.changed.set()
    store.changed = gevent.event.Event()


def make_app(store: FrameStore, did: str) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")

        def reply(status: str, body: Any) -> list[bytes]:
            data = json.dumps(body).encode()
            start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
            return [data]

        if path == "/xrpc/com.atproto.sync.subscribeRepos":
            ws = environ.get("wsgi.websocket")
            if ws is None:
                return reply("400 Bad Request", {"error": "InvalidRequest", "message": "websocket required"})
            query = dict(p.split("=", 1) for p in environ.get("QUERY_STRING", "").split("&") if "=" in p)
            cursor = int(query["cursor"]) if "cursor" in query else None
            subscription: dict[str, Any] = {"cursor": cursor, "answer": None}
            store.subscriptions.append(subscription)
            if cursor is not None and cursor > store.max_seq:  # as the reference PDS answers
                subscription["answer"] = "FutureCursor"
                ws.send(error_frame("FutureCursor", "Cursor in the future."), binary=True)
                ws.close()
                return []
            serve_ws(store, ws, -1 if cursor is None else cursor)
            return []
        if path == "/xrpc/com.atproto.server.describeServer":
            return reply("200 OK", {"did": did, "availableUserDomains": [".test"]})
        if path == "/xrpc/com.atproto.sync.getRepo":
            query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
            repo_did = query.get("did", [""])[0]
            if repo_did in store.broken_getrepo:
                store.repo_fetches.append(repo_did)
                sock = environ["frame_host.socket"]
                sock.sendall(b"HTTP/1.1 2OO Fine\r\nContent-Length: 0\r\n\r\n")
                sock.shutdown(socket.SHUT_RDWR)
                start_response("200 OK", [("Content-Length", "0")])
                return []
            car = store.repos.get(repo_did)
            if car is None and repo_did in store.writers:
                car = store.writers[repo_did].repo_car()
            if car is None:
                return reply("400 Bad Request", {"error": "RepoNotFound", "message": repo_did})
            store.repo_fetches.append(repo_did)
            start_response("200 OK", [("Content-Type", "application/vnd.ipld.car"), ("Content-Length", str(len(car)))])
            return [car]
        if path == "/control/repo" and method == "POST":  # a test uploads the repo getRepo serves for a DID
            query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
            store.repos[query["did"][0]] = environ["wsgi.input"].read()
            return reply("200 OK", {"ok": True})
        if path == "/control/broken_getrepo" and method == "POST":
            store.broken_getrepo.add(urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))["did"][0])
            return reply("200 OK", {"ok": True})
        if path == "/control/repo_fetches":
            return reply("200 OK", {"fetches": store.repo_fetches})
        if path == "/control/status":
            releasing = store.releaser is not None and not store.releaser.dead
            return reply("200 OK", {"frames": len(store.frames), "last_seq": store.last_seq,
                                    "subscribers": len(store.subscribers), "held": len(store.held),
                                    "releasing": releasing})  # fmt: skip
        if path == "/control/frames" and method == "POST":
            items = with_seqs(store, split_frames(environ["wsgi.input"].read()))
            store.add(items)
            return reply("200 OK", {"frames": len(items)})
        if path == "/control/generate" and method == "POST":
            spec = json.loads(environ["wsgi.input"].read())
            items = generate(spec, store)
            if spec.get("hold"):
                store.held.extend(items)
                return reply("200 OK", {"frames": len(items), "last_seq": items[-1][0] if items else 0})
            store.add(items)
            return reply("200 OK", {"frames": len(items), "last_seq": store.last_seq})
        if path == "/control/release" and method == "POST":
            spec = json.loads(environ["wsgi.input"].read() or b"{}")
            count = len(store.held) if spec.get("count") is None else int(spec["count"])
            count = min(count, len(store.held))
            rate = float(spec["rate"]) if spec.get("rate") else None
            start_release(store, count, rate, bool(spec.get("record_sends")))
            return reply("200 OK", {"released": count})
        if path == "/control/rewind" and method == "POST":
            rewind(store)
            return reply("200 OK", {"held": len(store.held)})
        if path == "/control/sends":
            sends = [[seq, *store.meta.get(seq, ("", "")), t] for seq, t in sorted(store.sent_at.items())]
            return reply("200 OK", {"clock": "monotonic", "sends": sends})
        if path == "/control/close" and method == "POST":
            for ws in list(store.subscribers):
                ws.close()
            return reply("200 OK", {"closed": True})
        if path == "/control/subscriptions":
            return reply("200 OK", {"subscriptions": store.subscriptions})
        return reply("404 Not Found", {"error": "NotFound", "message": path})

    return app


def serve_ws(store: FrameStore, ws: Any, cursor: int) -> None:
    sock = getattr(getattr(ws, "handler", None), "socket", None)
    if sock is not None:  # as a PDS does (Node's ws sets noDelay): Nagle would hold paced frames for ACKs
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    store.subscribers.add(ws)
    gone = gevent.event.Event()

    def drain() -> None:  # notice a subscriber that hangs up (answering its pings on the way), as a PDS does
        try:
            while ws.receive() is not None:
                pass
        except Exception:
            pass
        gone.set()

    reader = gevent.spawn(drain)
    try:
        if cursor < 0:
            index = len(store.frames)
        else:
            index = next((i for i, (seq, _) in enumerate(store.frames) if seq > cursor), len(store.frames))
        while not ws.closed and not gone.is_set():
            if index < len(store.frames):
                batch = store.frames[index : index + 256]
                index += len(batch)
                for seq, frame in batch:
                    if seq in store.track and seq not in store.sent_at:
                        store.sent_at[seq] = time.monotonic()
                    ws.send(frame, binary=True)
                gevent.sleep(0)
            else:
                store.changed.wait(timeout=1.0)
    except Exception:  # the relay went away
        pass
    finally:
        reader.kill(block=False)
        store.subscribers.discard(ws)


class Handler(WebSocketHandler):
    """Gives the app the raw socket (``frame_host.socket``), to answer as a broken server would."""

    def get_environ(self) -> dict[str, Any]:
        env: dict[str, Any] = super().get_environ()
        env["frame_host.socket"] = self.socket
        return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--did", default="did:web:frame-host.test")
    parser.add_argument("--frames", type=argparse.FileType("rb"), help="length-prefixed frames to start with")
    parser.add_argument("--held", type=argparse.FileType("rb"), help="length-prefixed frames to hold for release")
    args = parser.parse_args(argv)
    store = FrameStore()
    if args.frames is not None:
        with args.frames:
            store.add(with_seqs(store, split_frames(args.frames.read())))
    if args.held is not None:
        with args.held:
            store.initial_held = with_seqs(store, split_frames(args.held.read()))
        store.held.extend(store.initial_held)
    server = WSGIServer((args.host, args.port), make_app(store, args.did), handler_class=Handler, log=None)
    server.start()
    print(json.dumps({"port": server.server_port}), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
