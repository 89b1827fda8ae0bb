"""Benchmark: what N connected, silent upstream hosts cost the relay in memory and in CPU.

    python -m scripts.bench_idle_hosts [--hosts 3000] [--idle-seconds 30] [--database-url URL]

One helper process (``scripts/benchkit/idle_hosts.py``) serves N hosts on loopback ports that
accept the relay's ``subscribeRepos`` and then send nothing (pongs only). A real relay
(``skyrelay serve``, SQLite unless ``--database-url``, per-host limits raised as the other
benchmarks do) is started; every host is added with the admin requestCrawl; once every host
is connected (seen from the hosts' side and the relay's gauge) the relay's RSS is compared
with its RSS before, and its CPU is measured over an idle window.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

from scripts.benchkit.procfs import proc_cpu_seconds, proc_status_kib
from scripts.benchkit.relays import fresh_database_url, start_relay, stop_relay
from tests.support.procs import REPO_ROOT, RelayProcess, http_json, stop_process, wait_until

PASSWORD = "bench-idle-hosts-password"


def raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(need, soft)), hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft < need:
        print(f"warning: open-file limit {soft} < {need} needed", file=sys.stderr)


def start_hosts(count: int) -> tuple[subprocess.Popen[str], int, list[int]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "scripts.benchkit.idle_hosts", "--hosts", str(count)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError("idle hosts did not start")
    info = json.loads(line)
    return proc, int(info["port"]), [int(p) for p in info["hosts"]]


def admin_crawl(relay: RelayProcess, hostname: str) -> None:
    req = urllib.request.Request(
        f"{relay.url}/admin/pds/requestCrawl",
        data=json.dumps({"hostname": hostname}).encode(),
        headers={"Authorization": f"Bearer {PASSWORD}", "Content-Type": "application/json"},
        method="POST",
    )
    for attempt in range(5):
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                resp.read()
                return
        except OSError:
            if attempt == 4:
                raise
            time.sleep(0.5 * (attempt + 1))


def rss_kib(pid: int) -> int:
    return proc_status_kib(pid, "VmRSS")


def cpu(pid: int) -> float:
    return sum(proc_cpu_seconds(pid))


def settle_rss(pid: int, seconds: float = 3.0) -> int:
    """RSS after it stopped moving by more than 1% for ``seconds`` (or 20 s passed)."""
    deadline = time.monotonic() + 20
    last = rss_kib(pid)
    while time.monotonic() < deadline:
        time.sleep(seconds)
        now = rss_kib(pid)
        if abs(now - last) <= last / 100:
            return now
        last = now
    return last


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hosts", type=int, default=3000)
    p.add_argument("--idle-seconds", type=float, default=30.0, help="the idle window CPU is measured over")
    p.add_argument("--database-url", default="", help="PostgreSQL URL (a new schema); SQLite by default")
    p.add_argument("--relay-env", action="append", default=[], metavar="KEY=VALUE", help="more relay settings")
    args = p.parse_args()
    raise_nofile(2 * args.hosts + 1000)
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-idle-") as tmp:
        hosts_proc, control, ports = start_hosts(args.hosts)
        stack.callback(stop_process, hosts_proc)
        folder = Path(tmp) / "relay"
        db_url = fresh_database_url(args.database_url, folder, stack, keep=False)
        env = {
            "SKYRELAY_ADMIN_PASSWORD": PASSWORD,
            "SKYRELAY_CURSOR_FLUSH_SECONDS": "5",  # the default (the test helper lowers it)
            "SKYRELAY_SPIDER_ENABLED": "false",
            **dict(item.split("=", 1) for item in args.relay_env),
        }
        relay = start_relay(folder, db_url, "http://127.0.0.1:9", env, ())
        stack.callback(stop_relay, relay)
        assert relay.proc is not None
        pid = relay.proc.pid
        time.sleep(3)
        rss_before = settle_rss(pid)
        cpu_start = cpu(pid)
        t0 = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda port: admin_crawl(relay, f"127.0.0.1:{port}"), ports))
        crawled = time.monotonic() - t0

        def all_connected() -> bool:
            seen = http_json(f"http://127.0.0.1:{control}/status")
            gauge = relay.metric("skyrelay_upstream_hosts_connected")
            return bool(seen["connected"] >= args.hosts and gauge >= args.hosts)

        wait_until(all_connected, 300, "every host to be connected", interval=1.0)
        connected = time.monotonic() - t0
        add_cpu = cpu(pid) - cpu_start
        time.sleep(5)  # start-up work of the last hosts (account recounts, enumeration) ends
        rss_after = settle_rss(pid)
        before_idle = http_json(f"http://127.0.0.1:{control}/status")
        c0, w0 = cpu(pid), time.monotonic()
        time.sleep(args.idle_seconds)
        idle_cpu, window = cpu(pid) - c0, time.monotonic() - w0
        after_idle = http_json(f"http://127.0.0.1:{control}/status")
        rss_end = rss_kib(pid)
        fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
        n = args.hosts
        print(f"idle upstream hosts: {n} ({'PostgreSQL' if args.database_url else 'SQLite'})")
        print(f"  added with admin requestCrawl in {crawled:.1f} s, all connected after {connected:.1f} s")
        print(f"  relay CPU while adding and connecting: {add_cpu:.1f} s ({add_cpu / n * 1000:.2f} ms per host)")
        print(f"  relay RSS before hosts: {rss_before / 1024:.1f} MiB")
        print(f"  relay RSS all connected, idle: {rss_after / 1024:.1f} MiB"
              f" (after the idle window: {rss_end / 1024:.1f} MiB)")  # fmt: skip
        print(f"  RSS per host: {(rss_after - rss_before) / n:.1f} KiB")
        print(f"  relay CPU over {window:.0f} s idle: {idle_cpu:.2f} s ({idle_cpu / window * 100:.1f}% of a core,"
              f" {idle_cpu / window / n * 1e6:.1f} µs per host per second)")  # fmt: skip
        print(f"  pings answered by the hosts in the window: {after_idle['pings'] - before_idle['pings']},"
              f" reconnects: {after_idle['subscriptions'] - before_idle['subscriptions']}")  # fmt: skip
        print(f"  relay open files: {fds}")
        print("  (one run; the machine is shared with other work)")


if __name__ == "__main__":
    main()
