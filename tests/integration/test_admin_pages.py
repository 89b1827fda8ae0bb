"""The admin web pages in a real browser (headless Chromium) against a real relay subprocess with a frame host.

Sign in (a wrong password refused), add a host, change its limits, ban a domain, take an
account down and see the ``#account`` frame on a real firehose client, reverse it, restart an
actor, sign out. A form posted without its CSRF token (plain HTTP, valid session cookie) and a
wrong password are refused with a 4xx and change nothing. Every page is saved as a screenshot
under ``tests/artifacts/screenshots/`` (git-ignored) for a person to look at.
"""

from __future__ import annotations

import html
import http.cookiejar
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websocket
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement

from tests.integration.test_admin_control import PASSWORD, Pds, frames_after, get, ok
from tests.support.browser import chromium, screenshot
from tests.support.procs import FrameHost, RelayProcess, wait_until

UI = "/admin/ui"


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    with chromium() as driver:
        yield driver


def flash(driver: webdriver.Chrome) -> str:
    return " | ".join(e.text for e in driver.find_elements(By.CSS_SELECTOR, ".flash"))


def new_page(driver: webdriver.Chrome, old: WebElement, what: str) -> str:
    """Wait until the page holding ``old`` is replaced and shows a flash; the flash text."""

    def replaced() -> bool:
        try:
            old.tag_name  # noqa: B018 - raises once the page is gone
        except StaleElementReferenceException:
            return bool(driver.find_elements(By.CSS_SELECTOR, ".flash"))
        except WebDriverException as exc:  # caught mid-navigation: the node is leaving its document
            if "does not belong to the document" not in str(exc):
                raise
        return False

    wait_until(replaced, 20, what)
    return flash(driver)


def submit(driver: webdriver.Chrome, form_css: str, **fields: str) -> str:
    """Fill a form's text fields, submit it, and return the flash message of the page it leads to."""
    form = driver.find_element(By.CSS_SELECTOR, form_css)
    for name, value in fields.items():
        box = form.find_element(By.NAME, name)
        box.clear()
        box.send_keys(value)
    old = driver.find_element(By.TAG_NAME, "html")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    return new_page(driver, old, f"the answer to {form_css}")


def click_row_button(driver: webdriver.Chrome, row_css: str, label: str) -> str:
    row = driver.find_element(By.CSS_SELECTOR, row_css)
    [button] = [b for b in row.find_elements(By.TAG_NAME, "button") if b.text == label]
    old = driver.find_element(By.TAG_NAME, "html")
    button.click()
    if label in ("Reverse", "Restart", "Block"):  # these ask for a confirmation first
        driver.switch_to.alert.accept()
    return new_page(driver, old, f"the answer to {label}")


