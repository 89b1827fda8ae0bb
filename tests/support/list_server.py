"""A hostile listing server as a real process: a PDS whose ``listRepos`` (or a relay whose ``listHosts``) misbehaves.

Run as ``python -m tests.support.list_server --mode MODE``; prints ``{"port": N}`` once
listening. ``GET /control/count`` answers how many listing pages were asked for,
``GET /control/cursors`` the cursor of each request in order. Modes:

- ``loop``: listRepos pages of two accounts whose cursors go a -> b -> a -> ...
- ``endless``: listRepos pages of two new accounts each, with a new cursor every time.
- ``garbage``: a listRepos page of unusable entries and one good one, then a body that is not JSON.
- ``hosts-garbage``: listHosts answers that are not listHosts answers.
- ``hosts``: listHosts of ``--hosts`` (comma-separated ``name=accounts``), two per page.

``describeServer`` answers like a PDS in every mode (so requestCrawl's probe passes).
"""

from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

_lock = threading.Lock()
_count = [0]
_cursors: list[str] = []


def _did(n: int) -> str:
    return "did:plc:" + format(n, "024x").translate(str.maketrans("0123456789", "abcdefghij"))


def _page(mode: str, cursor: str, hosts: list[tuple[str, int]]) -> bytes:
    if mode == "loop":
        nxt = "b" if cursor == "a" else "a"
        n = 2 if cursor == "a" else 0
        return json.dumps({"repos": [{"did": _did(n)}, {"did": _did(n + 1)}], "cursor": nxt}).encode()
    if mode == "endless":
        n = int(cursor or "0")
        return json.dumps({"repos": [{"did": _did(2 * n)}, {"did": _did(2 * n + 1)}], "cursor": str(n + 1)}).encode()
    if mode == "garbage":
        if cursor:
            return b"<html>not json</html>"
        repos = [{"did": "not a did"}, {"did": 7}, "x", None, {"did": _did(99)}]
        return json.dumps({"repos": repos, "cursor": "next"}).encode()
    if mode == "hosts-garbage":
        return [b"[1, 2, 3]", b'{"hosts": "many"}', b"\xff\xfe"][int(cursor or "0") % 3]
    start = int(cursor or "0")
    page = [{"hostname": h, "accountCount": n, "status": "active"} for h, n in hosts[start : start + 2]]
    out: dict[str, object] = {"hosts": page}
    if start + 2 < len(hosts):
        out["cursor"] = str(start + 2)
    return json.dumps(out).encode()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", required=True)
    parser.add_argument("--hosts", default="")
    args = parser.parse_args()
    hosts = [(h.split("=")[0], int(h.split("=")[1])) for h in args.hosts.split(",") if h]

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a: object) -> None:
            pass

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            cursor = parse_qs(url.query).get("cursor", [""])[0]
            if url.path == "/control/count":
                body = json.dumps({"count": _count[0]}).encode()
            elif url.path == "/control/cursors":
                body = json.dumps({"cursors": _cursors}).encode()
            elif url.path == "/xrpc/com.atproto.server.describeServer":
                body = json.dumps({"did": "did:web:hostile.example", "availableUserDomains": []}).encode()
            elif url.path in ("/xrpc/com.atproto.sync.listRepos", "/xrpc/com.atproto.sync.listHosts"):
                with _lock:
                    _count[0] += 1
                    _cursors.append(cursor)
                body = _page(args.mode, cursor, hosts)
            else:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(json.dumps({"port": server.server_address[1]}), flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
