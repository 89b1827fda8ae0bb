"""Coverage-guided fuzzing (atheris) of every parser that reads upstream or client bytes, for a bounded time.

    pip install -e '.[fuzz]'                       # atheris: Linux x86-64 wheels, else clang to build
    python scripts/fuzz.py --seconds 120           # every target, 120 s each, one after another
    python scripts/fuzz.py --target car --target frames --seconds 600
    python scripts/fuzz.py --target car --reproduce .fuzz/car/crash-...   # rerun one input, show the error
    python scripts/fuzz.py --list

Targets (``tests/support/fuzz_targets.py``, ``tests/support/fuzz_xrpc.py``): frames, frame_fields
(recorded frames with fields of the wrong type), cbor (the
libipld wrappers), dagcbor (the strict codec), car, mst_node, commit, did_document, repo (getRepo
and getRecord CARs), mst_tree (linked block sets: repo verification and MST inversion) and xrpc
(query strings and requestCrawl bodies through the Flask app). A finding is any exception
other than the parser's documented errors, or a broken round trip.

Each target runs in its own process under libFuzzer for ``--seconds``, seeded from the test
vectors and the recorded reference-PDS fixtures; its corpus grows in ``OUT/<target>/corpus``
(default OUT: ``.fuzz/``, ignored by git) and an input that fails is written to
``OUT/<target>/crash-*``. Prints one line per target (executions, coverage, new inputs, or
the failure) and exits 1 if any target failed.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a script: make the repo's packages importable

TARGET_NAMES = (
    "frames",
    "frame_fields",
    "cbor",
    "dagcbor",
    "car",
    "mst_node",
    "commit",
    "did_document",
    "repo",
    "mst_tree",
    "xrpc",
)
INSTRUMENTED = ["protocol", "actors", "store", "web", "tests.support"]
CHILD_GRACE_S = 120.0  # beyond --seconds: start-up, seeding and the final stats
RSS_LIMIT_MB = 2048
INPUT_TIMEOUT_S = 20  # one input taking longer is a finding (a hang)
MAX_INPUT_BYTES = 64 * 1024


def load_target(name: str, workdir: Path | None = None) -> tuple[Callable[[bytes], None], Callable[[], list[bytes]]]:
    """(run, seeds) of target ``name``; imports the code under test (instrumented when atheris is).

    ``workdir`` holds the xrpc target's databases (libFuzzer exits without Python's clean-up, so
    a temporary folder would be left behind); default: a temporary folder.
    """
    if name == "xrpc":
        from tests.support import fuzz_xrpc

        app = fuzz_xrpc.XrpcApp(workdir)
        return app.run, fuzz_xrpc.seeds
    from tests.support.fuzz_targets import TARGETS

    return TARGETS[name].run, TARGETS[name].seeds


def child(name: str, seconds: int, out: Path) -> None:
    """Fuzz one target in this process (libFuzzer exits the process when done or on a failure)."""
    import atheris

    workdir = out / name / "app"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    with atheris.instrument_imports(include=INSTRUMENTED):
        run, seeds = load_target(name, workdir)
    corpus = out / name / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for seed in seeds():
        (corpus / f"seed-{hashlib.sha1(seed).hexdigest()}").write_bytes(seed)
    args = [
        sys.argv[0],
        str(corpus),
        f"-max_total_time={seconds}",
        f"-artifact_prefix={out / name}/",
        f"-rss_limit_mb={RSS_LIMIT_MB}",
        f"-timeout={INPUT_TIMEOUT_S}",
        f"-max_len={MAX_INPUT_BYTES}",
        "-print_final_stats=1",
    ]
    atheris.Setup(args, run)
    atheris.Fuzz()


def summarize(name: str, status: int, output: str) -> tuple[bool, str]:
    """(failed, one line) from a child's libFuzzer output."""
    stats = dict(re.findall(r"stat::(\w+):\s*(\d+)", output))
    cov = re.findall(r"cov: (\d+)", output)
    corp = re.findall(r"corp: (\d+)", output)
    line = (
        f"{name}: {stats.get('number_of_executed_units', '?')} runs,"
        f" {stats.get('average_exec_per_sec', '?')}/s, cov {cov[-1] if cov else '?'},"
        f" corpus {corp[-1] if corp else '?'} ({stats.get('new_units_added', '?')} new)"
    )
    artifact = re.search(r"(?:Test unit written to|written to) (\S+)", output)
    failed = status != 0 or artifact is not None
    if not failed:
        return False, line + ", no failure"
    match = re.search(r"=== Uncaught Python exception: ===\n(.*?)\n\n", output, re.S)
    error = f"exit status {status} (see the log)"
    if match:
        lines = match.group(1).strip().splitlines()
        frames = [ln.strip() for ln in lines if ln.strip().startswith("File ")]
        error = lines[0] + (f"\n  at {frames[-1]}" if frames else "")
    where = artifact.group(1) if artifact else "no input written"
    return True, f"{line}\n  FAILED: {error}\n  input: {where}\n  (rerun: --target {name} --reproduce {where})"


def run_all(names: list[str], seconds: int, out: Path) -> int:
    failures = 0
    for name in names:
        started = time.monotonic()
        log = out / name / "last-run.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, __file__, "--child", name, "--seconds", str(seconds), "--out", str(out)]
        try:
            proc = subprocess.run(
                cmd, cwd=REPO_ROOT, capture_output=True, text=True, errors="replace", timeout=seconds + CHILD_GRACE_S
            )
            status, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            status, output = -1, f"{_text(exc.stdout)}{_text(exc.stderr)}\ntimed out"
        log.write_text(output)
        failed, line = summarize(name, status, output)
        failures += failed
        print(f"{line}  [{time.monotonic() - started:.0f} s, log {log}]", flush=True)
    print(f"{len(names)} targets, {failures} failed")
    return 1 if failures else 0


def _text(output: str | bytes | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def reproduce(name: str, path: Path) -> int:
    run, _ = load_target(name)
    try:
        run(path.read_bytes())
    except Exception:
        traceback.print_exc()
        return 1
    print(f"{name}: {path} passes")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=int, default=60, help="fuzzing time per target (default 60)")
    parser.add_argument("--target", action="append", choices=TARGET_NAMES, help="a target (repeatable; default all)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / ".fuzz", help="corpus and findings folder")
    parser.add_argument("--reproduce", type=Path, help="run one input through the (single) --target")
    parser.add_argument("--list", action="store_true", help="list the targets")
    parser.add_argument("--child", choices=TARGET_NAMES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(TARGET_NAMES))
        return 0
    if args.child:
        child(args.child, args.seconds, args.out.resolve())
        return 0
    if args.reproduce:
        if not args.target or len(args.target) != 1:
            parser.error("--reproduce needs exactly one --target")
        return reproduce(args.target[0], args.reproduce)
    return run_all(args.target or list(TARGET_NAMES), args.seconds, args.out.resolve())


if __name__ == "__main__":
    sys.exit(main())
