"""Firehose frames: header + body DAG-CBOR into typed events, and typed events back to bytes.

A frame is two concatenated DAG-CBOR objects. Header ``{"op": 1, "t": "#commit"}`` is a
message; ``{"op": -1}`` is an error frame whose body is ``{"error", "message"}``. Bodies are
checked field by field (types, lengths); an unknown ``t`` raises ``UnknownFrameType`` so the
caller can count it. CIDs are binary bytes (see ``protocol.cid``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import libipld

from protocol.errors import CborError, FrameError, FrameTooLarge, UnknownFrameType

MAX_FRAME_BYTES = 5 * 1024 * 1024
ACTIONS = frozenset(("create", "update", "delete"))


@dataclass(frozen=True, slots=True)
class RepoOp:
    action: str
    path: str
    cid: bytes | None
    prev: bytes | None = None


@dataclass(frozen=True, slots=True)
class CommitEvent:
    seq: int
    repo: str
    commit: bytes
    rev: str
    since: str | None
    blocks: bytes
    ops: tuple[RepoOp, ...]
    blobs: tuple[bytes, ...]
    time: str
    prev_data: bytes | None = None
    too_big: bool = False
    rebase: bool = False

    @property
    def did(self) -> str:
        return self.repo


@dataclass(frozen=True, slots=True)
class SyncEvent:
    seq: int
    did: str
    blocks: bytes
    rev: str
    time: str


@dataclass(frozen=True, slots=True)
class IdentityEvent:
    seq: int
    did: str
    time: str
    handle: str | None = None


@dataclass(frozen=True, slots=True)
class AccountEvent:
    seq: int
    did: str
    time: str
    active: bool
    status: str | None = None


@dataclass(frozen=True, slots=True)
class InfoEvent:
    name: str
    message: str | None = None


@dataclass(frozen=True, slots=True)
class ErrorFrame:
    error: str
    message: str | None = None


RepoEvent = CommitEvent | SyncEvent | IdentityEvent | AccountEvent
Event = RepoEvent | InfoEvent | ErrorFrame

_TYPE_OF = {CommitEvent: "#commit", SyncEvent: "#sync", IdentityEvent: "#identity", AccountEvent: "#account"}


def _str(body: dict[str, Any], key: str, max_len: int = 8192) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise FrameError(f"field {key!r} must be a non-empty string", reason="bad_field")
    return value


def _opt_str(body: dict[str, Any], key: str, max_len: int = 8192) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > max_len:
        raise FrameError(f"field {key!r} must be a string or null", reason="bad_field")
    return value


def _int(body: dict[str, Any], key: str) -> int:
    value = body.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise FrameError(f"field {key!r} must be a non-negative integer", reason="bad_field")
    return value


def _cid(value: Any, key: str) -> bytes:
    if not isinstance(value, bytes) or not 4 < len(value) <= 128 or value[0] != 1:
        raise FrameError(f"field {key!r} must be a CID link", reason="bad_field")
    return value


def _opt_cid(value: Any, key: str) -> bytes | None:
    return None if value is None else _cid(value, key)


def _did(body: dict[str, Any], key: str) -> str:
    did = _str(body, key, 2048)
    if not did.startswith("did:"):
        raise FrameError(f"field {key!r} is not a DID", reason="bad_did")
    return did


def _bool(body: dict[str, Any], key: str, default: bool | None = None) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise FrameError(f"field {key!r} must be a boolean", reason="bad_field")
    return value


def _ops(raw: Any, max_ops: int) -> tuple[RepoOp, ...]:
    if not isinstance(raw, list):
        raise FrameError("ops must be a list", reason="bad_field")
    if len(raw) > max_ops:
        raise FrameTooLarge(f"{len(raw)} ops exceed {max_ops}", reason="too_many_ops")
    out = []
    for op in raw:
        if not isinstance(op, dict):
            raise FrameError("op must be a map", reason="bad_field")
        action = op.get("action")
        if not isinstance(action, str) or action not in ACTIONS:  # a list or map is unhashable
            raise FrameError(f"unknown op action {action!r}", reason="bad_field")
        path = _str(op, "path", 1024)
        cid = _opt_cid(op.get("cid"), "ops.cid")
        prev = _opt_cid(op.get("prev"), "ops.prev")
        if (cid is None) != (action == "delete"):
            raise FrameError("op cid must be null exactly for deletes", reason="bad_field")
        out.append(RepoOp(action, path, cid, prev))
    return tuple(out)


def _blocks(body: dict[str, Any]) -> bytes:
    value = body.get("blocks")
    if not isinstance(value, bytes):
        raise FrameError("field 'blocks' must be bytes", reason="bad_field")
    return value


def parse_body(kind: str, body: dict[str, Any], *, max_ops: int = 200) -> Event:
    """Turn a decoded message body of type ``kind`` into its typed event."""
    if kind == "#commit":
        blobs = body.get("blobs", [])
        if not isinstance(blobs, list):
            raise FrameError("blobs must be a list", reason="bad_field")
        return CommitEvent(
            seq=_int(body, "seq"),
            repo=_did(body, "repo"),
            commit=_cid(body.get("commit"), "commit"),
            rev=_str(body, "rev", 64),
            since=_opt_str(body, "since", 64),
            blocks=_blocks(body),
            ops=_ops(body.get("ops"), max_ops),
            blobs=tuple(_cid(b, "blobs") for b in blobs),
            time=_str(body, "time", 64),
            prev_data=_opt_cid(body.get("prevData"), "prevData"),
            too_big=_bool(body, "tooBig", False),
            rebase=_bool(body, "rebase", False),
        )
    if kind == "#sync":
        return SyncEvent(
            seq=_int(body, "seq"),
            did=_did(body, "did"),
            blocks=_blocks(body),
            rev=_str(body, "rev", 64),
            time=_str(body, "time", 64),
        )
    if kind == "#identity":
        return IdentityEvent(
            seq=_int(body, "seq"), did=_did(body, "did"), time=_str(body, "time", 64), handle=_opt_str(body, "handle")
        )
    if kind == "#account":
        status = _opt_str(body, "status", 64)
        return AccountEvent(
            seq=_int(body, "seq"),
            did=_did(body, "did"),
            time=_str(body, "time", 64),
            active=_bool(body, "active"),
            status=status,
        )
    if kind == "#info":
        return InfoEvent(name=_str(body, "name", 256), message=_opt_str(body, "message"))
    raise UnknownFrameType(f"unknown message type {kind!r}")


def split_frame(data: bytes, *, max_bytes: int = MAX_FRAME_BYTES) -> tuple[dict[str, Any], dict[str, Any]]:
    """Decode a frame into its (header, body) maps, checking only their outer shape."""
    if len(data) > max_bytes:
        raise FrameTooLarge(f"frame of {len(data)} bytes exceeds {max_bytes}")
    try:
        parts = libipld.decode_dag_cbor_multi(data)
    except (ValueError, RecursionError, TypeError, OverflowError) as exc:
        raise FrameError(f"frame is not DAG-CBOR: {exc}", reason="bad_cbor") from None
    if len(parts) != 2 or not isinstance(parts[0], dict) or not isinstance(parts[1], dict):
        raise FrameError("frame must be a header map followed by a body map", reason="bad_frame")
    return parts[0], parts[1]


def decode_frame(data: bytes, *, max_bytes: int = MAX_FRAME_BYTES, max_ops: int = 200) -> Event:
    """Decode one firehose frame into a typed event (or ``ErrorFrame``)."""
    header, body = split_frame(data, max_bytes=max_bytes)
    op = header.get("op")
    if op == -1:
        return ErrorFrame(error=_str(body, "error", 256), message=_opt_str(body, "message"))
    if op != 1:
        raise FrameError(f"unknown frame op {op!r}", reason="bad_header")
    kind = header.get("t")
    if not isinstance(kind, str):
        raise FrameError("frame header has no type", reason="bad_header")
    return parse_body(kind, body, max_ops=max_ops)


def _peek_body(data: bytes) -> dict[str, Any] | None:
    """The body map of an untyped frame, or None; never raises (best effort, whatever the decoder raised)."""
    try:
        parts = libipld.decode_dag_cbor_multi(data)
    except Exception:  # not DAG-CBOR at all
        return None
    return parts[1] if len(parts) == 2 and isinstance(parts[1], dict) else None


def peek_seq(data: bytes) -> int | None:
    """The ``seq`` of a frame that failed typed parsing, when its body still has a plain one."""
    body = _peek_body(data)
    seq = body.get("seq") if body is not None else None
    return seq if isinstance(seq, int) and not isinstance(seq, bool) and 0 < seq < 2**63 else None


def peek_did(data: bytes) -> str | None:
    """The account a frame not yet parsed is about (its body's ``repo`` or ``did``), or None; never raises."""
    body = _peek_body(data)
    did = body.get("repo") or body.get("did") if body is not None else None
    return did if isinstance(did, str) and did.startswith("did:") and len(did) <= 2048 else None


def event_type(event: Event) -> str:
    return _TYPE_OF.get(type(event), "#info")


def event_body(event: Event, seq: int | None = None) -> dict[str, Any]:
    """The wire body of ``event``; ``seq`` replaces the event's own sequence number."""
    if isinstance(event, CommitEvent):
        ops = []
        for op in event.ops:
            item: dict[str, Any] = {"action": op.action, "path": op.path, "cid": op.cid}
            if op.prev is not None:
                item["prev"] = op.prev
            ops.append(item)
        body: dict[str, Any] = {
            "seq": event.seq if seq is None else seq,
            "repo": event.repo,
            "commit": event.commit,
            "rev": event.rev,
            "since": event.since,
            "blocks": event.blocks,
            "ops": ops,
            "blobs": list(event.blobs),
            "time": event.time,
            "tooBig": event.too_big,
            "rebase": event.rebase,
        }
        if event.prev_data is not None:
            body["prevData"] = event.prev_data
        return body
    if isinstance(event, SyncEvent):
        return {"seq": event.seq if seq is None else seq, "did": event.did, "blocks": event.blocks,
                "rev": event.rev, "time": event.time}  # fmt: skip
    if isinstance(event, IdentityEvent):
        body = {"seq": event.seq if seq is None else seq, "did": event.did, "time": event.time}
        if event.handle is not None:
            body["handle"] = event.handle
        return body
    if isinstance(event, AccountEvent):
        body = {"seq": event.seq if seq is None else seq, "did": event.did, "time": event.time,
                "active": event.active}  # fmt: skip
        if event.status is not None:
            body["status"] = event.status
        return body
    if isinstance(event, InfoEvent):
        return {"name": event.name, **({"message": event.message} if event.message is not None else {})}
    return {"error": event.error, **({"message": event.message} if event.message is not None else {})}


def encode_frame(event: Event, seq: int | None = None) -> bytes:
    """Encode ``event`` as a frame (header + body), optionally with a new ``seq``."""
    header: dict[str, Any] = {"op": -1} if isinstance(event, ErrorFrame) else {"op": 1, "t": event_type(event)}
    try:
        return libipld.encode_dag_cbor(header) + libipld.encode_dag_cbor(event_body(event, seq))
    except (ValueError, TypeError, OverflowError) as exc:  # pragma: no cover - typed input
        raise CborError(f"cannot encode frame: {exc}") from None


def resequence(frame: bytes, seq: int) -> bytes:
    """``frame`` (one this relay encoded) with its body's ``seq`` replaced.

    Only for frames built by ``encode_frame``: re-encoding a decoded body is safe there because
    every byte string in a repo event body that parses as a CID is a link (``blocks`` is a CAR,
    which never parses as one). Never use it on arbitrary upstream bytes (see HACKING.md).
    """
    return resequenced(frame, seq)[0]


def resequenced(frame: bytes, seq: int) -> tuple[bytes, dict[str, Any]]:
    """``resequence`` that also returns the decoded body (with the new seq): one decode serves both."""
    try:
        header, body = libipld.decode_dag_cbor_multi(frame)
    except (ValueError, RecursionError, TypeError) as exc:
        raise FrameError(f"cannot resequence: {exc}", reason="bad_cbor") from None
    body["seq"] = seq
    return bytes(libipld.encode_dag_cbor(header)) + bytes(libipld.encode_dag_cbor(body)), body


def error_frame(error: str, message: str | None = None) -> bytes:
    return encode_frame(ErrorFrame(error, message))


def info_frame(name: str, message: str | None = None) -> bytes:
    return encode_frame(InfoEvent(name, message))
