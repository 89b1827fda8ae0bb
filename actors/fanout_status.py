"""What a fan-out node knows of its upstream: connection state (for the web layer), base URL, newest seq."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request


class UpstreamStatus:
    """What the web layer reads of the upstream connection (written by the actor's greenlets only)."""

    def __init__(self) -> None:
        self.connected = False
        self.down_since: float | None = time.monotonic()  # monotonic time the connection went down
        self.last_seq = 0  # newest durable seq in the node's log
        self.upstream_seq: int | None = None  # the upstream's newest seq, from its /xrpc/_health

    def down_for(self) -> float:
        return 0.0 if self.down_since is None else time.monotonic() - self.down_since


def http_base(ws_url: str) -> str:
    """``ws(s)://host`` -> ``http(s)://host`` (the upstream's XRPC base)."""
    scheme, sep, rest = ws_url.partition("://")
    return ("https" if scheme == "wss" else "http") + sep + rest.rstrip("/")


def fetch_head(url: str, timeout: float) -> int | None:
    """The upstream's newest seq from its health answer, or None (unreachable, or no ``seq`` there)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = json.loads(resp.read(65536) or b"null")
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read(65536) or b"null")
        except ValueError:
            return None
    except (OSError, ValueError):
        return None
    seq = body.get("seq") if isinstance(body, dict) else None
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None
