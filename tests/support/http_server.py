"""The relay's HTTP server (``web.httpserver``) around a tiny app, in its own process, for tests of the server alone.

Run as ``python -m tests.support.http_server [--nofile N] [--force-max-connections N]``; it
monkey-patches gevent first, serves ``_health`` and ``/metrics`` on 127.0.0.1 (port 0) and
prints ``PORT <n>`` once listening. ``--force-max-connections`` sets the cap after start-up,
past what the file limit allows, so that accept() itself runs out of file descriptors (what
the cap normally prevents). Logs go to stderr.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import logging  # noqa: E402
import resource  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
from flask import Blueprint, Response  # noqa: E402
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest  # noqa: E402

from tests.support.fakes import BlueprintServices  # noqa: E402
from web.app import create_app  # noqa: E402
from web.httpserver import HttpLimits, RelayWSGIServer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nofile", type=int, default=0, help="lower the open-file limit to this")
    parser.add_argument("--force-max-connections", type=int, default=0)
    parser.add_argument("--header-timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if args.nofile:
        resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, args.nofile))
    metrics = Blueprint("metrics", __name__)
    metrics.add_url_rule("/metrics", "metrics", lambda: Response(generate_latest(), mimetype=CONTENT_TYPE_LATEST))
    app = create_app(BlueprintServices(metrics))
    server = RelayWSGIServer(("127.0.0.1", 0), app, limits=HttpLimits(header_timeout_seconds=args.header_timeout))
    if args.force_max_connections:
        server.max_connections = args.force_max_connections
    stop = gevent.event.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(sig, stop.set)
    server.start()
    print(f"PORT {server.server_port}", flush=True)
    stop.wait()
    server.stop(timeout=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
