"""Accepted HTTP connections have TCP_NODELAY set before they are served (small answers are not held back by Nagle)."""

from __future__ import annotations

import socket
import time
from typing import Any

import gevent
import gevent.pywsgi
import gevent.socket
import pytest

from web.httpserver import RelayWSGIServer


def test_accepted_connections_have_nodelay(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []

    def served(self: Any, sock: Any, address: Any) -> None:  # what gevent's handler would get
        seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    monkeypatch.setattr(gevent.pywsgi.WSGIServer, "handle", served)
    server = RelayWSGIServer(("127.0.0.1", 0), lambda environ, start_response: [])
    server.start()
    try:
        client = gevent.socket.create_connection(("127.0.0.1", server.server_port))
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            gevent.sleep(0.01)
        client.close()
    finally:
        server.stop()
    assert seen and seen[0] != 0
