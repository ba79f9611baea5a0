"""Alias tokens of the sandbox over real HTTP (xnat-api.md 1.6): issue, use, validate,
invalidate, show, per-user rights, expiry and persistence across a restart.
"""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

import pytest
import requests

from hpcbridge.sandbox import AuthSettings, SandboxServer

T = 10
SECRET = re.compile(r"^[A-Za-z0-9]{64}$")
TOKENS = "/data/services/tokens"


@pytest.fixture()
def sb(make_sandbox) -> SandboxServer:
    server = make_sandbox(seed=None)
    server.add_user("bob", "pw")
    return server


def get(server: SandboxServer, path: str, auth: tuple[str, str] | None = None) -> requests.Response:
    return requests.get(server.url + path, auth=auth or (server.user, server.password), timeout=T)


def issue(server: SandboxServer, auth: tuple[str, str] | None = None, path: str = "/issue") -> dict:
    resp = get(server, TOKENS + path, auth)
    assert resp.status_code == 200, resp.text
    return resp.json()


def whoami(server: SandboxServer, auth: tuple[str, str]) -> requests.Response:
    return requests.get(server.url + "/data/auth", auth=auth, timeout=T)


def test_issue_returns_token_json_with_epoch_ms_numbers(sb):
    before = int(time.time() * 1000)
    resp = get(sb, TOKENS + "/issue")
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("application/json")
    token = resp.json()
    assert str(uuid.UUID(token["alias"])) == token["alias"]
    assert SECRET.match(token["secret"])
    assert token["xdatUserId"] == "admin"
    for key in ("created", "estimatedExpirationTime"):
        assert type(token[key]) is int, key  # numbers, not strings (and not booleans)
    assert before - 1000 <= token["created"] <= time.time() * 1000 + 1000
    assert token["estimatedExpirationTime"] - token["created"] == 2 * 24 * 3600 * 1000

    other = issue(sb)
    assert other["alias"] != token["alias"] and other["secret"] != token["secret"]


def test_issue_needs_authentication(sb):
    resp = requests.get(sb.url + TOKENS + "/issue", timeout=T)
    assert resp.status_code == 401


def test_token_works_as_basic_credentials_and_for_jsession(sb):
    token = issue(sb)
    creds = (token["alias"], token["secret"])
    me = whoami(sb, creds)
    assert me.status_code == 200
    assert me.text == "User 'admin' is logged in"

    resp = requests.post(sb.url + "/data/JSESSION", auth=creds, timeout=T)
    assert resp.status_code == 200
    assert re.match(r"^[0-9A-F]{32}$", resp.text)
    by_cookie = requests.get(sb.url + "/data/auth", cookies={"JSESSIONID": resp.text}, timeout=T)
    assert by_cookie.status_code == 200
    assert by_cookie.text == "User 'admin' is logged in"

    last = "a" if token["secret"][-1] != "a" else "b"
    assert whoami(sb, (token["alias"], token["secret"][:-1] + last)).status_code == 401


def test_validate_token(sb):
    token = issue(sb)
    good = get(sb, f"{TOKENS}/validate/{token['alias']}/{token['secret']}")
    assert good.status_code == 200
    assert good.json() == {"valid": "admin"}

    wrong = get(sb, f"{TOKENS}/validate/{token['alias']}/{'x' * 64}")
    assert wrong.status_code == 200
    assert wrong.json() == {}

    unknown = get(sb, f"{TOKENS}/validate/{uuid.uuid4()}/{token['secret']}")
    assert unknown.status_code == 404
    not_uuid = get(sb, f"{TOKENS}/validate/not-an-alias/{token['secret']}")
    assert not_uuid.status_code == 404


