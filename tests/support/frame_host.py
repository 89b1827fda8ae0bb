"""A synthetic upstream PDS for tests and benchmarks: serves a firehose of given or generated frames.

Run as ``python -m tests.support.frame_host --port P``. It speaks real websockets (gevent) and
answers ``describeServer`` like a PDS. Frames reach it through a control API on the same port:

- ``POST /control/frames``: a body of length-prefixed frames (4-byte big-endian length, then
  the frame), each already carrying its upstream ``seq``; appended and pushed to subscribers.
- ``POST /control/generate``: JSON ``{"accounts": [{"did", "curve", "key_hex"}], "commits": N,
  "start_seq": S}``: builds N signed Sync 1.1 commits round-robin over the accounts (with their
  genesis commits first), appends them, answers with the number of frames.
- ``GET /control/status``: ``{"frames": n, "last_seq": s, "subscribers": k}``.
- ``POST /control/close``: drops every subscriber connection (to test reconnects).
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402
from geventwebsocket.handler import WebSocketHandler  # noqa: E402

from protocol.crypto import PrivateKey  # noqa: E402
from protocol.frames import encode_frame  # noqa: E402
from protocol.repo_writer import RepoWriter, Write  # noqa: E402
from tests.support.framing import split_frames  # noqa: E402


class FrameStore:
    def __init__(self) -> None:
        self.frames: list[tuple[int, bytes]] = []
        self.changed = gevent.event.Event()
        self.subscribers: set[Any] = set()

    def add(self, items: list[tuple[int, bytes]]) -> None:
        self.frames.extend(items)
        self.changed.set()
        self.changed = gevent.event.Event()

    @property
    def last_seq(self) -> int:
        return self.frames[-1][0] if self.frames else 0


def generate(spec: dict[str, Any]) -> list[tuple[int, bytes]]:
    seq = int(spec.get("start_seq", 1))
    writers = []
    out: list[tuple[int, bytes]] = []
    for acct in spec["accounts"]:
        key = PrivateKey.from_bytes(acct["curve"], bytes.fromhex(acct["key_hex"]))
        writer = RepoWriter(acct["did"], key)
        writers.append(writer)
        out.append((seq, encode_frame(writer.commit([], seq))))
        seq += 1
    for i in range(int(spec["commits"])):
        writer = writers[i % len(writers)]
        event = writer.commit([Write("create", f"app.bsky.feed.post/{3_000_000_000_000 + i:013d}", {"t": i})], seq)
        out.append((seq, encode_frame(event)))
        seq += 1
    return out


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
            cursor = int(query.get("cursor", "-1"))
            serve_ws(store, ws, cursor)
            return []
        if path == "/xrpc/com.atproto.server.describeServer":
            return reply("200 OK", {"did": did, "availableUserDomains": [".test"]})
        if path == "/control/status":
            return reply("200 OK", {"frames": len(store.frames), "last_seq": store.last_seq,
                                    "subscribers": len(store.subscribers)})  # fmt: skip
        if path == "/control/frames" and method == "POST":
            body = environ["wsgi.input"].read()
            items = []
            from protocol.frames import decode_frame

            for frame in split_frames(body):
                try:
                    seq = getattr(decode_frame(frame), "seq", store.last_seq + 1)
                except Exception:  # a deliberately broken frame: give it the next seq
                    seq = store.last_seq + 1 + len(items)
                items.append((seq, frame))
            store.add(items)
            return reply("200 OK", {"frames": len(items)})
        if path == "/control/generate" and method == "POST":
            spec = json.loads(environ["wsgi.input"].read())
            items = generate(spec)
            store.add(items)
            return reply("200 OK", {"frames": len(items), "last_seq": store.last_seq})
        if path == "/control/close" and method == "POST":
            for ws in list(store.subscribers):
                ws.close()
            return reply("200 OK", {"closed": True})
        return reply("404 Not Found", {"error": "NotFound", "message": path})

    return app


def serve_ws(store: FrameStore, ws: Any, cursor: int) -> None:
    store.subscribers.add(ws)
    try:
        if cursor < 0:
            index = len(store.frames)
        else:
            index = next((i for i, (seq, _) in enumerate(store.frames) if seq > cursor), len(store.frames))
        while not ws.closed:
            if index < len(store.frames):
                batch = store.frames[index : index + 256]
                index += len(batch)
                for _, frame in batch:
                    ws.send(frame, binary=True)
                gevent.sleep(0)
            else:
                store.changed.wait(timeout=1.0)
    except Exception:  # the relay went away
        pass
    finally:
        store.subscribers.discard(ws)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--did", default="did:web:frame-host.test")
    args = parser.parse_args(argv)
    store = FrameStore()
    server = WSGIServer((args.host, args.port), make_app(store, args.did), handler_class=WebSocketHandler, log=None)
    server.start()
    print(json.dumps({"port": server.server_port}), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