def form_post(relay: RelayProcess, path: str, fields: dict[str, str], cookie: str) -> tuple[int, str]:
    headers = {"Cookie": cookie, "Content-Type": "application/x-www-form-urlencoded"}
    data = urllib.parse.urlencode(fields).encode()
    req = urllib.request.Request(relay.url + path, data=data, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_admin_pages_in_a_browser(tmp_path: Path, plc: Any, host: FrameHost, browser: webdriver.Chrome) -> None:
    pds = Pds(host, plc)
    alice = pds.account()
    env = {"SKYRELAY_ADMIN_PASSWORD": PASSWORD}
    relay = RelayProcess(tmp_path / "relay", database_url=f"sqlite:///{tmp_path / 'relay.sqlite'}", plc_url=plc.url,
                         extra_env=env).start()  # fmt: skip
    d = browser
    try:
        # signed out: every page leads to the sign-in form; a wrong password is refused
        d.get(relay.url + "/admin/")
        assert d.current_url.startswith(relay.url + UI + "/login")
        screenshot(d, "01-login")
        assert submit(d, "#login-form", password="not-the-password-at-all") == "Wrong password."
        assert d.find_elements(By.ID, "password")
        screenshot(d, "02-login-wrong-password")
        submit_login = d.find_element(By.ID, "password")
        submit_login.send_keys(PASSWORD)
        d.find_element(By.CSS_SELECTOR, "#login-form button").click()
        wait_until(lambda: d.find_elements(By.ID, "events-in"), 20, "the dashboard")
        cookie = d.get_cookie("skyrelay_admin")
        assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Lax" and not cookie["secure"]

        # add a host
        d.get(relay.url + UI + "/hosts")
        assert "No upstream host yet" in d.page_source
        assert submit(d, "#add-host", host=host.hostname) == f"Subscribed to {host.hostname}."
        wait_until(lambda: host.status()["subscribers"] == 1, 20, "relay to subscribe")
        pds.commits(alice, n=3)
        assert len(frames_after(relay, 0, 3)) == 3, relay.log()
        d.get(relay.url + UI + "/hosts")
        assert d.find_element(By.CSS_SELECTOR, f'tr[data-host="{host.hostname}"]')
        screenshot(d, "04-hosts")

        # change its limits on the host's page
        d.find_element(By.LINK_TEXT, host.hostname).click()
        answer = submit(d, "#limits-form", repo_limit="1234", per_second="77")
        assert answer == f"Limits of {host.hostname}: 1,234 accounts, 77 events/s.", answer
        [row] = ok(relay, "GET", "/admin/pds/list")
        assert row["RepoLimit"] == 1234 and row["PerSecondEventRate"]["Max"] == 77
        # refused, nothing changed
        assert submit(d, "#limits-form", repo_limit="lots") == "Account limit: 'lots' is not a number"
        assert ok(relay, "GET", "/admin/pds/list")[0]["RepoLimit"] == 1234
        screenshot(d, "05-host")

        # ban a domain; a malformed one is refused with a message
        d.get(relay.url + UI + "/domains")
        assert submit(d, "#ban-domain", domain="spam.example") == "Banned spam.example; 0 host(s) disconnected."
        assert "is not a valid domain name" in submit(d, "#ban-domain", domain="not a domain!")
        assert ok(relay, "GET", "/admin/subs/listDomainBans") == {"banned_domains": ["spam.example"]}
        screenshot(d, "06-domains")

        # take alice down: a firehose client sees #account takendown; then reverse it
        wait_until(lambda: get(f"{relay.url}/xrpc/com.atproto.sync.getRepo?did={alice.did}")[0] == 200, 20,
                   "alice's repo to be served")  # fmt: skip
        last = frames_after(relay, 0, 3)[-1][1]["seq"]
        d.get(relay.url + UI + "/takedowns")
        assert "No account is taken down" in d.page_source
        assert submit(d, "#take-down", did=alice.did).startswith(f"Took down {alice.did} (announced at seq ")
        [(header, body)] = frames_after(relay, last, 1)
        assert header["t"] == "#account" and body["did"] == alice.did
        assert body["active"] is False and body["status"] == "takendown"
        screenshot(d, "07-takedowns")
        assert click_row_button(d, f'tr[data-did="{alice.did}"]', "Reverse").startswith("Reversed the takedown")
        [(header, body)] = frames_after(relay, last + 1, 1)
        assert header["t"] == "#account" and body["did"] == alice.did and body["active"] is True
        assert ok(relay, "GET", "/admin/repo/takedowns")["dids"] == []

        # consumers: a live firehose client is listed
        url = f"{relay.ws_url}/xrpc/com.atproto.sync.subscribeRepos?cursor=0"
        ws = websocket.create_connection(url, timeout=10, header=["User-Agent: feed-generator/1.0"])
        try:
            ws.recv()
            d.get(relay.url + UI + "/consumers")
            row = d.find_element(By.CSS_SELECTOR, "#consumers tbody tr").text
            assert "127.0.0.1" in row and "feed-generator/1.0" in row, row
            screenshot(d, "08-consumers")
        finally:
            ws.close()

        # restart an actor from the tree
        d.get(relay.url + UI + "/actors")
        screenshot(d, "09-actors")
        assert click_row_button(d, 'tr[data-actor="identity"]', "Restart") == "Restarting identity."

        def identity_running() -> bool:
            tree = ok(relay, "GET", "/admin/tree")
            return any(c["name"] == "identity" and c["state"] == "running" for c in tree["children"])

        wait_until(identity_running, 20, "identity to run again")

        # settings in effect, secrets masked
        d.get(relay.url + UI + "/settings")
        assert "admin_password" in d.page_source and PASSWORD not in d.page_source
        screenshot(d, "10-settings")

        # the dashboard, seen twice so that it has rates
        d.get(relay.url + UI + "/")
        d.get(relay.url + UI + "/")
        assert d.find_element(By.ID, "last-seq").text == f"{last + 2:,}"
        screenshot(d, "03-dashboard")

        # a form without its CSRF token (or with a wrong one) is refused, though the session is valid
        session = f"skyrelay_admin={cookie['value']}"
        for fields in ({"domain": "evil.example"}, {"domain": "evil.example", "csrf_token": "forged"}):
            status, page = form_post(relay, UI + "/domains/ban", fields, session)
            assert status == 400 and "did not come from this site" in page
        assert ok(relay, "GET", "/admin/subs/listDomainBans") == {"banned_domains": ["spam.example"]}
        # ... while the same session with the token of its pages is accepted
        token = re.search(r'name="csrf_token" value="([^"]+)"', d.page_source)
        assert token is not None
        status, _ = form_post(relay, UI + "/domains/unban", {"domain": "spam.example", "csrf_token": token[1]}, session)
        assert status == 200 and ok(relay, "GET", "/admin/subs/listDomainBans") == {"banned_domains": []}
        # a wrong password over plain HTTP: 401, and no session cookie that opens the pages
        status, page = form_post(relay, UI + "/login", {"password": "wrong-wrong-wrong", "csrf_token": token[1]},
                                 session)  # fmt: skip
        assert status == 401 and "Wrong password." in page

        # sign out: the pages ask for the password again
        d.find_element(By.CSS_SELECTOR, ".signout button").click()
        wait_until(lambda: "Signed out." in flash(d), 20, "signing out")
        d.get(relay.url + UI + "/hosts")
        assert d.current_url.startswith(relay.url + UI + "/login")
    finally:
        relay.stop()


class PageSession:
    """The admin pages over plain HTTP: a cookie jar, and each form posted with the token of the page it is on."""

    def __init__(self, relay: RelayProcess) -> None:
        self.relay = relay
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))

    def get(self, path: str) -> str:
        with self.opener.open(self.relay.url + path, timeout=30) as resp:
            return str(resp.read().decode())

    def post(self, page: str, action: str, **fields: str) -> str:
        """Post ``fields`` to ``action`` with the CSRF token of ``page``; the flash text of the page it leads to."""
        token = re.search(r'name="csrf_token" value="([^"]+)"', self.get(page))
        assert token is not None
        data = urllib.parse.urlencode({**fields, "csrf_token": token[1]}).encode()
        req = urllib.request.Request(self.relay.url + action, data=data, headers={"Referer": self.relay.url + page})
        with self.opener.open(req, timeout=30) as resp:
            body = resp.read().decode()
        return " | ".join(html.unescape(m) for m in re.findall(r'class="flash flash-\w+"[^>]*>([^<]*)<', body))


