"""The admin web pages under ``/admin/ui/``: server-rendered views and forms over ``actors.relay_api.Relay``.

Handlers only translate: they read the form, call one ``Relay`` operation, flash its outcome
and redirect (POST, then redirect, then GET). A ``ControlError`` becomes an error flash; no
handler touches the store or the supervisor. Off (404) without an admin password. Sign-in,
cookie and CSRF: ``web.admin_session``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, flash, redirect, render_template, request, session, url_for
from werkzeug.wrappers import Response

from actors.control_errors import ControlError
from actors.relay_views import HOST_FILTERS, HOST_SORTS
from config.settings import Settings
from web.admin_auth import AdminAuthError, AdminGuard
from web.admin_session import FILTERS, configure_sessions, csrf_ok, csrf_token, sign_in, signed_in

log = logging.getLogger(__name__)
PREFIX = "/admin/ui"
RESTARTABLE = ("identity", "mirror")


def _int(raw: str | None, default: int) -> int:
    return int(raw) if raw and raw.isascii() and raw.isdigit() and len(raw) < 10 else default


def _number(raw: str | None, label: str) -> int | float | None:
    """A form number ("" is none); a non-number is passed on as text for the Relay to refuse."""
    text = (raw or "").strip().replace(",", "").replace("_", "")
    if not text:
        return None
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        raise ControlError("InvalidRequest", f"{label}: {text[:40]!r} is not a number") from None


def admin_pages_blueprint(*, relay: Any, guard: AdminGuard, settings: Settings) -> Blueprint:
    bp = Blueprint("admin_pages", __name__, template_folder="templates", static_folder="static",
                   static_url_path="/static", url_prefix=PREFIX)  # fmt: skip
    bp.record_once(lambda state: configure_sessions(state.app, settings))
    for name, fn in FILTERS.items():
        bp.add_app_template_filter(fn, name)

    @bp.context_processor
    def _context() -> dict[str, Any]:
        return {"csrf_token": csrf_token, "nav_active": request.endpoint or ""}

    @bp.before_request
    def _gate() -> Response | tuple[str, int] | None:
        if not guard.enabled:
            return "the admin pages are disabled (no admin password set)\n", 404
        if request.method == "POST" and not csrf_ok(request):
            log.info("admin form refused: bad csrf token remote=%s path=%s", request.remote_addr, request.path)
            return render_template("admin/error.html", message="This form has expired or did not come "
                                   "from this site. Go back, reload the page and try again."), 400  # fmt: skip
        if request.endpoint in ("admin_pages.login", "admin_pages.static"):
            return None
        if not signed_in(settings.admin_session_hours):
            return redirect(url_for("admin_pages.login", next=request.full_path if request.method == "GET" else None))
        return None

    @bp.errorhandler(ControlError)
    def _refused(exc: ControlError) -> Response:
        flash(exc.message, "error")
        return _back()

    def _back() -> Response:
        """To the form's ``next`` or the page the form was on (only ever one of our pages)."""
        for candidate in (request.form.get("next"), request.referrer):
            parts = urlsplit(candidate or "")
            if parts.path.startswith(PREFIX + "/") and (not parts.netloc or parts.netloc == request.host):
                return redirect(parts.path + ("?" + parts.query if parts.query else ""), 303)
        return redirect(url_for(".dashboard"), 303)

    def _done(message: str) -> Response:
        flash(message, "ok")
        return _back()

    # -- sign-in -----------------------------------------------------------------------------
    @bp.route("/login", methods=["GET", "POST"])
    def login() -> Any:
        if request.method == "GET":
            return render_template("admin/login.html")
        try:
            guard.check(request.remote_addr or "", "Bearer " + request.form.get("password", ""))
        except AdminAuthError as exc:
            message = "Wrong password." if exc.status == 401 else exc.message.capitalize() + "."
            flash(message, "error")
            retry = {
                k: v for k, v in exc.headers.items() if k == "Retry-After"
            }  # no WWW-Authenticate: no browser prompt
            return render_template("admin/login.html"), exc.status, retry
        sign_in()
        log.info("admin signed in remote=%s", request.remote_addr)
        target = request.args.get("next") or ""
        return redirect(target if target.startswith(PREFIX + "/") else url_for(".dashboard"), 303)

    @bp.post("/logout")
    def logout() -> Response:
        session.clear()
        flash("Signed out.", "ok")
        return redirect(url_for(".login"), 303)

    # -- pages -------------------------------------------------------------------------------
    @bp.get("/")
    def dashboard() -> str:
        return render_template("admin/dashboard.html", d=relay.dashboard())

    @bp.get("/hosts")
    def hosts() -> str:
        args = request.args
        sort = args.get("sort", "hostname") if args.get("sort") in HOST_SORTS else "hostname"
        status = args.get("status", "all") if args.get("status") in HOST_FILTERS else "all"
        table = relay.host_table(query=args.get("q", "")[:200], status=status, sort=sort,
                                 descending=args.get("desc") == "1", page=_int(args.get("page"), 1),
                                 per_page=_int(args.get("per_page"), 50))  # fmt: skip
        return render_template("admin/hosts.html", t=table, sort=sort, status=status, q=args.get("q", ""),
                               desc=args.get("desc") == "1", sorts=HOST_SORTS, filters=HOST_FILTERS)  # fmt: skip

    @bp.get("/host")
    def host() -> str:
        found = relay.host_detail(request.args.get("name", ""))
        if found is None:
            raise ControlError("HostNotFound", f"host {request.args.get('name', '')[:100]} is not known to this relay")
        return render_template("admin/host.html", h=found)

    @bp.get("/domains")
    def domains() -> str:
        return render_template("admin/domains.html", bans=relay.list_domain_bans(), trusted=relay.trusted_domains())

    @bp.get("/takedowns")
    def takedowns() -> str:
        dids, cursor = relay.list_takedowns(_int(request.args.get("cursor"), 0), 100)
        return render_template("admin/takedowns.html", dids=dids, cursor=cursor)

    @bp.get("/consumers")
    def consumers() -> str:
        return render_template("admin/consumers.html", consumers=relay.consumers())

    @bp.get("/actors")
    def actors() -> str:
        return render_template("admin/actors.html", tree=relay.tree(), restartable=RESTARTABLE)

    @bp.get("/settings")
    def settings_page() -> str:
        return render_template("admin/settings.html", values=settings.public_dict(),
                               crawl_enabled=relay.crawl_enabled(), per_day=relay.per_day_limit())  # fmt: skip

    # -- actions (POST, CSRF-checked in _gate) ------------------------------------------------
    def action(path: str) -> Callable[[Callable[[], Response]], Callable[[], Response]]:
        return lambda fn: bp.post(path, endpoint=fn.__name__)(fn)

    @action("/hosts/add")
    def host_add() -> Response:
        return _done(f"Subscribed to {relay.request_crawl(request.form.get('host', ''), admin=True)}.")

    @action("/hosts/block")
    def host_block() -> Response:
        relay.block_host(request.form.get("host", ""))
        return _done(f"Blocked {request.form['host']}: disconnected, and it stays so until unblocked.")

    @action("/hosts/unblock")
    def host_unblock() -> Response:
        relay.unblock_host(request.form.get("host", ""))
        return _done(f"Unblocked {request.form['host']}.")

    @action("/hosts/kill")
    def host_kill() -> Response:
        relay.kill_upstream(request.form.get("host", ""))
        return _done(f"Disconnected {request.form['host']}.")

    @action("/hosts/resync")
    def host_resync() -> Response:
        queued = relay.resync_host(request.form.get("host", ""))
        return _done(f"Queued a re-sync of {queued:,} accounts of {request.form['host']}.")

    @action("/hosts/limits")
    def host_limits() -> Response:
        form = request.form
        out = relay.change_limits(form.get("host", ""), repo_limit=_number(form.get("repo_limit"), "Account limit"),
                                  per_second=_number(form.get("per_second"), "Events per second"),
                                  per_hour=_number(form.get("per_hour"), "Events per hour"),
                                  per_day=_number(form.get("per_day"), "Events per day"))  # fmt: skip
        released = f" {out['released']:,} throttled account(s) released." if out.get("released") else ""
        return _done(f"Limits of {out['host']}: {out['repo_limit']:,} accounts, {out['per_second']:,g} events/s."
                     + released)  # fmt: skip

    @action("/domains/ban")
    def domain_ban() -> Response:
        stopped = relay.ban_domain(request.form.get("domain", ""))
        return _done(f"Banned {request.form['domain'].strip().lower()}; {len(stopped)} host(s) disconnected.")

    @action("/domains/unban")
    def domain_unban() -> Response:
        relay.unban_domain(request.form.get("domain", ""))
        return _done(f"Unbanned {request.form['domain']}.")

    @action("/takedowns/add")
    def takedown_add() -> Response:
        did = request.form.get("did", "").strip()
        seq = relay.take_down(did)
        return _done(f"Took down {did} (announced at seq {seq:,}).")

    @action("/takedowns/reverse")
    def takedown_reverse() -> Response:
        did = request.form.get("did", "").strip()
        seq = relay.reverse_takedown(did)
        return _done(f"Reversed the takedown of {did} (announced at seq {seq:,}).")

    @action("/actors/restart")
    def actor_restart() -> Response:
        return _done(f"Restarting {relay.restart_actor(request.form.get('name', ''))}.")

    @action("/crawl")
    def crawl_policy() -> Response:
        relay.set_crawl_enabled(request.form.get("enabled") == "true")
        relay.set_per_day_limit(_number(request.form.get("per_day"), "New hosts per day"))
        return _done("Public requestCrawl policy saved.")

    return bp


def admin_root_blueprint() -> Blueprint:
    """``/admin`` and ``/admin/`` lead to the pages (the JSON API keeps its own paths)."""
    bp = Blueprint("admin_root", __name__)

    @bp.get("/admin")
    @bp.get("/admin/")
    def root() -> Response:
        return redirect(PREFIX + "/", 302)

    return bp
