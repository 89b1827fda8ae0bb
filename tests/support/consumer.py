"""Read the relay's firehose from a test: decoded frames with their relay seq (websocket-client)."""

from __future__ import annotations

import time
from typing import Any

import libipld
import websocket


def collect(
    ws_url: str, *, cursor: int | None = 0, count: int, timeout: float = 30.0
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Up to ``count`` (header, body) pairs from subscribeRepos, or what came before ``timeout``."""
    query = "" if cursor is None else f"?cursor={cursor}"
    ws = websocket.create_connection(f"{ws_url}/xrpc/com.atproto.sync.subscribeRepos{query}", timeout=timeout)
    out: list[tuple[dict[str, Any], dict[str, Any]]] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < count and time.monotonic() < deadline:
            ws.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                # control frames come back too, so a server that pings an idle consumer cannot keep
                # this loop waiting past its deadline
                opcode, frame = ws.recv_data_frame(control_frame=True)
            except (websocket.WebSocketTimeoutException, websocket.WebSocketConnectionClosedException):
                break
            if opcode != websocket.ABNF.OPCODE_BINARY:
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    break
                continue
            data = frame.data
            if not data:
                break
            header, body = libipld.decode_dag_cbor_multi(data)
            out.append((header, body))
    finally:
        ws.close()
    return out
