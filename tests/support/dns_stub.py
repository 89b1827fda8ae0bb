"""A tiny DNS server on 127.0.0.1 (UDP) for tests: names answer the addresses a test gives them.

Point the relay at it with ``outbound_dns_server`` (or ``DnsServerResolver(stub.server)``).
Each name has a list of answers; every query (A and AAAA are asked separately, so one look-up
is one A query) moves to the next answer and the last one repeats, which is how a test plays
DNS rebinding: ``stub.set("pds.test", ["127.0.0.1"], ["127.0.0.2"])``. TTL 0. Unknown names
are NXDOMAIN.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from types import TracebackType

import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


class DnsStub:
    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.server = f"127.0.0.1:{self._sock.getsockname()[1]}"
        self._answers: dict[str, list[list[str]]] = {}
        self._served: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        self.lookups: dict[str, int] = {}  # name -> A queries answered
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="dns-stub", daemon=True)
        self._thread.start()

    def set(self, name: str, *answers: list[str]) -> None:
        with self._lock:
            self._answers[name.lower()] = [list(a) for a in answers]

    def _next(self, name: str, rdtype: int) -> list[str] | None:
        with self._lock:
            answers = self._answers.get(name)
            if answers is None:
                return None
            if rdtype == dns.rdatatype.A:  # a look-up starts with A; its AAAA query gets the same answer
                self.lookups[name] = self.lookups.get(name, 0) + 1
                self._served[name] = answers.pop(0) if len(answers) > 1 else answers[0]
            current = self._served.get(name, answers[0])
        version = 4 if rdtype == dns.rdatatype.A else 6
        return [a for a in current if ipaddress.ip_address(a).version == version]

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                data, peer = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                query = dns.message.from_wire(data)
            except Exception:
                continue
            response = dns.message.make_response(query)
            for question in query.question:
                name = question.name.to_text(omit_final_dot=True).lower()
                addresses = self._next(name, question.rdtype)
                if addresses is None:
                    response.set_rcode(dns.rcode.NXDOMAIN)
                elif addresses:
                    rdtype = dns.rdatatype.to_text(question.rdtype)
                    response.answer.append(dns.rrset.from_text(question.name, 0, "IN", rdtype, *addresses))
            self._sock.sendto(response.to_wire(), peer)

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        self._sock.close()

    def __enter__(self) -> DnsStub:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
