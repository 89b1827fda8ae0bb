"""Ingest worker processes, seen from the relay process: shard hosts over them, relay their events.

With ``ingest_workers = N > 0`` the relay runs its upstream subscribers and their verification
in N worker processes (``actors.ingest_worker``) so verification uses more than one core. A
new host goes to the worker holding the fewest hosts and stays there for the life of the
relay process (a restarted worker gets its own hosts back), which keeps each host's events
in order; a hash of the name would leave one worker with twice the hosts of another. One
reader greenlet per worker hands received batches to the local sequencer, reading only while
the sequencer has room. A worker that dies is started again with backoff
and given its hosts back; before that the sequencer writes its state behind, so the new
worker resumes every host from the cursor of its last durable event.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import gevent
import gevent.event
import gevent.lock
from prometheus_client.multiprocess import mark_process_dead

from actors import tracing
from actors.backoff import Backoff
from actors.ingest_link import (
    MAX_BATCH_EVENTS,
    LinkClosed,
    decode_cursors,
    decode_events,
    recv_message,
    send_message,
)
from actors.messages import GetTree, MovedHint, PersistBatch, StartHost, StopHost, WriteBehind
from actors.messages_control import ApplyHostLimits, ForgetAccount, RestartHost, unknown_message
from actors.metrics import CHILD_RESTARTS
from config.settings import Settings, settings_to_json

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    sock: socket.socket | None = None
    lock: gevent.lock.RLock = field(default_factory=gevent.lock.RLock)
    reader: gevent.Greenlet | None = None
    tree: gevent.event.AsyncResult | None = None
    backoff: Backoff = field(default_factory=Backoff)
    restarts: int = 0
    state: str = "starting"


class IngestPool:
    """Stands where the in-process ``HostSupervisor`` would: ``tell``, ``ask(GetTree)``, ``stop``."""

    def __init__(self, settings: Settings, sequencer: Any, count: int, *, max_queue: int = 5000) -> None:
        self.settings = settings
        self.sequencer = sequencer
        self.max_queue = max_queue
        self.workers = [_Worker(i) for i in range(count)]
        self.hosts: dict[str, int] = {}
        self.host_counts = [0] * count
        self._stopping = False

    # -- ActorRef-like surface ---------------------------------------------------------------------
    def start(self) -> IngestPool:
        for worker in self.workers:
            self._spawn(worker)
        return self

    def is_alive(self) -> bool:
        return not self._stopping

    def tell(self, message: Any) -> None:
        match message:
            case StartHost():
                index = self.hosts.get(message.hostname)
                if index is None:
                    index = min(range(len(self.workers)), key=self.host_counts.__getitem__)
                    self.hosts[message.hostname] = index
                    self.host_counts[index] += 1
                self._send(self.workers[index], "start_host", message.hostname)
            case StopHost():
                if message.hostname in self.hosts:
                    index = self.hosts.pop(message.hostname)
                    self.host_counts[index] -= 1
                    self._send(self.workers[index], "stop_host", [message.hostname, message.reason])
            case RestartHost():
                if message.hostname in self.hosts:
                    self._send(self.workers[self.hosts[message.hostname]], "restart_host", message.hostname)
            case ApplyHostLimits():
                if message.hostname in self.hosts:
                    payload = [message.hostname, message.account_limit, message.events_per_second,
                               message.events_per_hour, message.events_per_day]  # fmt: skip
                    self._send(self.workers[self.hosts[message.hostname]], "host_limits", payload)
            case ForgetAccount():  # any worker may hold the account (it may have moved between hosts)
                for worker in self.workers:
                    self._send(worker, "forget_account", message.did)
            case _:
                unknown_message("ingest_pool", message)

    def restart_worker(self, index: int) -> bool:
        """Kill worker ``index``; it is started again with its hosts like any dead worker."""
        if not 0 <= index < len(self.workers):
            return False
        proc = self.workers[index].proc
        if proc is not None and proc.poll() is None:
            log.warning("ingest worker restart requested index=%d", index)
            proc.kill()
        return True

    def ask(self, message: Any, timeout: float = 5.0) -> Any:
        if not isinstance(message, GetTree):
            raise TypeError(f"unsupported query {message!r}")
        children = []
        for worker in self.workers:
            node: dict[str, Any] = {"name": f"worker-{worker.index}", "kind": "IngestWorker", "state": worker.state,
                                    "restarts": worker.restarts, "children": []}  # fmt: skip
            if worker.state == "running":
                worker.tree = gevent.event.AsyncResult()
                self._send(worker, "get_tree", None)
                try:
                    node["children"] = [worker.tree.get(timeout=timeout)]
                except gevent.Timeout:
                    node["state"] = "unresponsive"
            children.append(node)
        return {"name": "hosts", "kind": "IngestPool", "state": "running", "children": children}

    def stop(self, block: bool = True, timeout: float = 30.0) -> None:
        self._stopping = True
        for worker in self.workers:
            self._send(worker, "quit", None)
        for worker in self.workers:
            if worker.reader is not None:
                worker.reader.join(timeout=timeout)  # drains the last events and cursors
            if worker.proc is not None:
                try:
                    worker.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    worker.proc.kill()
                    worker.proc.wait()
            if worker.sock is not None:
                worker.sock.close()

    # -- workers ---------------------------------------------------------------------------------
    def _spawn(self, worker: _Worker) -> None:
        ours, theirs = socket.socketpair()
        worker.proc = subprocess.Popen(
            [sys.executable, "-m", "actors.ingest_worker", "--fd", str(theirs.fileno()), "--index", str(worker.index)],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.PIPE,
        )
        theirs.close()
        assert worker.proc.stdin is not None
        worker.proc.stdin.write((settings_to_json(self.settings) + "\n").encode())
        worker.proc.stdin.close()
        worker.sock = ours
        worker.state = "running"
        worker.backoff.started()
        worker.reader = gevent.spawn(self._read, worker)
        for hostname, index in list(self.hosts.items()):
            if index == worker.index:
                self._send(worker, "start_host", hostname)
        log.info("ingest worker spawned index=%d pid=%d", worker.index, worker.proc.pid)

    def _send(self, worker: _Worker, kind: str, payload: Any) -> None:
        if worker.sock is None or worker.state != "running":
            return  # hosts are re-sent when the worker is started again
        try:
            with worker.lock:
                send_message(worker.sock, kind, payload)
        except OSError as exc:
            log.warning("ingest worker unreachable index=%d error=%s", worker.index, exc)

    def _read(self, worker: _Worker) -> None:
        assert worker.sock is not None
        inbox = self.sequencer.actor_inbox
        max_batches = max(1, self.max_queue // MAX_BATCH_EVENTS)  # the inbox holds about max_queue events at most
        try:
            while True:
                kind, payload = recv_message(worker.sock)
                if kind == "events":
                    while inbox.qsize() > max_batches:
                        gevent.sleep(0.002)
                    self.sequencer.tell(PersistBatch(tuple(decode_events(payload))))
                elif kind == "traces":
                    tracing.adopt(payload)
                elif kind == "cursors":
                    for cursor in decode_cursors(payload):
                        self.sequencer.tell(cursor)
                elif kind == "moved":  # wrong_host DIDs, for the spider's moved queue
                    for did in payload:
                        self.sequencer.tell(MovedHint(str(did)))
                elif kind == "tree" and worker.tree is not None:
                    worker.tree.set(payload)
                else:
                    unknown_message("ingest_pool_link", kind)
        except (OSError, LinkClosed):
            pass
        if not self._stopping:
            gevent.spawn(self._restart, worker)

    def _restart(self, worker: _Worker) -> None:
        worker.state = "restarting"
        if worker.proc is not None and worker.proc.poll() is None:
            worker.proc.kill()
        if worker.proc is not None:
            worker.proc.wait()
            log.error("ingest worker died index=%d status=%s", worker.index, worker.proc.returncode)
            mark_process_dead(worker.proc.pid)
        if worker.sock is not None:
            worker.sock.close()
            worker.sock = None
        # everything the dead worker delivered is in the sequencer's inbox: make it durable and
        # write it behind, so the new worker resumes each host right after its last logged event
        self.sequencer.ask(WriteBehind(), timeout=60)
        delay = worker.backoff.next_delay()
        worker.restarts += 1
        CHILD_RESTARTS.labels("ingest_worker").inc()
        gevent.sleep(delay)
        if not self._stopping:
            self._spawn(worker)
