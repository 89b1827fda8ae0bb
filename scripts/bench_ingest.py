"""Burst benchmark of the relay spine: synthetic PDS hosts -> the relay (a subprocess) -> C firehose consumers.

BURST MODE, synthetic repos (Python-made, tiny trees), commits released at once: it hides the
per-batch costs that a steady pace brings out and the cost of real trees, and reads about twice
what the relay holds on realistic traffic. For figures to quote, use ``bench_realistic.py``.

    python scripts/bench_ingest.py [--hosts 4] [--accounts-per-host 100] [--commits 40000] [--rate 2000]
                                   [--consumers 10] [--database-url URL] [--keep] [--quick] [--profile PREFIX]

Processes: this one (orchestrates, runs the fake PLC on loopback HTTP, prints), ``--hosts``
frame hosts (``tests/support/frame_host.py``, real websockets, each with its own accounts and
keys; every fourth account signs with P-256, the rest K-256), the relay (``python -m web.cli
serve``, SQLite unless ``--database-url``) and one consumer process holding the ``--consumers``
websockets (``scripts/benchkit/consumer.py``). The machine has few cores: the CPU of
every process is measured and printed, so it is clear what the relay had for itself.

Steps: every host generates all its signed Sync 1.1 commits up front and holds them (generation
is not measured); the relay is told to crawl each host; the consumers connect; a warm-up
releases every account's genesis commit and a few commits more (DID resolution, account rows,
key caches). Then:

(a) max throughput: every host releases ``--commits / --hosts`` commits at once, as fast as the
    relay reads them. Verified commits/s = commits / time from the release until
    ``skyrelay_last_seq`` reaches the total (polled every 0.1 s); delivered commits/s = the same
    until the slowest consumer has them all. Relay CPU from /proc/PID/stat, peak RSS (VmHWM).
(b) latency: the hosts release ``--rate`` commits/s in total for ``--latency-seconds``, recording
    when each frame is handed to the relay's socket. Each consumer maps every ``#commit`` it gets
    back to the upstream (did, rev) and its send time: ingest-to-delivery = arrival - send
    (``time.monotonic``, one clock for every process on a Linux machine). Ingest-to-durable comes
    from the relay's own ``skyrelay_ingest_to_durable_seconds`` histogram (bucket estimates).

Conditions worth knowing when reading the figures: the frame hosts set TCP_NODELAY (as a PDS
does) and the consumers are ordinary clients (delayed ACKs, no TCP_QUICKACK), so any Nagle
stall on the relay's own sockets shows in the latency; the 10 Hz /metrics polling costs the
relay about 1 ms of CPU per scrape; "other" in the CPU line is load on the machine that is not
ours (other users, and the PostgreSQL server with ``--database-url``).

``--profile PREFIX`` runs ``py-spy record --threads`` on the relay during (a) and (b) (raw
collapsed stacks to PREFIX-throughput.txt and PREFIX-latency.txt) and prints where the main
thread's samples fall. Every subprocess is stopped on exit, on errors and on Ctrl-C/SIGTERM;
the temporary folder is removed unless ``--keep`` (and kept after an error, for the relay log).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.benchkit.consumer import ConsumerProcess  # noqa: E402
from scripts.benchkit.procfs import (  # noqa: E402
    descendants,
    machine_cpu_seconds,
    proc_cpu_seconds,
    proc_status_kib,
    relay_thread_seconds,
)
from scripts.benchkit.profile import print_profile, py_spy_record  # noqa: E402
from scripts.benchkit.prom import histogram_quantile, metric_sum, parse_metrics  # noqa: E402
from tests.support.fake_plc import FakePlc, make_did_doc, new_plc_did  # noqa: E402
from tests.support.procs import FrameHost, RelayProcess, http_json, wait_until  # noqa: E402

POLL_SECONDS = 0.1


# -- measurements ------------------------------------------------------------------------------


@dataclass
class Snapshot:
    at: float
    cpu: dict[str, dict[int, float]]  # role -> pid -> CPU seconds so far
    relay_sys: float
    relay_main: float
    machine: tuple[float, float]
    metrics: dict[str, float]


@dataclass
class PhaseResult:
    name: str
    events: int
    seconds: float
    cpu: dict[str, float]
    machine_busy: float
    extra: dict[str, Any] = field(default_factory=dict)


# -- orchestration -----------------------------------------------------------------------------


@dataclass
class Account:
    did: str
    curve: str
    key_hex: str


class Bench:
    def __init__(self, args: argparse.Namespace, stack: ExitStack, workdir: Path) -> None:
        self.args = args
        self.stack = stack
        self.workdir = workdir
        self.plc: FakePlc = stack.enter_context(FakePlc())
        self.hosts: list[FrameHost] = []
        self.accounts: dict[str, list[Account]] = {}
        self.relay: RelayProcess | None = None
        self.consumer: ConsumerProcess | None = None
        self.profiler: subprocess.Popen[bytes] | None = None

    # -- set-up ------------------------------------------------------------------------------
    def start_hosts(self) -> None:
        from protocol.crypto import PrivateKey

        for _ in range(self.args.hosts):
            host = FrameHost()
            self.stack.callback(host.stop)
            self.hosts.append(host)
            accounts = []
            for i in range(self.args.accounts_per_host):
                curve = "p256" if i % 4 == 3 else "k256"
                key = PrivateKey.generate(curve)  # type: ignore[arg-type]
                did = new_plc_did()
                self.plc.put(did, make_did_doc(did, key.public_key().did_key(), host.url))
                accounts.append(Account(did, curve, key.to_bytes().hex()))
            self.accounts[host.url] = accounts

    def generate(self, per_host_commits: int) -> None:
        def one(host: FrameHost) -> int:
            accounts = [a.__dict__ for a in self.accounts[host.url]]
            body = {"accounts": accounts, "commits": per_host_commits, "hold": True}
            return int(http_json(f"{host.url}/control/generate", body, timeout=900)["frames"])

        with ThreadPoolExecutor(len(self.hosts)) as pool:
            list(pool.map(one, self.hosts))

    def database_url(self) -> str:
        url = self.args.database_url
        if not url:
            return f"sqlite:///{self.workdir / 'relay' / 'relay.sqlite'}"
        import psycopg2

        schema = "bench_" + uuid.uuid4().hex[:12]
        with psycopg2.connect(url) as conn:
            conn.autocommit = True
            conn.cursor().execute(f"CREATE SCHEMA {schema}")
        if not self.args.keep:

            def drop() -> None:
                with psycopg2.connect(url) as conn:
                    conn.autocommit = True
                    conn.cursor().execute(f"DROP SCHEMA {schema} CASCADE")

            self.stack.callback(drop)
        from urllib.parse import quote

        return f"{url}{'&' if '?' in url else '?'}options={quote('-csearch_path=' + schema)}"

    def start_relay(self) -> RelayProcess:
        env = {"RUST_BACKTRACE": "0", "SKYRELAY_CURSOR_FLUSH_SECONDS": "5"}
        env.update(item.split("=", 1) for item in self.args.relay_env)
        args = ("--ingest-workers", str(self.args.ingest_workers)) if self.args.ingest_workers is not None else ()
        relay = RelayProcess(self.workdir / "relay", database_url=self.database_url(), plc_url=self.plc.url,
                             extra_env=env, args=args)  # fmt: skip
        self.stack.callback(self._stop_relay, relay)
        relay.start(timeout=60)
        self.relay = relay
        return relay

    def crawl(self) -> None:
        """requestCrawl for every host (the relay asks each host's describeServer), then wait for the subscriptions."""
        assert self.relay is not None
        for host in self.hosts:
            self.relay.request_crawl(host.hostname)
        wait_until(lambda: all(h.status()["subscribers"] == 1 for h in self.hosts), 30, "the relay to subscribe")

    def _stop_relay(self, relay: RelayProcess) -> None:
        status = relay.stop()
        if status != 0:
            print(f"warning: relay exited with status {status}; log tail:\n{relay.log()[-2000:]}", file=sys.stderr)

    def start_consumers(self) -> None:
        assert self.relay is not None
        self.consumer = ConsumerProcess(self.relay.port, self.args.consumers)
        self.stack.callback(self.consumer.stop)
        self.consumer.expect("ready", 30)

    # -- measuring ---------------------------------------------------------------------------
    def pids(self) -> dict[str, list[int]]:
        assert self.relay is not None and self.relay.proc is not None and self.consumer is not None
        out = {
            "relay": [self.relay.proc.pid],
            "ingest workers": descendants(self.relay.proc.pid),
            "frame hosts": [h.proc.pid for h in self.hosts],
            "consumers": [self.consumer.proc.pid],
            "bench + PLC": [os.getpid()],
        }
        if self.profiler is not None:
            out["py-spy"] = [self.profiler.pid]
        return out

    def snapshot(self) -> Snapshot:
        assert self.relay is not None
        metrics = parse_metrics(self.relay.metrics())
        cpu: dict[str, dict[int, float]] = {}
        for role, pids in self.pids().items():
            cpu[role] = {}
            for pid in pids:
                try:
                    cpu[role][pid] = sum(proc_cpu_seconds(pid))
                except OSError:  # it just exited
                    pass
        assert self.relay is not None and self.relay.proc is not None
        relay_sys = proc_cpu_seconds(self.relay.proc.pid)[1]
        relay_main = relay_thread_seconds(self.relay.proc.pid)
        return Snapshot(time.monotonic(), cpu, relay_sys, relay_main, machine_cpu_seconds(), metrics)

    def relay_kib(self, key: str) -> int:
        """A /proc/PID/status figure summed over the relay and its ingest workers."""
        assert self.relay is not None and self.relay.proc is not None
        return sum(proc_status_kib(pid, key) for pid in [self.relay.proc.pid, *descendants(self.relay.proc.pid)])

    def last_seq(self) -> int:
        assert self.relay is not None and self.relay.proc is not None
        if self.relay.proc.poll() is not None:
            raise RuntimeError(f"relay exited with {self.relay.proc.returncode}; log tail:\n{self.relay.log()[-3000:]}")
        return int(metric_sum(parse_metrics(self.relay.metrics()), "skyrelay_last_seq"))

    def wait_seq(self, target: int, what: str) -> float:
        """Poll until skyrelay_last_seq >= target; the time it was first seen there. Fails on a stall."""
        last, moved = self.last_seq(), time.monotonic()
        while True:
            seq = self.last_seq()
            now = time.monotonic()
            if seq >= target:
                return now
            if seq != last:
                last, moved = seq, now
            elif now - moved > 30:
                assert self.relay is not None
                dropped = {k: v for k, v in parse_metrics(self.relay.metrics()).items() if "dropped_total{" in k}
                raise RuntimeError(f"{what}: relay stalled at seq {seq} < {target}; drops {dropped}")
            time.sleep(POLL_SECONDS)

    def release(self, per_host: int, rate: float | None = None, record_sends: bool = False) -> float:
        """Release frames on every host (in parallel); the moment just before the first request."""
        per_host_rate = rate / len(self.hosts) if rate else None
        body = {"count": per_host, "rate": per_host_rate, "record_sends": record_sends}
        with ThreadPoolExecutor(len(self.hosts)) as pool:
            started = time.monotonic()
            list(pool.map(lambda h: http_json(f"{h.url}/control/release", body), self.hosts))
        return started

    def phase(self, name: str, per_host: int, rate: float | None, record: bool) -> tuple[PhaseResult, Snapshot]:
        assert self.consumer is not None
        total = per_host * len(self.hosts)
        base = self.last_seq()
        before = self.snapshot()
        self.consumer.send(cmd="arm", delta=total)
        self.consumer.expect("armed", 10)
        if record:
            self.consumer.send(cmd="record", on=True)
            self.consumer.expect("recording", 10)
        started = self.release(per_host, rate, record)
        durable_at = self.wait_seq(base + total, name)
        reached = self.consumer.expect("reached", 120)
        after = self.snapshot()
        if record:
            self.consumer.send(cmd="record", on=False)
            self.consumer.expect("recording", 10)
        seconds = durable_at - started
        cpu = {  # processes started during the phase count whole; those gone by its end are missed
            role: sum(t - before.cpu.get(role, {}).get(pid, 0.0) for pid, t in pids.items())
            for role, pids in after.cpu.items()
            if pids or role in ("relay", "ingest workers")
        }
        busy = (after.machine[0] - before.machine[0]) / max(1e-9, after.machine[1] - before.machine[1])
        result = PhaseResult(name, total, seconds, cpu, busy * (os.cpu_count() or 1))
        result.extra["delivered_seconds"] = (reached["last"] or durable_at) - started
        result.extra["consumers_closed"] = reached["closed"]
        result.extra["measured_seconds"] = after.at - before.at
        result.extra["relay_sys_seconds"] = after.relay_sys - before.relay_sys
        result.extra["relay_main_thread_seconds"] = after.relay_main - before.relay_main
        result.extra["dropped"] = metric_sum(after.metrics, "skyrelay_events_dropped_total") - metric_sum(
            before.metrics, "skyrelay_events_dropped_total"
        )
        for q in (0.5, 0.99):
            result.extra[f"durable_p{int(q * 100)}"] = histogram_quantile(
                before.metrics, after.metrics, "skyrelay_ingest_to_durable_seconds", q
            )
        return result, after

    def latencies(self) -> dict[str, Any]:
        assert self.consumer is not None
        sends = []
        for host in self.hosts:
            sends.extend(http_json(f"{host.url}/control/sends", timeout=60)["sends"])
        path = self.workdir / "sends.json"
        path.write_text(json.dumps(sends))
        self.consumer.send(cmd="latency", sends=str(path))
        return self.consumer.expect("latency", 120)

    def profile_path(self, tag: str) -> Path | None:
        return Path(f"{self.args.profile}-{tag}.txt") if self.args.profile else None

    @contextmanager
    def profiling(self, tag: str) -> Iterator[None]:
        """``py-spy record`` on the relay while the block runs (with ``--profile``)."""
        path = self.profile_path(tag)
        if path is None:
            yield
            return
        assert self.relay is not None and self.relay.proc is not None
        with py_spy_record(self.relay.proc.pid, path) as profiler:
            self.profiler = profiler
            try:
                yield
            finally:
                self.profiler = None

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        a = self.args
        warm = a.accounts_per_host * a.warmup_commits_per_account
        thr = max(1, a.commits // a.hosts)
        lat = max(1, int(a.rate * a.latency_seconds) // a.hosts)
        accounts = a.hosts * a.accounts_per_host
        p256 = a.hosts * (a.accounts_per_host // 4)
        db_kind = "PostgreSQL" if a.database_url else "SQLite"
        workers = "" if a.ingest_workers is None else f", {a.ingest_workers} ingest workers"
        print(f"skyrelay ingest benchmark: {a.hosts} hosts x {a.accounts_per_host} accounts "
              f"({accounts - p256} K-256, {p256} P-256), {a.consumers} consumers, {db_kind}{workers}, "
              f"{os.cpu_count()} CPUs")  # fmt: skip
        self.start_hosts()
        t = time.monotonic()
        with ThreadPoolExecutor(1) as pool:  # generate while the relay starts
            generating = pool.submit(self.generate, warm + thr + lat)
            self.start_relay()
            generating.result()  # a generating host answers nothing (one greenlet, CPU-bound)
        self.crawl()
        per_host_frames = a.accounts_per_host + warm + thr + lat
        print(f"set-up: {per_host_frames * a.hosts:,} frames generated and held, relay up "
              f"({time.monotonic() - t:.1f} s)", flush=True)  # fmt: skip
        self.start_consumers()

        warm_result, _ = self.phase("warm-up", a.accounts_per_host + warm, None, False)
        print(f"warm-up: {warm_result.events:,} events ({accounts} new accounts) in {warm_result.seconds:.1f} s",
              flush=True)  # fmt: skip
        with self.profiling("throughput"):
            thr_result, _ = self.phase("max throughput", thr, None, False)
        assert self.relay is not None and self.relay.proc is not None
        thr_result.extra["peak_rss_kib"] = self.relay_kib("VmHWM")
        thr_result.extra["rss_kib"] = self.relay_kib("VmRSS")
        with self.profiling("latency"):
            lat_result, _ = self.phase("latency", lat, a.rate, True)
        lat_result.extra["latency"] = self.latencies()
        lat_result.extra["peak_rss_kib"] = self.relay_kib("VmHWM")
        results = {"warm-up": warm_result, "max throughput": thr_result, "latency": lat_result}
        report(a, results)
        for tag, title in (("throughput", "(a) max throughput"), ("latency", f"(b) {a.rate:,.0f} commits/s")):
            path = self.profile_path(tag)
            if path is not None:
                print_profile(path, title, self.relay.proc.pid)
        return {
            name: {"events": r.events, "seconds": r.seconds, "cpu_seconds": r.cpu, "machine_busy_cores": r.machine_busy,
                   **r.extra}
            for name, r in results.items()
        }  # fmt: skip


def report(args: argparse.Namespace, results: dict[str, PhaseResult]) -> None:
    """The table of figures: one ``  label  value`` line per figure, a header line per phase."""

    def row(label: str, value: str) -> None:
        print(f"  {label:<26} {value}")

    thr, lat = results["max throughput"], results["latency"]
    cpu, wall = _relay_cpu(thr), thr.extra["measured_seconds"]
    print(f"\n== (a) max throughput: {thr.events:,} commits released at once ==")
    row("verified commits/s", f"{thr.events / thr.seconds:,.0f}  ({thr.events:,} durable in {thr.seconds:.2f} s)")
    closed = thr.extra["consumers_closed"]
    delivered = thr.events / thr.extra["delivered_seconds"]
    row("delivered commits/s", f"{delivered:,.0f}  (to all {args.consumers} consumers; {closed} cut or closed)")
    row("relay CPU", f"{cpu:.2f} s = {cpu / wall:.2f} cores, {cpu / thr.events * 1e6:,.0f} µs per commit" + _sys(thr))
    peak, now = thr.extra["peak_rss_kib"] / 1024, thr.extra["rss_kib"] / 1024
    row("relay peak RSS", f"{peak:,.0f} MiB (VmHWM; VmRSS now {now:,.0f} MiB; ingest workers included)")
    row("ingest-to-durable", _ms_pair(thr.extra["durable_p50"], thr.extra["durable_p99"]) + "  (relay histogram)")
    row("CPU by process", _cpu_split(thr))
    row("dropped", f"{thr.extra['dropped']:.0f}")

    lt = lat.extra["latency"]
    every, slowest = lt["all"], lt["slowest"]
    cpu, wall = _relay_cpu(lat), lat.extra["measured_seconds"]
    print(f"== (b) latency at {args.rate:,.0f} commits/s: {lat.events:,} commits ==")
    row("achieved rate", f"{lat.events / lat.seconds:,.0f} commits/s over {lat.seconds:.1f} s")
    row("p50 ingest-to-delivery", f"{_ms(every.get('p50'))}  (all {lt['deliveries']:,} deliveries)")
    row(
        "p99 ingest-to-delivery", f"{_ms(every.get('p99'))}  (p90 {_ms(every.get('p90'))}, max {_ms(every.get('max'))})"
    )
    row("p99 to slowest consumer", f"{_ms(slowest.get('p99'))}  (p50 {_ms(slowest.get('p50'))}; per commit, the "
                                   f"last of {args.consumers} consumers)")  # fmt: skip
    row("ingest-to-durable", _ms_pair(lat.extra["durable_p50"], lat.extra["durable_p99"]) + "  (relay histogram)")
    row("relay CPU", f"{cpu / wall:.2f} cores, {cpu / lat.events * 1e6:,.0f} µs per commit" + _sys(lat))
    row("CPU by process", _cpu_split(lat))
    unmatched, dropped = lt["unmatched"], lat.extra["dropped"]
    row("matched", f"{lt['frames']:,} of {lt['sent']:,} commits; {unmatched} unmatched arrivals; dropped {dropped:.0f}")
    print(flush=True)


def _relay_cpu(result: PhaseResult) -> float:
    return result.cpu["relay"] + result.cpu.get("ingest workers", 0.0)


def _sys(result: PhaseResult) -> str:
    """Where the relay process's own CPU went: kernel, main thread; and the workers' share."""
    cpu = max(1e-9, result.cpu["relay"])
    kernel, main = result.extra["relay_sys_seconds"] / cpu, result.extra["relay_main_thread_seconds"] / cpu
    workers = result.cpu.get("ingest workers", 0.0)
    split = f"; ingest workers {workers / max(1e-9, _relay_cpu(result)):.0%} of it" if workers else ""
    return f" (relay process: {100 * kernel:.0f}% in the kernel, {100 * main:.0f}% on its main thread{split})"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1000:,.1f} ms"


def _ms_pair(p50: float | None, p99: float | None) -> str:
    return f"p50 {_ms(p50)}, p99 {_ms(p99)}"


def _cpu_split(result: PhaseResult) -> str:
    seconds = result.extra["measured_seconds"]
    ours = " + ".join(
        f"{name} {cpu / seconds:.2f}" for name, cpu in result.cpu.items() if cpu or name != "ingest workers"
    )
    other = max(0.0, result.machine_busy - sum(result.cpu.values()) / seconds)
    return f"{ours} cores; machine busy {result.machine_busy:.2f} of {os.cpu_count()} (other {other:.2f})"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--hosts", type=int, default=4, help="frame host processes (default 4)")
    parser.add_argument("--accounts-per-host", type=int, default=100, help="accounts per host (default 100)")
    parser.add_argument("--commits", type=int, default=40_000, help="commits released at once in (a) (default 40000)")
    parser.add_argument("--rate", type=float, default=2000.0, help="commits/s in total in (b) (default 2000)")
    parser.add_argument("--latency-seconds", type=float, default=20.0, help="length of (b) (default 20)")
    parser.add_argument("--consumers", type=int, default=10, help="firehose consumers (default 10)")
    parser.add_argument("--warmup-commits-per-account", type=int, default=2, help="after the genesis (default 2)")
    parser.add_argument("--database-url", default="", help="PostgreSQL URL (a fresh schema is used); default SQLite")
    parser.add_argument("--ingest-workers", type=int, help="pass --ingest-workers N to the relay (default: its own)")
    parser.add_argument(
        "--relay-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the relay, e.g. SKYRELAY_HOST_INFLIGHT_EVENTS=1000 (repeatable)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (relay data and log)")
    parser.add_argument("--quick", action="store_true", help="a small smoke run (~20 s)")
    parser.add_argument("--profile", help="py-spy the relay in (a) and (b): PREFIX-throughput.txt, PREFIX-latency.txt")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.hosts, args.accounts_per_host, args.commits = 2, 8, 1000
        args.rate, args.latency_seconds, args.consumers = 400.0, 2.0, min(args.consumers, 3)
        args.warmup_commits_per_account = 1
    if min(args.hosts, args.accounts_per_host, args.consumers, args.commits) < 1:
        parser.error("--hosts, --accounts-per-host, --consumers and --commits must be at least 1")
    if any("=" not in item for item in args.relay_env):
        parser.error("--relay-env takes KEY=VALUE")
    return args


def _raise_on_signal(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_signal)
    signal.signal(signal.SIGHUP, _raise_on_signal)
    workdir = Path(tempfile.mkdtemp(prefix="skyrelay-bench-"))
    status = 1
    try:
        with ExitStack() as stack:
            figures = Bench(args, stack, workdir).run()
            if args.json:
                args.json.write_text(json.dumps(figures, indent=2))
            status = 0
    except KeyboardInterrupt:
        print("interrupted: every subprocess stopped", file=sys.stderr)
        status = 130
    except Exception:
        args.keep = True  # the relay log and data are the evidence
        raise
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
