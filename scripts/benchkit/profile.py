"""Summaries of py-spy raw stacks of the relay: where its main thread and its ingest workers spend time."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROFILE_HZ = 200


@contextmanager
def py_spy_record(pid: int, path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``py-spy record`` of ``pid`` and its subprocesses (raw stacks to ``path``) while the block runs."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        raise SystemExit("--profile needs py-spy: .venv/bin/pip install -e '.[bench]'")
    profiler = subprocess.Popen(
        [py_spy, "record", "--pid", str(pid), "--format", "raw", "--rate", str(PROFILE_HZ),
         "--nonblocking", "--threads", "--subprocesses", "--output", str(path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(0.5)  # py-spy attaches; it gives no readiness signal to wait on
    try:
        yield profiler
    finally:
        profiler.send_signal(signal.SIGINT)
        try:
            profiler.wait(timeout=30)
        except subprocess.TimeoutExpired:
            profiler.kill()
            profiler.wait()


@dataclass
class Profile:
    """Samples of one role (the relay's main thread, the ingest workers' main threads)."""

    total: int = 0
    own: Counter[str] = field(default_factory=Counter)
    own_file: Counter[str] = field(default_factory=Counter)
    inclusive: Counter[str] = field(default_factory=Counter)

    def add(self, frames: list[str], count: int) -> None:
        self.total += count
        self.own[frames[-1]] += count
        self.own_file[frames[-1].rpartition(" (")[2].rstrip(")")] += count
        for frame in set(frames):
            self.inclusive[frame] += count


def read_profile(path: Path, relay_pid: int) -> tuple[Profile, Profile, Counter[str]]:
    """py-spy raw stacks (``--threads --subprocesses``) -> (relay main thread, workers' main threads, other threads).

    A line is ``[process P:"cmd";]... thread (T)[: name];frame;frame... count``; a process's main thread has T = P.
    """
    main, workers, others = Profile(), Profile(), Counter[str]()
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        parts = stack.split(";")
        pid = relay_pid
        while parts and parts[0].startswith("process "):
            pid = int(parts.pop(0).split()[1].split(":")[0])
        if not parts or not parts[0].startswith("thread ("):
            continue
        tid = int(parts[0][len("thread (") :].split(")")[0])
        frames = [_short_frame(f) for f in parts[1:]] or ["(no Python frame)"]
        if tid != pid:
            others[frames[-1]] += count
        elif pid == relay_pid:
            main.add(frames, count)
        else:
            workers.add(frames, count)
    return main, workers, others


def print_profile(path: Path, title: str, relay_pid: int, top: int = 20) -> None:
    """Where py-spy's samples fall: own samples per file and function, inclusive per function of ours."""
    main, workers, others = read_profile(path, relay_pid)
    if not main.total:
        print(f"profile: no samples of the relay's main thread in {path}")
        return
    header = f"(py-spy {PROFILE_HZ} Hz, busy samples only)"
    for name, prof in (
        ("the relay's main thread (every greenlet)", main),
        ("the ingest workers' main threads", workers),
    ):
        if not prof.total:
            continue
        print(f"== relay profile during {title}: {prof.total:,} samples of {name} {header} ==")
        print(f"  {'own %':>6}  file")
        for where, count in prof.own_file.most_common(top // 2):
            print(f"  {100 * count / prof.total:6.1f}  {where}")
        print(f"  {'own %':>6}  function")
        for frame, count in prof.own.most_common(top):
            print(f"  {100 * count / prof.total:6.1f}  {frame}")
        print(f"  {'incl %':>6}  function (inclusive, ours only)")
        mine = ("actors", "protocol", "store", "web")
        ours = [(f, c) for f, c in prof.inclusive.most_common() if any(f"({d}/" in f for d in mine)]
        for frame, count in ours[:top]:
            print(f"  {100 * count / prof.total:6.1f}  {frame}")
    busiest = ", ".join(f"{frame} {count}" for frame, count in others.most_common(3))
    print(f"  other threads: {sum(others.values()):,} samples ({busiest})")
    print(f"  raw stacks: {path}", flush=True)


def _short_frame(frame: str) -> str:
    """'fn (/abs/path/to/site-packages/pkg/mod.py:12)' -> 'fn (pkg/mod.py)'."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", f"{ROOT}/", "lib/python3"):
        if marker in where:
            where = where.split(marker, 1)[1]
            break
    return f"{name} ({where})"
