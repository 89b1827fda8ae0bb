"""Length-prefixed frame batches for the frame host's control API (no gevent: safe to import anywhere)."""

from __future__ import annotations

import struct


def pack_frames(frames: list[bytes]) -> bytes:
    return b"".join(struct.pack("!I", len(f)) + f for f in frames)


def split_frames(body: bytes) -> list[bytes]:
    out = []
    pos = 0
    while pos < len(body):
        (n,) = struct.unpack_from("!I", body, pos)
        out.append(body[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return out
