"""The wire between the relay process and its ingest worker processes: framed DAG-CBOR messages.

Over a local socket pair, each message is a 4-byte big-endian length and a DAG-CBOR list
``[kind, payload]``. Worker -> relay: ``events`` (batches of verified events with their
account state), ``traces`` (timings of a coming batch's sampled events, see ``actors.tracing``),
``cursors`` (upstream progress), ``moved`` (DIDs dropped as ``wrong_host``, for the
spider), ``tree`` (a reply). Relay -> worker:
``start_host``, ``stop_host``, ``get_tree``, ``quit``, and the control plane's
(``actors.messages_control``): ``restart_host`` (hostname), ``host_limits`` ([hostname,
account limit, events/s]), ``forget_account`` (did). A worker re-reads all such state from
SQL when it starts, so a change sent while a worker is down is not lost. Socket backpressure is the flow control: the
relay stops reading a worker while its sequencer is full, the worker's sends then block,
and its subscribers stop reading their hosts.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import libipld

from actors.accounts import AccountState
from actors.messages import AdvanceCursor, PersistEvent

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_BATCH_EVENTS = 256  # events in one ``events`` message at most (the relay sizes its inbox bound by it)
_LEN = struct.Struct("!I")


class LinkClosed(Exception):
    """The other side of the link went away."""


def send_message(sock: socket.socket, kind: str, payload: Any) -> None:
    data = bytes(libipld.encode_dag_cbor([kind, payload]))
    sock.sendall(_LEN.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise LinkClosed("link closed")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv_message(sock: socket.socket) -> tuple[str, Any]:
    (length,) = _LEN.unpack(_recv_exact(sock, 4))
    if length > MAX_MESSAGE_BYTES:
        raise LinkClosed(f"message of {length} bytes is over the link limit")
    kind, payload = libipld.decode_dag_cbor(_recv_exact(sock, length))
    return str(kind), payload


def _account_out(a: AccountState | None) -> list[Any] | None:
    if a is None:
        return None
    return [a.did, a.host_id, a.status, a.upstream_status, a.rev, a.commit_cid, a.data_cid, a.needs_resync]


def _account_in(v: list[Any] | None) -> AccountState | None:
    if v is None:
        return None
    return AccountState(v[0], v[1], v[2], v[3], v[4], v[5], v[6], bool(v[7]))


def encode_events(events: list[PersistEvent]) -> list[list[Any]]:
    return [[e.host_id, e.upstream_seq, e.kind, e.frame, _account_out(e.account), e.received_at] for e in events]


def decode_events(payload: list[list[Any]]) -> list[PersistEvent]:
    return [PersistEvent(int(h), int(s), str(k), bytes(f), _account_in(a), float(t)) for h, s, k, f, a, t in payload]


def encode_cursors(cursors: list[AdvanceCursor]) -> list[list[int]]:
    return [[c.host_id, c.upstream_seq, int(c.reset)] for c in cursors]


def decode_cursors(payload: list[list[int]]) -> list[AdvanceCursor]:
    return [AdvanceCursor(int(h), int(s), bool(r)) for h, s, r in payload]
