"""What a copy of a repo at an older rev lacks of the current head: the blocks of getRepo with ``since``."""

from __future__ import annotations

from collections.abc import Mapping

from protocol.cid import cid_to_str
from protocol.commit import decode_commit
from protocol.errors import MissingBlock
from protocol.mst_node import parse_node
from store.carstore import RepoHead


def changed_blocks(newer: Mapping[bytes, bytes], head: RepoHead, since: str) -> dict[bytes, bytes]:
    """What a copy of the repo at rev ``since`` lacks of ``head``: the ``newer`` blocks the head reaches through them.

    ``newer`` holds the blocks of the slices after ``since``. Every commit's slice carries each
    MST node that was not in the tree before that commit (the firehose's commit events must, for
    their ops to invert) and each record it writes. So a node reachable from the head but in no
    newer slice has been in the tree, unchanged, since ``since``, and with it its whole subtree:
    the walk does not descend into it. Only the changed part of the tree is read; nothing the
    head does not reach is returned. ``MissingBlock`` when the head is newer than ``since`` but
    its commit is not among ``newer`` (a compaction or replace raced the read).
    """
    out: dict[bytes, bytes] = {}
    commit_block = newer.get(head.commit_cid)
    if commit_block is None:
        if head.rev > since:
            raise MissingBlock(f"commit {cid_to_str(head.commit_cid)} is not among the blocks after {since}")
        return out
    out[head.commit_cid] = commit_block
    # (cid, is an MST node), visited in the carstore's canonical order: a node, its left
    # subtree, then for each entry its record and the subtree to its right
    stack: list[tuple[bytes | None, bool]] = [(decode_commit(commit_block).data, True)]
    while stack:
        cid, is_node = stack.pop()
        block = newer.get(cid) if cid is not None else None
        if cid is None or block is None or cid in out:
            continue
        out[cid] = block
        if is_node:
            left, _, entries, _ = parse_node(block)
            after = [(left, True)]
            for entry in entries:
                after += [(entry["v"], False), (entry["t"], True)]
            stack.extend(reversed(after))
    return out