def test_invalidate_token_then_it_is_refused(sb):
    token = issue(sb)
    keep = issue(sb)
    creds = (token["alias"], token["secret"])
    assert whoami(sb, creds).status_code == 200

    resp = get(sb, f"{TOKENS}/invalidate/{token['alias']}/{token['secret']}")
    assert resp.status_code == 200
    assert resp.json() == {"result": "OK"}

    assert whoami(sb, creds).status_code == 401
    assert get(sb, f"{TOKENS}/validate/{token['alias']}/{token['secret']}").status_code == 404
    shown = [t["alias"] for t in get(sb, TOKENS + "/show").json()]
    assert token["alias"] not in shown and keep["alias"] in shown
    assert whoami(sb, (keep["alias"], keep["secret"])).status_code == 200


def test_show_lists_the_users_tokens(sb):
    mine = {issue(sb)["alias"], issue(sb)["alias"]}
    bobs = issue(sb, ("bob", "pw"))["alias"]

    resp = get(sb, TOKENS + "/show")
    assert resp.status_code == 200
    listed = resp.json()
    assert isinstance(listed, list)
    assert {t["alias"] for t in listed} == mine
    assert all(t["xdatUserId"] == "admin" for t in listed)

    as_admin = get(sb, TOKENS + "/show/user/bob").json()
    assert [t["alias"] for t in as_admin] == [bobs]
    assert get(sb, TOKENS + "/show/user/admin", ("bob", "pw")).status_code == 403


def test_admin_issues_token_for_another_user(sb):
    token = issue(sb, path="/issue/user/bob")
    assert token["xdatUserId"] == "bob"
    me = whoami(sb, (token["alias"], token["secret"]))
    assert me.status_code == 200
    assert me.text == "User 'bob' is logged in"


def test_non_admin_cannot_issue_for_another_user(sb):
    resp = get(sb, TOKENS + "/issue/user/admin", ("bob", "pw"))
    assert resp.status_code == 403
    assert "admin" in resp.text.lower()
    own = issue(sb, ("bob", "pw"))  # but may issue their own
    assert own["xdatUserId"] == "bob"


def test_non_admin_cannot_touch_another_users_token(sb):
    token = issue(sb)
    bob = ("bob", "pw")
    for op in ("validate", "invalidate"):
        resp = get(sb, f"{TOKENS}/{op}/{token['alias']}/{token['secret']}", bob)
        assert resp.status_code == 403, op
    assert whoami(sb, (token["alias"], token["secret"])).status_code == 200  # still valid

    own = issue(sb, bob)
    assert get(sb, f"{TOKENS}/validate/{own['alias']}/{own['secret']}", bob).json() == {
        "valid": "bob"
    }
    assert get(sb, f"{TOKENS}/invalidate/{own['alias']}/{own['secret']}", bob).json() == {
        "result": "OK"
    }


def test_token_expires(make_sandbox):
    sb = make_sandbox(seed=None, auth=AuthSettings(token_lifetime=0.5))
    token = issue(sb)
    assert token["estimatedExpirationTime"] - token["created"] == 500
    creds = (token["alias"], token["secret"])
    assert whoami(sb, creds).status_code == 200
    time.sleep(1.0)
    assert whoami(sb, creds).status_code == 401
    assert whoami(sb, (sb.user, sb.password)).status_code == 200  # the user is not locked out


def test_tokens_survive_a_restart_but_sessions_do_not(tmp_path: Path):
    data = tmp_path / "sandbox-data"
    with SandboxServer(data, seed=None) as first:
        token = issue(first)
        session = requests.post(
            first.url + "/data/JSESSION", auth=(first.user, first.password), timeout=T
        ).text
        assert (
            requests.get(
                first.url + "/data/auth", cookies={"JSESSIONID": session}, timeout=T
            ).status_code
            == 200
        )

    with SandboxServer(data, seed=None) as second:
        me = whoami(second, (token["alias"], token["secret"]))
        assert me.status_code == 200
        assert me.text == "User 'admin' is logged in"
        assert get(second, f"{TOKENS}/validate/{token['alias']}/{token['secret']}").json() == {
            "valid": "admin"
        }
        old = requests.get(second.url + "/data/auth", cookies={"JSESSIONID": session}, timeout=T)
        assert old.status_code == 401
