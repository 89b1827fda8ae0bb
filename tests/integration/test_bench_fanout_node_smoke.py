"""`scripts/bench_fanout_node.py --quick` runs end to end: exit 0 and one line of figures per run.

No timing thresholds: the figures depend on the machine; what must hold anywhere is that the
benchmark completes (every consumer got every event: it waits for each frame) and prints its table.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_fanout_node_quick() -> None:
    proc = subprocess.Popen(
        [sys.executable, "scripts/bench_fanout_node.py", "--quick"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # it stops its subprocesses on the way out
        out, _ = proc.communicate(timeout=30)
        pytest.fail(f"bench_fanout_node --quick did not finish in 180 s:\n{out}")
    assert proc.returncode == 0, out
    rows = [line.split() for line in out.splitlines() if line.strip().split(" ")[0].isdigit()]
    assert [(r[0], r[1]) for r in rows] == [("10", "paced"), ("10", "max"), ("50", "paced"), ("50", "max")], out
    assert all(r[-1] == "KiB" for r in rows), out
