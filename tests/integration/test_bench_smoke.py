"""The benchmarks' ``--quick`` modes run end to end: exit 0, every figure printed, no commit lost.

``scripts/bench_ingest.py`` (burst, synthetic repos) and ``scripts/bench_realistic.py`` (paced
traffic made by the reference implementation, which needs the reference PDS install of the
interop tests). No timing thresholds: the figures depend on the machine. What must hold anywhere
is that each benchmark completes, prints its table, and that every commit sent upstream came out
of the relay to every consumer (nothing dropped, nobody cut, every latency sample matched).
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


def run_quick(args: list[str], timeout: float) -> str:
    """Run a benchmark script to its end; its output (stdout and stderr). Fails the test on a timeout."""
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: on a timeout, stop it and everything it started
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the benchmark stops its subprocesses on SIGTERM
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        pytest.fail(f"{args[0]} did not finish in {timeout:.0f} s:\n{out}")
    assert proc.returncode == 0, out
    return str(out)


@pytest.mark.slow
def test_bench_ingest_quick(tmp_path: Path) -> None:
    figures_path = tmp_path / "figures.json"
    out = run_quick(["scripts/bench_ingest.py", "--quick", "--json", str(figures_path)], timeout=180)

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


@pytest.mark.slow
def test_bench_realistic_quick(tmp_path: Path) -> None:
    figures_path = tmp_path / "figures.json"
    # its own traffic cache: the reference implementation makes the frames in this run
    args = ["--quick", "--json", str(figures_path), "--cache-dir", str(tmp_path / "cache"), "--spider", "off"]
    out = run_quick(["scripts/bench_realistic.py", *args], timeout=300)
    assert "spider off" in out, out

    assert "generating traffic with @atproto/repo" in out, out
    assert "== realistic ingest: summary ==" in out and "!!! DROPS" not in out, out
    labels = {line.strip().split("  ")[0] for line in out.splitlines() if line.startswith("  ")}
    for label in ("delivered", "ingest-to-delivery", "relay CPU", "relay peak RSS", "highest rate held", "peak RSS"):
        assert label in labels, f"figure line {label!r} missing:\n{out}"

    steps = json.loads(figures_path.read_text())
    assert set(steps) == {"150", "300"}, steps.keys()  # --quick: one rate stepped, one fixed rate
    for step in steps.values():
        # --quick: 20 accounts on 2 hosts, each #identity, #account, #commit, #sync, then 20 commits
        assert step["frames"] == 20 * 24 and step["commits"] == 20 * 21, step
        assert step["all_arrived"] and step["drops"] == {}, step
        assert step["commits_sent"] == step["commits"], step
        samples = step["latency"]
        assert samples["frames"] == samples["sent"] == step["commits"], samples  # every sent commit came back
        assert samples["unmatched"] == 0, samples
        assert samples["deliveries"] == step["commits"] * 2, samples  # 2 consumers, each got every commit
        assert [c["commits"] for c in samples["per_connection"]] == [step["commits"]] * 2, samples
        assert step["peak_rss_kib"] > 0 and step["relay_cpu_seconds"] > 0, step
        assert step["counters"]["spider offers"] == 0, step  # --spider off reached the relay
