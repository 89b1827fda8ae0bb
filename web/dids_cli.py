"""``skyrelay dids export|import``: DID lists through a running relay's admin API (standard library only).

``export`` streams ``GET /admin/dids/export`` to standard output. ``import FILE`` reads the file
line by line and uploads it in chunks to ``POST /admin/dids/import`` under a job name derived
from the file, after asking the relay how far that job already is: a second run, or a run
after a crash of either side, resumes at the first line the relay has not stored. Bad lines
are printed with their numbers; a progress line is drawn on a terminal; a summary ends it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from web.admin_cli import EXIT_REFUSED, EXIT_USAGE, AdminClient, Refused

CHUNK_LINES = 1000
CHUNK_BYTES = 512 * 1024  # under the relay's default request body limit (1 MiB)


def add_dids_parser(sub: Any) -> None:
    dids = sub.add_parser("dids", help="export or import a list of the relay's accounts (JSON lines)")
    dids.add_argument("--url", help="the relay's base URL (env SKYRELAY_ADMIN_URL; default http://127.0.0.1:2470)")
    dids.add_argument("--password", help="an admin password (env SKYRELAY_ADMIN_PASSWORD)")
    dids.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for one answer")
    acts = dids.add_subparsers(dest="action", metavar="ACTION", required=True)
    export = acts.add_parser("export", help="write every account as one JSON line to standard output")
    export.add_argument("--host", help="only accounts of this host")
    export.add_argument("--status", help="only accounts with this status (active, takendown, deactivated...)")
    imp = acts.add_parser("import", help="make the relay follow and backfill the accounts of a DID list")
    imp.add_argument("file", type=Path)
    imp.add_argument("--job", help="job name (default: from the file's name, size and first bytes)")


NDJSON = "application/x-ndjson"


def run_dids(args: argparse.Namespace) -> int:
    from config.admin_client import admin_client_config

    config = admin_client_config(args.url, args.password)
    if not config.password:
        print("skyrelay dids: no admin password: pass --password or set SKYRELAY_ADMIN_PASSWORD", file=sys.stderr)
        return EXIT_USAGE
    api = AdminClient(config.url, config.password.reveal(), args.timeout)
    try:
        if args.action == "export":
            query = {k: v for k, v in (("host", args.host), ("status", args.status)) if v}
            with api.open("GET", "/admin/dids/export", query=query) as resp:
                for line in resp:
                    sys.stdout.buffer.write(line)
            sys.stdout.flush()
            return 0
        return _import(api, args.file, args.job or job_name(args.file))
    except Refused as exc:
        print(f"skyrelay dids: {exc.error}: {exc.message}", file=sys.stderr)
        if args.action == "import":
            print("skyrelay dids: run the same import again to resume where it stopped", file=sys.stderr)
        return EXIT_REFUSED
    except OSError as exc:
        print(f"skyrelay dids: {exc}", file=sys.stderr)
        return EXIT_USAGE


def job_name(path: Path) -> str:
    """A name that is the same for the same file: its name, size and a hash of its first MiB."""
    with path.open("rb") as f:
        digest = hashlib.sha256(f.read(1024 * 1024)).hexdigest()[:16]
    return f"{path.name[:100]}-{path.stat().st_size}-{digest}"


def _chunks(f: IO[bytes], skip: int) -> Iterator[tuple[int, list[bytes]]]:
    """``(first line number, lines)`` of the file after its first ``skip`` lines, bounded in lines and bytes."""
    chunk: list[bytes] = []
    size, first = 0, skip + 1
    for number, raw in enumerate(f, start=1):
        if number <= skip:
            continue
        line = raw.rstrip(b"\r\n")
        if chunk and (len(chunk) >= CHUNK_LINES or size + len(line) > CHUNK_BYTES):
            yield first, chunk
            chunk, size, first = [], 0, number
        chunk.append(line[:8192])  # a line longer than that is bad anyway; the relay reports it
        size += min(len(line), 8192) + 1
    if chunk:
        yield first, chunk


def _import(api: AdminClient, path: Path, job: str) -> int:
    status = api.call("GET", "/admin/dids/import", query={"job": job})
    done = int(status["lines"])
    total = path.stat().st_size
    tty = sys.stderr.isatty()
    if done:
        print(f"skyrelay dids: resuming job {job} after line {done:,}", file=sys.stderr)
    result = status
    with path.open("rb") as f:
        for first, lines in _chunks(f, done):
            body = b"\n".join(lines) + b"\n"
            result = _post_chunk(api, {"job": job, "first_line": str(first)}, body)
            for bad in result.get("bad", []):
                print(f"\rline {bad['line']}: {bad['reason']}", file=sys.stderr)
            if tty:
                failed = sum(result["failed"].values())
                print(f"\r{100 * f.tell() // max(total, 1):3d}%  lines {result['lines']:,}  imported "
                      f"{result['imported']:,}  current {result['current']:,}  failed {failed:,}",
                      end="", file=sys.stderr, flush=True)  # fmt: skip
        lines_total = int(result["lines"])
    result = _post_chunk(api, {"job": job, "first_line": str(lines_total + 1), "final": "1"}, b"")
    if tty:
        print(file=sys.stderr)
    failed = ", ".join(f"{k} {v:,}" for k, v in sorted(result["failed"].items())) or "none"
    print(f"lines {result['lines']:,}: imported {result['imported']:,}, already current {result['current']:,}, "
          f"failed: {failed}")  # fmt: skip
    return 0


def _post_chunk(api: AdminClient, query: dict[str, str], body: bytes) -> Any:
    """One NDJSON chunk of the list; the job's progress as the relay answers it."""
    with api.open("POST", "/admin/dids/import", query=query, data=body, content_type=NDJSON) as resp:
        return json.loads(resp.read())
