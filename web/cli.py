"""The ``skyrelay`` command: ``serve`` runs the relay; ``config`` prints the effective settings; ``admin`` operates one.

Only the standard library is imported at module level: ``serve`` monkey-patches gevent first
thing, before pykka, peewee or any socket user is imported.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EXIT_CONFIG = 2


def _add_setting_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML config file (env SKYRELAY_CONFIG)")
    p.add_argument("--bind", help="HOST:PORT to listen on (env SKYRELAY_BIND; default 0.0.0.0:2470)")
    p.add_argument("--data-dir", help="folder for databases, event log, repo mirror (env SKYRELAY_DATA_DIR)")
    p.add_argument("--database-url", help="sqlite:///PATH or postgresql://... (env DATABASE_URL)")
    p.add_argument("--carstore-database-url", help="repo-mirror metadata database (env CARSTORE_DATABASE_URL)")
    p.add_argument("--plc-url", help="PLC directory URL (env SKYRELAY_PLC_URL)")
    p.add_argument(
        "--allow-insecure-hosts",
        action="store_const",
        const=True,
        help="accept http, ports and loopback hosts: development and tests only",
    )
    p.add_argument(
        "--lenient-sync-validation",
        action="store_const",
        const=True,
        help="accept commits from hosts not yet on Sync 1.1, with a counted warning",
    )
    p.add_argument(
        "--ingest-workers", help="processes for upstream subscribers and verification (0: in the relay process)"
    )
    p.add_argument("--replay-window-hours", help="how long events stay replayable (default 72)")
    p.add_argument("--crawl", dest="crawl_hosts", help="comma-separated hostnames to subscribe to at start")
    p.add_argument("--log-level", help="debug, info, warning or error")
    p.add_argument("--log-format", help="text or json")
    p.add_argument("--metrics-bind", help="HOST:PORT of a separate /metrics listener (default: the main one)")


def _add_fanout_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--upstream", dest="fanout_upstream", help="ws(s):// URL of the relay to follow (required)")
    p.add_argument("--max-consumers", dest="fanout_max_consumers", help="firehose consumers served at once")
    p.add_argument(
        "--unhealthy-after-seconds",
        dest="fanout_unhealthy_after_seconds",
        help="upstream downtime before /xrpc/_health answers 503",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skyrelay",
        description="An atproto relay: subscribes to PDS firehoses, verifies every event, re-serves one firehose.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the relay")
    _add_setting_flags(serve)
    fanout = sub.add_parser("fanout", help="run a fan-out node: re-serve a relay's firehose with its seqs")
    _add_setting_flags(fanout)
    _add_fanout_flags(fanout)
    show = sub.add_parser("config", help="print the effective settings (secrets masked) and exit")
    _add_setting_flags(show)
    from web.admin_cli import add_admin_parser  # standard library only

    add_admin_parser(sub)
    from web.dids_cli import add_dids_parser  # standard library only

    add_dids_parser(sub)
    from web.hosts_pull import add_hosts_parser

    add_hosts_parser(sub)
    return parser


def _settings_from_args(args: argparse.Namespace) -> Any:
    from config import ConfigError, load_settings
    from config.loader import unknown_env_warnings
    from config.settings import FIELD_NAMES

    for warning in unknown_env_warnings():
        print(f"skyrelay: warning: {warning}", file=sys.stderr)
    overrides = {k: v for k, v in vars(args).items() if k in FIELD_NAMES and v is not None}
    try:
        return load_settings(config_file=args.config, overrides=overrides)
    except ConfigError as exc:
        print("skyrelay: invalid configuration:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def _tracing_from_env(settings: Any) -> Any:
    from config import ConfigError
    from config.tracing import load_tracing_config, unknown_otel_warnings

    for warning in unknown_otel_warnings():
        print(f"skyrelay: warning: {warning}", file=sys.stderr)
    try:
        return load_tracing_config(settings)
    except ConfigError as exc:
        print("skyrelay: invalid configuration:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        from gevent import monkey

        monkey.patch_all()
        settings = _settings_from_args(args)
        from config.process_env import prepare_process_environment

        prepare_process_environment(settings)
        tracing_config = _tracing_from_env(settings)
        from web.server import serve

        return serve(settings, tracing_config)
    if args.command == "admin":
        from web.admin_cli import run_admin

        return run_admin(args)
    if args.command == "hosts":
        from web.hosts_pull import run_hosts

        return run_hosts(args)
    if args.command == "dids":
        from web.dids_cli import run_dids

        return run_dids(args)
    if args.command == "fanout":
        from gevent import monkey

        monkey.patch_all()
        settings = _settings_from_args(args)
        if not settings.fanout_upstream:
            print("skyrelay: fanout needs --upstream ws(s)://relay (or SKYRELAY_FANOUT_UPSTREAM)", file=sys.stderr)
            return EXIT_CONFIG
        from web.fanout_server import serve_fanout

        return serve_fanout(settings)
    if args.command == "config":
        settings = _settings_from_args(args)
        print(json.dumps(settings.public_dict(), indent=2))
        return 0
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
