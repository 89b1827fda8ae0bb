"""`scripts/bench_ingest.py --quick` runs end to end: exit 0, every figure printed, no commit lost.

No timing thresholds: the figures depend on the machine. What must hold anywhere is that the
benchmark completes, prints its table, and that every commit released upstream came out of
the relay to every consumer (nothing dropped, nobody cut, every latency sample matched).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
FIGURE_LINES = (
    "verified commits/s",
    "delivered commits/s",
    "relay CPU",
    "relay peak RSS",
    "ingest-to-durable",
    "CPU by process",
    "achieved rate",
    "p50 ingest-to-delivery",
    "p99 ingest-to-delivery",
    "p99 to slowest consumer",
)


@pytest.mark.slow
def test_bench_ingest_quick(tmp_path: Path) -> None:
    figures_path = tmp_path / "figures.json"
    proc = subprocess.Popen(
        [sys.executable, "scripts/bench_ingest.py", "--quick", "--json", str(figures_path)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: on a timeout, stop it and everything it started
    )
    try:
        out, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the benchmark stops its subprocesses on SIGTERM
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        pytest.fail(f"bench_ingest --quick did not finish in 180 s:\n{out}")
    assert proc.returncode == 0, out

    labels = {line.strip().split("  ")[0] for line in out.splitlines() if line.startswith("  ")}
    missing = [label for label in FIGURE_LINES if label not in labels]
    assert not missing, f"figure lines missing: {missing}\n{out}"
    assert "== (a) max throughput" in out and "== (b) latency" in out, out

    figures = json.loads(figures_path.read_text())
    throughput, latency = figures["max throughput"], figures["latency"]
    assert throughput["dropped"] == 0 and latency["dropped"] == 0, out
    assert throughput["consumers_closed"] == 0 and latency["consumers_closed"] == 0, out
    samples = latency["latency"]
    assert samples["frames"] == samples["sent"] == latency["events"], samples  # every sent commit came back
    assert samples["unmatched"] == 0, samples
    assert samples["deliveries"] == samples["frames"] * 3, samples  # --quick: 3 consumers, each got every commit
    assert throughput["peak_rss_kib"] > 0
