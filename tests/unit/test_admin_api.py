"""The operator API: basic auth, disabled without a password, resync requests reach the mirror."""

from __future__ import annotations

import base64

from actors.messages_mirror import RequestResync
from tests.support.fakes import BlueprintServices, Recorder
from web.admin_api import admin_blueprint
from web.app import create_app

DID = "did:plc:ewvi7nxzyoun6zhxrhs64oiz"


def auth(password: str, user: str = "admin") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_resync_requires_the_admin_password_and_reaches_the_mirror() -> None:
    mirror = Recorder()
    client = create_app(
        BlueprintServices(admin_blueprint(password="s3cret", mirror=mirror, tree=lambda: {"name": "relay"}))
    ).test_client()
    url = "/admin/repo/resync"
    assert client.post(url, json={"did": DID}).status_code == 401
    assert client.post(url, json={"did": DID}, headers=auth("wrong")).status_code == 401
    assert client.post(url, json={"did": DID}, headers=auth("s3cret", "root")).status_code == 401
    bad = client.post(url, json={"did": "not a did"}, headers=auth("s3cret"))
    assert bad.status_code == 400 and bad.json is not None and bad.json["error"] == "InvalidRequest"
    assert mirror.told == []
    ok = client.post(url, json={"did": DID}, headers=auth("s3cret"))
    assert ok.status_code == 200 and ok.json == {"did": DID, "queued": True}
    assert mirror.told == [RequestResync(DID, "admin")]
    tree = client.get("/admin/tree", headers=auth("s3cret"))
    assert tree.status_code == 200 and tree.json == {"name": "relay"}


def test_admin_api_is_off_without_a_password() -> None:
    client = create_app(BlueprintServices(admin_blueprint(password="", mirror=Recorder()))).test_client()
    resp = client.post("/admin/repo/resync", json={"did": DID}, headers=auth(""))
    assert resp.status_code == 404 and resp.json is not None and resp.json["error"] == "NotFound"
