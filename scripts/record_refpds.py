"""Record fixtures from the reference PDS: firehose frames, DID documents, PLC audit logs, repo CARs.

    python scripts/record_refpds.py [OUT_DIR]      # default: a new temp dir, printed at the end

Starts a PLC and one reference PDS on loopback (tests/interop/refpds.py), subscribes to the PDS's
firehose from cursor 0, then runs a fixed scenario: three accounts; record creates (one commit of
three at once), an update and a delete; a handle change; deactivate and activate; a takedown and its
reversal; an account deletion. It writes to OUT_DIR:

- ``pds-firehose-frames.jsonl``: every frame as a live subscriber received it, one a line:
  ``{"seq", "t", "did", "frame_b64"}`` (base64 of the raw websocket message);
- ``pds-firehose-replay.jsonl``: the same firehose read again from cursor 0 at the end, as a late
  subscriber sees it (the deleted account's earlier frames are purged: seq gaps);
- ``did-docs.json`` and ``plc-audit-logs.json`` from the local PLC, by DID;
- ``repo-<did with : as _>.car`` (``getRepo``) of every account still there;
- ``manifest.json``: the PDS version and URL, the accounts and the scenario's steps with their seqs.

Keys are throwaway. The tests read the recording committed in ``tests/fixtures/refpds/``; to replace
it, record into that folder and run the tests that read it (``grep -rl REFPDS tests/``).
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import websocket

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a script: make the repo's packages importable

from protocol.frames import split_frame  # noqa: E402
from tests.interop.refpds import ReferenceNetwork, XrpcError, post  # noqa: E402

WAIT_TIMEOUT_S = 30.0
RECV_TIMEOUT_S = 1.0  # how often the live reader checks whether it should stop
POST = "app.bsky.feed.post"
PROFILE = "app.bsky.actor.profile"


def recv_frame(ws: websocket.WebSocket) -> bytes:
    """The next firehose message; a text message breaks the protocol."""
    raw = ws.recv()
    if not isinstance(raw, bytes):
        raise ValueError(f"firehose sent a text message: {raw[:200]!r}")
    return raw


def frame_line(raw: bytes) -> dict[str, Any]:
    """One JSONL row for a raw frame: its seq, type and DID, and the frame itself in base64."""
    header, body = split_frame(raw)
    return {
        "seq": body.get("seq"),
        "t": header.get("t"),
        "did": body.get("did", body.get("repo")),
        "frame_b64": base64.b64encode(raw).decode(),
    }


class FirehoseTap:
    """Reads a firehose on a thread; keeps every frame as a JSONL row, and its body for matching."""

    def __init__(self, url: str) -> None:
        self.rows: list[dict[str, Any]] = []
        self._bodies: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._ws = websocket.create_connection(url, timeout=RECV_TIMEOUT_S)
        self._thread = threading.Thread(target=self._read, name="firehose-tap", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                raw = recv_frame(self._ws)
            except websocket.WebSocketTimeoutException:
                continue
            except websocket.WebSocketConnectionClosedException:
                return
            _, body = split_frame(raw)
            with self._changed:
                self.rows.append(frame_line(raw))
                self._bodies.append(body)
                self._changed.notify_all()

    def last_seq(self) -> int:
        with self._changed:
            return max((row["seq"] for row in self.rows), default=0)

    def seqs_after(self, seq: int) -> list[int]:
        with self._changed:
            return [row["seq"] for row in self.rows if row["seq"] > seq]

    def wait_for(self, t: str, did: str, after_seq: int, **fields: Any) -> None:
        """Wait until a frame after ``after_seq``, of type ``t``, for ``did``, with ``fields``, arrived."""

        def seen() -> bool:
            return any(
                row["seq"] > after_seq
                and row["t"] == t
                and row["did"] == did
                and all(body.get(k) == v for k, v in fields.items())
                for row, body in zip(self.rows, self._bodies, strict=True)
            )

        with self._changed:
            if not self._changed.wait_for(seen, timeout=WAIT_TIMEOUT_S):
                raise TimeoutError(f"no {t} {fields} frame for {did} within {WAIT_TIMEOUT_S} s")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=RECV_TIMEOUT_S + 5)
        self._ws.close()


def replay(url: str, until_seq: int) -> list[dict[str, Any]]:
    """Read the firehose from cursor 0 until ``until_seq`` (or until it has been quiet a while)."""
    rows: list[dict[str, Any]] = []
    ws = websocket.create_connection(url, timeout=WAIT_TIMEOUT_S)
    try:
        while True:
            try:
                row = frame_line(recv_frame(ws))
            except websocket.WebSocketTimeoutException:
                print(f"replay: quiet before seq {until_seq}; stopping at {len(rows)} frames", file=sys.stderr)
                return rows
            rows.append(row)
            if row["seq"] >= until_seq:
                return rows
    finally:
        ws.close()


def run_scenario(net: ReferenceNetwork, tap: FirehoseTap) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """Drive the PDS through the scenario; return ({did: first handle}, steps).

    Each step waits for the last frame it causes (a write: its one #commit), so the frames after
    the previous step are exactly this step's: their seqs go into the step's ``seqs``.
    """
    pds = net.pds_urls[0]
    steps: list[dict[str, Any]] = []

    def done(name: str, did: str, before: int, t: str, **fields: Any) -> None:
        """Wait for the step's last frame (type ``t`` with ``fields``); note the step's seqs."""
        tap.wait_for(t, did, before, **fields)
        steps.append({"step": name, "did": did, "seqs": tap.seqs_after(before)})
        print(f"step: {name} {did} -> seqs {steps[-1]['seqs']}", file=sys.stderr)

    def act(name: str, did: str, action: Callable[[], Any], t: str, **fields: Any) -> Any:
        before = tap.last_seq()
        result = action()
        done(name, did, before, t, **fields)
        return result

    handles: dict[str, str] = {}
    for handle in ("u0-fx.test", "u1-fx.test", "u2-fx.test"):
        before = tap.last_seq()
        did, _ = net.create_account(pds, handle)
        handles[did] = handle
        done(f"create account {handle}", did, before, "#sync")  # #identity, #account, #commit, #sync
    u0, u1, u2 = handles

    posts: dict[str, list[str]] = {did: [] for did in handles}
    for did, count in ((u0, 3), (u1, 2), (u2, 1)):
        for i in range(count):
            record = post(f"post {i} of {handles[did]}")
            out = act(f"create post {i}", did, partial(net.create_record, did, POST, record), "#commit")
            posts[did].append(out["uri"].rsplit("/", 1)[1])
    profile = {"$type": PROFILE, "displayName": "u0"}
    act("create profile (putRecord)", u0, lambda: net.put_record(u0, PROFILE, "self", profile), "#commit")
    renamed = {**profile, "displayName": "u0, renamed"}
    act("update profile (putRecord)", u0, lambda: net.put_record(u0, PROFILE, "self", renamed), "#commit")
    act("delete post 1", u0, lambda: net.delete_record(u0, POST, posts[u0][1]), "#commit")
    batch = [post(f"batch post {i} of {handles[u1]}") for i in range(3)]
    act("create three posts in one commit (applyWrites)", u1, lambda: net.create_records(u1, POST, batch), "#commit")

    act("update handle", u0, lambda: net.update_handle(u0, "renamed-fx.test"), "#identity", handle="renamed-fx.test")
    act("deactivate", u1, lambda: net.deactivate(u1), "#account", status="deactivated")
    act("activate", u1, lambda: net.activate(u1), "#sync")  # #account, #identity, #sync
    act("takedown", u0, lambda: net.takedown(u0, True), "#account", status="takendown")
    act("reverse takedown", u0, lambda: net.takedown(u0, False), "#account", active=True)
    act("delete account", u2, lambda: net.delete_account(u2), "#account", status="deleted")
    return handles, steps


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=1) + "\n")


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row, separators=(",", ":")) + "\n" for row in rows))


def record(out: Path) -> None:
    """Run the scenario against a fresh reference network and write the fixtures into ``out``."""
    started = time.monotonic()
    with ReferenceNetwork(pds_count=1) as net:
        pds_url = net.pds_urls[0]
        print(f"network ready in {time.monotonic() - started:.1f} s: {pds_url}", file=sys.stderr)
        tap = FirehoseTap(net.firehose_url(pds_url, cursor=0))
        try:
            handles, steps = run_scenario(net, tap)
        finally:
            tap.close()
        live = sorted(tap.rows, key=lambda row: row["seq"])
        replayed = replay(net.firehose_url(pds_url, cursor=0), live[-1]["seq"])
        did_docs: dict[str, Any] = {}
        audit_logs: dict[str, Any] = {}
        for did in handles:
            did_docs[did] = net.did_doc(did)
            audit_logs[did] = net.plc_audit_log(did)
            try:
                car = net.get_repo(pds_url, did)
            except XrpcError as exc:  # the deleted account has no repo left
                print(f"no repo for {did}: {exc}", file=sys.stderr)
                continue
            (out / f"repo-{did.replace(':', '_')}.car").write_bytes(car)
        assert net.modules_dir is not None
        pds_package = json.loads((net.modules_dir / "node_modules/@atproto/pds/package.json").read_text())

    write_jsonl(out / "pds-firehose-frames.jsonl", live)
    write_jsonl(out / "pds-firehose-replay.jsonl", replayed)
    write_json(out / "did-docs.json", did_docs)
    write_json(out / "plc-audit-logs.json", audit_logs)
    write_json(
        out / "manifest.json",
        {"pds": f"@atproto/pds {pds_package['version']}", "pds_url": pds_url, "accounts": handles, "steps": steps},
    )
    print(
        f"recorded {len(live)} live and {len(replayed)} replayed frames into {out}"
        f" in {time.monotonic() - started:.1f} s",
        file=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("out_dir", nargs="?", type=Path, help="output folder (default: a new temp dir)")
    args = parser.parse_args(argv)
    out: Path = args.out_dir or Path(tempfile.mkdtemp(prefix="skyrelay-refpds-fixtures-"))
    out.mkdir(parents=True, exist_ok=True)
    record(out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
