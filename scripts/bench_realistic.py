"""Benchmark the relay on realistic traffic: commits made by the reference implementation, sent at an even pace.

    python scripts/bench_realistic.py [--hosts 20] [--accounts 2000] [--commits 50]
        [--rates 1000,2000,3000,5000,7500,10000] [--fixed-rates 1000,2000] [--seconds S]
        [--consumers 2] [--ingest-workers N] [--no-mirror] [--spider on|off] [--database-url URL]
        [--quick] [--json FILE] [--keep] [--regenerate] [--profile PREFIX] [--known-accounts N]
        [--plc-delay-ms MS]
    python scripts/bench_realistic.py --burst [bench_ingest.py options]   # the old burst benchmark

Traffic (``scripts/loadgen/gen.mjs``, made once and cached by its parameters under
``~/.cache/skyrelay-bench``): ``--accounts`` accounts over ``--hosts`` hosts, each starting as
the reference PDS starts one (``#identity``, ``#account``, an empty ``#commit``, ``#sync``) and
then ``--commits`` one-op Sync 1.1 commits built by ``@atproto/repo`` (92% creates of posts and
likes, 5% updates, 3% deletes), every fourth account of a host on P-256, the rest K-256; the
accounts' frames interleaved as a busy PDS emits them. A stand-in PLC directory
(``tests/support/fake_plc.py``) serves the DID documents, naming each account's host as its PDS.

Each measurement ("step") runs at one offered rate, in frames/s over all hosts, from a fresh
start: the hosts are rewound, a new relay (``skyrelay serve``, default settings apart from raised
per-host limits and insecure loopback hosts; a new SQLite file, or a new schema with
``--database-url``) subscribes to them, ``--consumers`` firehose consumers connect, and every
host (``tests/support/frame_host.py --held``) sends all its frames (or its first ``rate x --seconds /
hosts``) at an even pace, recording when each leaves. The consumers time each ``#commit``'s arrival
against its send time (matched by did and rev; one clock, ``time.monotonic``, for every process).

With ``--known-accounts N`` each relay starts on databases already holding N accounts
(``scripts/benchkit/seed.py``): the traffic's accounts known without a head and with their DID
documents cached, the rest synthetic mirrored accounts (account row with a head, identity row,
mirror head), so every cache miss reads a big table. SQLite is seeded once and copied per step;
PostgreSQL is seeded again in each step's schema.

A rate is held when every commit reached every consumer, the slowest consumer's delivery rate
(commits between its first and last arrival) is within 2% of the offered commit rate, the p99
ingest-to-delivery is under 1 s, and nothing was dropped. The rates of ``--rates`` are stepped up
to the first that is not held; then each of ``--fixed-rates`` not yet run is run. Printed: the
highest rate held; at the fixed rates the relay's CPU per event (relay process and ingest
workers, user + system from /proc, over every event it accepted) and p50/p99 ingest-to-delivery; peak
RSS (VmHWM, relay and workers); drops by reason from /metrics, which must be 0 (a drop means the
traffic or the relay is wrong, and is printed loudly). The step figures are in ``--json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from config.settings import Settings  # noqa: E402
from scripts.benchkit.consumer import ConsumerProcess  # noqa: E402
from scripts.benchkit.hosts import HeldFrameHost, on_every, start_hosts  # noqa: E402
from scripts.benchkit.procfs import machine_cpu_seconds, proc_cpu_seconds  # noqa: E402
from scripts.benchkit.profile import print_profile, py_spy_record  # noqa: E402
from scripts.benchkit.prom import drops_by_reason, metric_sum, parse_metrics  # noqa: E402
from scripts.benchkit.realistic_report import StepResult, judge, print_step, print_summary  # noqa: E402
from scripts.benchkit.relays import (  # noqa: E402
    fresh_database_url,
    relay_cpu_seconds,
    relay_kib,
    start_relay,
    stop_relay,
)
from scripts.benchkit.seed import TrafficAccount, seed_known_accounts  # noqa: E402
from scripts.benchkit.traffic import IndexEntry, Traffic, TrafficSpec, ensure_traffic  # noqa: E402
from tests.support.fake_plc import FakePlc, make_did_doc  # noqa: E402
from tests.support.procs import RelayProcess, wait_until  # noqa: E402

POLL_SECONDS = 0.2
STALL_SECONDS = 20.0  # no consumer progress for this long after the sending ends: the step failed
DRAIN_LIMIT_SECONDS = 120.0  # at most this long after the sending ends for the last commit to arrive
COUNTERS = {  # relay counters printed per step (grown during it), to tell a stall from a slow relay
    "received": "skyrelay_events_received_total",
    "accepted": "skyrelay_events_accepted_total",
    "upstream reconnects": "skyrelay_upstream_reconnects_total",
    "accounts marked for re-sync": "skyrelay_accounts_marked_resync_total",
    "actor restarts": "skyrelay_actor_restarts_total",
    "mirror backfills": "skyrelay_mirror_backfills_total",
}
DID_FETCHES = "skyrelay_identity_fetch_total"
SPIDER_STEPS = "skyrelay_spider_steps_total"


@dataclass(slots=True)
class Sample:
    at: float
    cpu: dict[int, float]  # the relay and its ingest workers: pid -> CPU seconds so far
    others: dict[str, float]  # CPU seconds so far of the frame hosts, the consumers, and the machine ("busy")
    machine_seconds: float  # CPU seconds the machine had so far (busy or idle, every core)
    metrics: dict[str, float]


def relay_counters(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """How much each of ``COUNTERS`` grew, DID document fetches (ok, and failed by any reason), spider offers."""

    def grown(name: str, **labels: str) -> float:
        return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

    out = {label: grown(name) for label, name in COUNTERS.items()}
    out["DID documents fetched"] = grown(DID_FETCHES, result="ok")
    out["DID fetches failed"] = grown(DID_FETCHES) - out["DID documents fetched"]
    out["spider offers"] = grown(SPIDER_STEPS, outcome="offered")  # 0 with --spider off
    out["spider offers dropped"] = grown(SPIDER_STEPS, outcome="dropped_queue_full")
    return out


class Bench:
    def __init__(self, args: argparse.Namespace, stack: ExitStack, workdir: Path, traffic: Traffic) -> None:
        self.args = args
        self.stack = stack
        self.workdir = workdir
        self.traffic = traffic
        self.hosts: list[HeldFrameHost] = start_hosts([h.frames_path for h in traffic.hosts], stack)
        docs = {
            acct["did"]: make_did_doc(acct["did"], acct["signingKey"], host.url, handle=acct["handle"])
            for host, made in zip(self.hosts, traffic.hosts, strict=True)
            for acct in made.accounts
        }
        self.plc: FakePlc = stack.enter_context(FakePlc(docs))
        self.plc.delay_seconds = args.plc_delay_ms / 1000  # the public PLC directory is a round trip away
        self.known = [
            TrafficAccount(acct["did"], acct["handle"], acct["signingKey"], host.url)
            for host, made in zip(self.hosts, traffic.hosts, strict=True)
            for acct in made.accounts
        ]
        self.seed_template: Path | None = None  # SQLite: seeded once, copied into each step's folder

    def seed(self, folder: Path, db_url: str) -> None:
        """Fill the step's databases with ``--known-accounts`` accounts before its relay starts."""
        n = self.args.known_accounts
        if not n:
            return
        if self.args.database_url:  # a fresh schema per step: seeded again
            took = seed_known_accounts(
                db_url, f"sqlite:///{folder / 'carstore.sqlite'}", folder / "repos", n, self.known
            )
            print(f"  seeded {n:,} known accounts in {took:.1f} s", flush=True)
            return
        if self.seed_template is None:
            template = self.workdir / "seed-template"
            took = seed_known_accounts(
                f"sqlite:///{template / 'relay.sqlite'}",
                f"sqlite:///{template / 'carstore.sqlite'}",
                template / "repos",
                n,
                self.known,
            )
            print(f"  seeded {n:,} known accounts in {took:.1f} s (SQLite, copied into each step)", flush=True)
            self.seed_template = template
        shutil.copytree(self.seed_template, folder, dirs_exist_ok=True)
        for path in folder.rglob("*"):  # written back now, not under the run's own fsyncs
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def relay_env(self) -> dict[str, str]:
        default = {f.name: f.default for f in dataclasses.fields(Settings)}["cursor_flush_seconds"]
        env = {"SKYRELAY_CURSOR_FLUSH_SECONDS": str(default)}  # back to the default (the test helper lowers it)
        if not self.args.mirror:
            env["SKYRELAY_MIRROR_ENABLED"] = "false"
        env["SKYRELAY_SPIDER_ENABLED"] = "true" if self.args.spider == "on" else "false"  # ingest, spider on vs off
        env.update(item.split("=", 1) for item in self.args.relay_env)
        return env

    def step(self, number: int, rate: float) -> StepResult:
        a = self.args
        on_every(self.hosts, lambda h: h.rewind())
        folder = self.workdir / f"relay-{number}"
        with ExitStack() as stack:
            db_url = fresh_database_url(a.database_url, folder, stack, a.keep)
            self.seed(folder, db_url)
            workers = ("--ingest-workers", str(a.ingest_workers)) if a.ingest_workers is not None else ()
            relay = start_relay(folder, db_url, self.plc.url, self.relay_env(), workers)
            stack.callback(stop_relay, relay)
            for host in self.hosts:
                relay.request_crawl(host.hostname)
            wait_until(lambda: all(h.status()["subscribers"] == 1 for h in self.hosts), 60, "the relay to subscribe")
            consumer = ConsumerProcess(relay.port, a.consumers)
            stack.callback(consumer.stop)
            consumer.expect("ready", 30)
            consumer.send(cmd="record", on=True)
            consumer.expect("recording", 10)
            profile = self.profile_path(rate)
            if profile is not None:
                assert relay.proc is not None
                stack.enter_context(py_spy_record(relay.proc.pid, profile))
            result = self.measure(relay, consumer, rate, folder)
            if profile is not None:
                stack.close()  # stops py-spy (and the relay) before the summary is read
                assert relay.proc is not None
                print_profile(profile, f"{rate:,.0f} frames/s", relay.proc.pid)
        if not a.keep:
            shutil.rmtree(folder, ignore_errors=True)
        return result

    def profile_path(self, rate: float) -> Path | None:
        """With ``--profile PREFIX``, where py-spy writes the relay's stacks at a fixed rate."""
        if not self.args.profile or rate not in self.args.fixed_rates:
            return None
        return Path(f"{self.args.profile}-{rate:g}.txt")

    def measure(self, relay: RelayProcess, consumer: ConsumerProcess, rate: float, folder: Path) -> StepResult:
        host_rate = rate / len(self.hosts)
        per_host = math.ceil(rate * self.args.seconds / len(self.hosts)) if self.args.seconds else None
        counts = [len(h.index) if per_host is None else min(len(h.index), per_host) for h in self.traffic.hosts]
        commits = [
            [e for e in h.index[:n] if e.type == "#commit"] for h, n in zip(self.traffic.hosts, counts, strict=True)
        ]
        expected = sum(len(c) for c in commits)
        scheduled = max(counts) / host_rate
        before = self.sample(relay, consumer)
        plc_before = self.plc.requests
        started = time.monotonic()
        on_every(list(zip(self.hosts, counts, strict=True)), lambda hc: hc[0].release(hc[1], host_rate))
        delivered = self.wait_delivered(consumer, relay, expected, started + scheduled)
        after = self.sample(relay, consumer)
        plc_requests = self.plc.requests - plc_before
        peak_rss = relay_kib(relay, "VmHWM")
        rows, lag = self.sends(commits, counts, started, host_rate)
        sends_path = folder / "sends.json"
        sends_path.write_text(json.dumps(rows))
        consumer.send(cmd="latency", sends=str(sends_path))
        latency = consumer.expect("latency", 300)
        cpu = sum(t - before.cpu.get(pid, 0.0) for pid, t in after.cpu.items())
        wall = max(1e-9, after.at - before.at)
        cores = {name: (after.others[name] - before.others[name]) / wall for name in after.others}
        cores["busy"] = (
            (after.others["busy"] - before.others["busy"])
            / max(1e-9, after.machine_seconds - before.machine_seconds)
            * (os.cpu_count() or 1)
        )
        result = StepResult(
            rate=rate, frames=sum(counts), commits=expected, scheduled_seconds=scheduled,
            measured_seconds=after.at - before.at, all_arrived=delivered, latency=latency,
            relay_cpu_seconds=cpu, peak_rss_kib=peak_rss, drops=drops_by_reason(before.metrics, after.metrics),
            host_lag_seconds=lag, commits_sent=len(rows), consumers=self.args.consumers,
            counters={**relay_counters(before.metrics, after.metrics), "PLC requests answered": plc_requests},
            other_cores=cores,
        )  # fmt: skip
        judge(result)
        return result

    def sends(
        self, commits: list[list[IndexEntry]], counts: list[int], started: float, host_rate: float
    ) -> tuple[list[list[Any]], float]:
        """Rows [seq, did, rev, send time, host] of every commit sent; how late the latest host finished."""
        rows: list[list[Any]] = []
        lag = 0.0
        sent = on_every(self.hosts, lambda h: h.sends())
        for host, (host_sends, host_commits, count) in enumerate(zip(sent, commits, counts, strict=True)):
            rows.extend([e.seq, e.did, e.rev, host_sends[e.seq], host] for e in host_commits if e.seq in host_sends)
            if host_sends:
                lag = max(lag, max(host_sends.values()) - (started + count / host_rate))
        return rows, lag

    def sample(self, relay: RelayProcess, consumer: ConsumerProcess) -> Sample:
        busy, total = machine_cpu_seconds()
        others = {"frame hosts": sum(sum(proc_cpu_seconds(h.proc.pid)) for h in self.hosts),
                  "consumers": sum(proc_cpu_seconds(consumer.proc.pid)), "busy": busy}  # fmt: skip
        return Sample(time.monotonic(), relay_cpu_seconds(relay), others, total, parse_metrics(relay.metrics()))

    def wait_delivered(self, consumer: ConsumerProcess, relay: RelayProcess, expected: int, sent_by: float) -> bool:
        """Wait until every consumer has ``expected`` commits; False on a stall or past the drain limit."""
        best, moved = -1, time.monotonic()
        while True:
            assert relay.proc is not None
            if relay.proc.poll() is not None:
                raise RuntimeError(f"relay exited with {relay.proc.returncode}; log tail:\n{relay.log()[-3000:]}")
            consumer.send(cmd="progress")
            least = min(consumer.expect("progress", 30)["commits"], default=0)
            now = time.monotonic()
            if least >= expected:
                return True
            if least > best:
                best, moved = least, now
            elif now > sent_by and now - max(moved, sent_by) > STALL_SECONDS:
                return False
            if now > sent_by + DRAIN_LIMIT_SECONDS:
                return False
            time.sleep(POLL_SECONDS)

    def run(self) -> dict[str, Any]:
        a = self.args
        results: dict[float, StepResult] = {}
        number = 0
        for rate in a.rates:
            number += 1
            results[rate] = result = self.step(number, rate)
            print_step(result)
            if not result.held:
                break
        for rate in a.fixed_rates:
            if rate not in results:
                number += 1
                results[rate] = result = self.step(number, rate)
                print_step(result, fixed=True)
        print_summary(a.rates, a.fixed_rates, results)
        return {f"{rate:g}": result.figures() for rate, result in results.items()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--hosts", type=int, default=20, help="upstream hosts (default 20)")
    parser.add_argument("--accounts", type=int, default=2000, help="accounts over every host (default 2000)")
    parser.add_argument("--commits", type=int, default=50, help="one-op commits per account (default 50)")
    parser.add_argument("--rates", type=_rates, default=[1000, 2000, 3000, 5000, 7500, 10000],
                        help="offered frames/s to step through (default 1000,2000,3000,5000,7500,10000)")  # fmt: skip
    parser.add_argument("--fixed-rates", type=_rates, default=[1000, 2000],
                        help="rates measured even past the first failure (default 1000,2000)")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=0.0,
                        help="send at most this long per step (a prefix of the traffic, set-up heavy: every "
                             "account starts early); default 0: all of it")  # fmt: skip
    parser.add_argument("--consumers", type=int, default=2, help="firehose consumers (default 2)")
    parser.add_argument("--ingest-workers", type=int, help="pass --ingest-workers N to the relay (default: its own)")
    parser.add_argument("--no-mirror", dest="mirror", action="store_false", help="run the relay without its mirror")
    parser.add_argument("--spider", choices=("on", "off"), default="on",
                        help="run the relay with its spider on (default, as the relay) or off")  # fmt: skip
    parser.add_argument("--database-url", default="", help="PostgreSQL URL (a fresh schema per step); default SQLite")
    parser.add_argument("--relay-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the relay (repeatable)")  # fmt: skip
    parser.add_argument("--plc-delay-ms", type=float, default=0.0,
                        help="answer each DID document request this late (a remote PLC); default 0")  # fmt: skip
    parser.add_argument(
        "--known-accounts",
        type=int,
        default=0,
        metavar="N",
        help="start each relay with N accounts already known and mirrored (default 0)",
    )
    parser.add_argument("--cache-dir", type=Path, help="where made traffic is kept (default ~/.cache/skyrelay-bench)")
    parser.add_argument("--refpds-dir", type=Path, help="the reference PDS install (default ~/.cache/skyrelay-refpds)")
    parser.add_argument("--regenerate", action="store_true", help="make the traffic again even if cached")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (relay data and logs)")
    parser.add_argument("--quick", action="store_true", help="a small smoke run (well under a minute)")
    parser.add_argument("--json", type=Path, help="also write the step figures as JSON to this file")
    parser.add_argument("--profile", metavar="PREFIX",
                        help="py-spy the relay in each fixed-rate step: raw stacks to PREFIX-RATE.txt, and a "
                             "summary of where its main thread and ingest workers spend time")  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.hosts, args.accounts, args.commits, args.seconds = 2, 20, 20, 0.0
        args.rates, args.fixed_rates = [150.0], [300.0]
    if min(args.hosts, args.accounts, args.commits, args.consumers) < 1 or args.accounts < args.hosts:
        parser.error("--hosts, --commits and --consumers must be at least 1, and --accounts at least --hosts")
    if any("=" not in item for item in args.relay_env):
        parser.error("--relay-env takes KEY=VALUE")
    return args