def test_admin_pages_with_two_ingest_workers(tmp_path: Path, plc: Any, host: FrameHost) -> None:
    """Block / unblock, takedown and a worker restart from the pages reach the ingest worker processes."""
    pds = Pds(host, plc)
    alice = pds.account()
    env = {"SKYRELAY_ADMIN_PASSWORD": PASSWORD, "SKYRELAY_INGEST_WORKERS": "2",
           "SKYRELAY_ENUMERATE_SCAN_SECONDS": "0.5"}  # fmt: skip
    relay = RelayProcess(tmp_path / "relay", database_url=f"sqlite:///{tmp_path / 'relay.sqlite'}", plc_url=plc.url,
                         extra_env=env).start()  # fmt: skip
    try:
        s = PageSession(relay)
        assert s.post(UI + "/login", UI + "/login", password=PASSWORD) == ""
        assert s.post(UI + "/hosts", UI + "/hosts/add", host=host.hostname) == f"Subscribed to {host.hostname}."
        wait_until(lambda: host.status()["subscribers"] == 1, 20, "a worker to subscribe")
        pds.commits(alice, n=2)
        assert len(frames_after(relay, 0, 2)) == 2, relay.log()
        wait_until(lambda: ">2</div>" in s.get(UI + "/").replace(" ", ""), 20, "the dashboard's last seq")
        assert f'data-host="{host.hostname}"' in s.get(UI + "/hosts?status=connected")

        page = f"{UI}/host?name={host.hostname}"
        # the listRepos walk's progress (this frame host has no listRepos: the walk is listing, 0 found)
        wait_until(lambda: "listing" in s.get(page) and "listing" in s.get(UI + "/hosts"), 20, "the walk's progress")
        assert "Accounts listed" in s.get(page)
        assert s.post(page, UI + "/hosts/block", host=host.hostname).startswith(f"Blocked {host.hostname}")
        wait_until(lambda: host.status()["subscribers"] == 0, 20, "the worker to disconnect")
        assert 'badge bad">blocked' in s.get(UI + "/hosts?status=blocked")
        assert s.post(page, UI + "/hosts/unblock", host=host.hostname) == f"Unblocked {host.hostname}."
        wait_until(lambda: host.status()["subscribers"] == 1, 20, "a worker to subscribe again")

        wait_until(lambda: get(f"{relay.url}/xrpc/com.atproto.sync.getRepo?did={alice.did}")[0] == 200, 20,
                   "alice's repo to be served")  # fmt: skip
        assert s.post(UI + "/takedowns", UI + "/takedowns/add", did=alice.did).startswith("Took down")
        [(header, body)] = frames_after(relay, 2, 1)
        assert header["t"] == "#account" and body["status"] == "takendown"
        pds.commits(alice, n=1)  # dropped in the sequencer whichever worker verified it
        wait_until(lambda: relay.metric("skyrelay_events_dropped_total", reason="account_takendown") >= 1, 20,
                   "alice's event to be dropped")  # fmt: skip

        restarts = relay.metric("skyrelay_actor_restarts_total")
        assert s.post(UI + "/actors", UI + "/actors/restart", name="worker-0") == "Restarting worker-0."
        wait_until(lambda: relay.metric("skyrelay_actor_restarts_total") > restarts, 30, "worker-0 to restart")
        assert s.post(UI + "/actors", UI + "/actors/restart", name="sequencer").endswith(
            "restart the relay process instead"
        )
    finally:
        assert relay.stop() == 0, relay.log()