def _rates(text: str) -> list[float]:
    rates = [float(part) for part in text.split(",") if part.strip()]
    if not rates or min(rates) <= 0:
        raise argparse.ArgumentTypeError("a comma-separated list of positive rates")
    return rates


def _raise_on_signal(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--burst" in argv:  # the synthetic burst benchmark, as before
        from scripts import bench_ingest

        return bench_ingest.main([item for item in argv if item != "--burst"])
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_signal)
    signal.signal(signal.SIGHUP, _raise_on_signal)
    spec = TrafficSpec(args.hosts, args.accounts, args.commits)
    paths = {k: v for k, v in (("cache_dir", args.cache_dir), ("refpds_dir", args.refpds_dir)) if v is not None}
    traffic = ensure_traffic(spec, regenerate=args.regenerate, **paths)
    made = f"generated in {traffic.generated_seconds:.0f} s" if traffic.generated_seconds else "from the cache"
    db_kind = "PostgreSQL" if args.database_url else "SQLite"
    workers = "" if args.ingest_workers is None else f", --ingest-workers {args.ingest_workers}"
    print(f"skyrelay realistic benchmark: {args.accounts:,} accounts on {args.hosts} hosts, "
          f"{traffic.frames:,} frames ({traffic.count('#commit'):,} commits, {traffic.bytes / traffic.frames:,.0f} "
          f"bytes a frame on average; {made}), {args.consumers} consumers, {db_kind}, mirror "
          f"{'on' if args.mirror else 'off'}, spider {args.spider}{workers}"
          f"{f', {args.known_accounts:,} known accounts' if args.known_accounts else ''}", flush=True)  # fmt: skip
    workdir = Path(tempfile.mkdtemp(prefix="skyrelay-bench-"))
    status = 1
    try:
        with ExitStack() as stack:
            figures = Bench(args, stack, workdir, traffic).run()
            if args.json:
                args.json.write_text(json.dumps(figures, indent=2))
            status = 0
    except KeyboardInterrupt:
        print("interrupted: every subprocess stopped", file=sys.stderr)
        status = 130
    except Exception:
        args.keep = True  # the relay logs are the evidence
        raise
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
