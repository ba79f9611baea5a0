"""The sandbox's authentication over real HTTP: Basic, sessions, form login, caps, lockout.

Each test that counts sessions or fails logins runs on a fresh, unseeded sandbox of its own, so
that the shared demo sandbox never gets locked or filled with sessions (xnat-api.md section 1).
"""

from __future__ import annotations

import re
import time

import pytest
import requests

from hpcbridge.sandbox import AuthSettings, SandboxServer

T = 10  # seconds; every request is bounded
SESSION_ID = re.compile(r"^[0-9A-F]{32}$")
BROWSER_UA = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Firefox/120.0"
XNATPY_UA = "xnatpy/0.8.1 (Linux/6.1; python/3.11; requests/2.31)"


@pytest.fixture()
def sb(make_sandbox) -> SandboxServer:
    """A fresh unseeded sandbox (no archive is needed to test authentication)."""
    return make_sandbox(seed=None)


def set_cookies(resp: requests.Response) -> list[str]:
    """The raw Set-Cookie header values of a response."""
    return resp.raw.headers.getlist("Set-Cookie")


def cookie_line(resp: requests.Response, name: str) -> str | None:
    return next((c for c in set_cookies(resp) if c.startswith(name + "=")), None)


def login(server: SandboxServer, user: str | None = None, password: str | None = None) -> str:
    """Open a session with POST /data/JSESSION and Basic auth; return its id."""
    resp = requests.post(
        server.url + "/data/JSESSION",
        auth=(user or server.user, password or server.password),
        timeout=T,
    )
    assert resp.status_code == 200, resp.text
    return resp.text


def stats(server: SandboxServer, sid: str) -> dict:
    resp = requests.get(server.url + "/sandbox/stats", cookies={"JSESSIONID": sid}, timeout=T)
    assert resp.status_code == 200, resp.text
    return resp.json()


def whoami(server: SandboxServer, sid: str) -> int:
    resp = requests.get(server.url + "/data/auth", cookies={"JSESSIONID": sid}, timeout=T)
    return resp.status_code


# -- HTTP Basic -----------------------------------------------------------------------------------
def test_basic_login_sets_httponly_session_cookie_and_expiration_cookie(sb):
    before = time.time() * 1000
    resp = requests.get(sb.url + "/data/auth", auth=(sb.user, sb.password), timeout=T)
    assert resp.status_code == 200
    assert resp.text == "User 'admin' is logged in"

    jsession = cookie_line(resp, "JSESSIONID")
    assert jsession is not None, set_cookies(resp)
    attrs = [a.strip() for a in jsession.split(";")]
    assert SESSION_ID.match(attrs[0].split("=", 1)[1])
    assert "Path=/" in attrs and "HttpOnly" in attrs

    expiration = cookie_line(resp, "SESSION_EXPIRATION_TIME")
    assert expiration is not None, set_cookies(resp)
    value = expiration.split(";")[0].split("=", 1)[1].strip('"')
    stamp, timeout_ms = (int(v) for v in value.split(","))
    assert timeout_ms == 900_000  # XNAT's default 15 minutes
    assert before - 1000 <= stamp <= time.time() * 1000 + 1000
    assert "Path=/" in expiration


def test_each_cookieless_basic_request_opens_a_new_session(sb):
    admin_sid = login(sb)
    created = stats(sb, admin_sid)["sessions_created"]

    ids = set()
    for _ in range(3):
        resp = requests.get(sb.url + "/data/auth", auth=(sb.user, sb.password), timeout=T)
        assert resp.status_code == 200
        ids.add(resp.cookies["JSESSIONID"])
    assert len(ids) == 3
    assert stats(sb, admin_sid)["sessions_created"] == created + 3


def test_basic_request_with_session_cookie_opens_no_new_session(sb):
    admin_sid = login(sb)
    with requests.Session() as http:
        first = http.get(sb.url + "/data/auth", auth=(sb.user, sb.password), timeout=T)
        assert first.status_code == 200
        created = stats(sb, admin_sid)["sessions_created"]
        for _ in range(3):
            again = http.get(sb.url + "/data/auth", auth=(sb.user, sb.password), timeout=T)
            assert again.status_code == 200
            assert cookie_line(again, "JSESSIONID") is None  # the session is kept, not replaced
        assert http.cookies["JSESSIONID"] == first.cookies["JSESSIONID"]
    assert stats(sb, admin_sid)["sessions_created"] == created


@pytest.mark.parametrize("user, password", [("admin", "wrong"), ("nobody", "admin"), ("admin", "")])
def test_bad_basic_credentials_answer_401_tomcat_page(sb, user, password):
    resp = requests.get(sb.url + "/data/projects", auth=(user, password), timeout=T)
    assert resp.status_code == 401
    assert resp.headers["Content-Type"].startswith("text/html")
    assert resp.text.lower().startswith("<!doctype html>")
    assert "HTTP Status 401 \u2013 Unauthorized" in resp.text  # decodes as the charset says
    assert "login attempt failed" in resp.text
    assert cookie_line(resp, "JSESSIONID") is None


@pytest.mark.parametrize(
    "path",
    ["/data/projects", "/REST/projects", "/data/JSESSION", "/xapi/schemas", "/data/nonsense"],
)
@pytest.mark.parametrize("agent", [None, XNATPY_UA, "curl/8.5.0"])
def test_no_credentials_from_a_script_answers_401_basic_challenge(demo_sandbox, path, agent):
    headers = {"User-Agent": agent} if agent else {}
    resp = requests.get(demo_sandbox.url + path, headers=headers, timeout=T, allow_redirects=False)
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"].startswith("Basic realm=")


def test_no_credentials_from_a_browser_redirects_to_login_page(demo_sandbox):
    headers = {"User-Agent": BROWSER_UA}
    resp = requests.get(
        demo_sandbox.url + "/data/projects", headers=headers, timeout=T, allow_redirects=False
    )
    assert resp.status_code == 302
    assert resp.headers["Location"].endswith("/app/template/Login.vm")

    followed = requests.get(demo_sandbox.url + "/data/projects", headers=headers, timeout=T)
    assert [r.status_code for r in followed.history] == [302]
    assert followed.status_code == 200
    assert followed.headers["Content-Type"].startswith("text/html")
    assert "<form" in followed.text and 'type="password"' in followed.text


def test_xnat_desktop_client_is_never_interactive(demo_sandbox):
    headers = {"User-Agent": "Mozilla/5.0 XNATDesktopClient/1.0"}
    resp = requests.get(
        demo_sandbox.url + "/data/projects", headers=headers, timeout=T, allow_redirects=False
    )
    assert resp.status_code == 401


def test_provider_prefixed_username_logs_in(sb):
    resp = requests.get(sb.url + "/data/auth", auth=("localdb/admin", sb.password), timeout=T)
    assert resp.status_code == 200
    assert resp.text == "User 'admin' is logged in"
    bad = requests.get(sb.url + "/data/auth", auth=("localdb/admin", "wrong"), timeout=T)
    assert bad.status_code == 401


# -- /data/JSESSION -------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", ["/data", "/REST"])
def test_jsession_post_and_get_return_the_session_id(sb, prefix):
    with requests.Session() as http:
        posted = http.post(sb.url + prefix + "/JSESSION", auth=(sb.user, sb.password), timeout=T)
        assert posted.status_code == 200
        assert posted.headers["Content-Type"].startswith("text/plain")
        assert SESSION_ID.match(posted.text), posted.text
        assert http.cookies["JSESSIONID"] == posted.text

        got = http.get(sb.url + prefix + "/JSESSION", timeout=T)  # cookie only, no credentials
        assert got.status_code == 200
        assert got.text == posted.text

        csrf = http.get(sb.url + prefix + "/JSESSION", params={"CSRF": "true"}, timeout=T)
        assert csrf.status_code == 200
        sid, _, token = csrf.text.partition("; XNAT_CSRF=")
        assert sid == posted.text and token


def test_jsession_get_with_basic_auth_logs_in(sb):
    resp = requests.get(sb.url + "/data/JSESSION", auth=(sb.user, sb.password), timeout=T)
    assert resp.status_code == 200
    assert SESSION_ID.match(resp.text)
    assert resp.cookies["JSESSIONID"] == resp.text


@pytest.mark.parametrize("path", ["/data/JSESSION", "/data/JSESSION/", "/REST/JSESSION"])
def test_jsession_delete_ends_the_session(sb, path):
    admin_sid = login(sb)
    sid = login(sb)
    live = stats(sb, admin_sid)["sessions_live"]
    assert whoami(sb, sid) == 200

    resp = requests.delete(sb.url + path, cookies={"JSESSIONID": sid}, timeout=T)
    assert resp.status_code == 200
    assert resp.content == b""

    gone = requests.get(sb.url + "/data/auth", cookies={"JSESSIONID": sid}, timeout=T)
    assert gone.status_code == 401
    assert gone.headers["WWW-Authenticate"].startswith("Basic")
    assert stats(sb, admin_sid)["sessions_live"] == live - 1
    assert whoami(sb, admin_sid) == 200  # other sessions of the user are untouched


def test_jsession_unauthenticated_is_401(sb):
    for method in ("GET", "POST", "DELETE"):
        resp = requests.request(method, sb.url + "/data/JSESSION", timeout=T)
        assert resp.status_code == 401, method


# -- /data/services/auth and /data/auth -----------------------------------------------------------
@pytest.mark.parametrize("method", ["PUT", "POST"])
@pytest.mark.parametrize("fields", [("username", "password"), ("j_username", "j_password")])
def test_form_login_returns_session_id_and_cookie(sb, method, fields):
    form = {fields[0]: sb.user, fields[1]: sb.password}
    with requests.Session() as http:
        resp = http.request(method, sb.url + "/data/services/auth", data=form, timeout=T)
        assert resp.status_code == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        assert SESSION_ID.match(resp.text), resp.text
        assert http.cookies["JSESSIONID"] == resp.text

        me = http.get(sb.url + "/data/auth", timeout=T)
        assert me.status_code == 200
        assert me.text == "User 'admin' is logged in"


@pytest.mark.parametrize(
    "form",
    [
        {"username": "admin", "password": "wrong"},
        {"username": "nobody", "password": "admin"},
        {"password": "admin"},
    ],
)
def test_form_login_failure_is_401_authentication_failed(sb, form):
    resp = requests.put(sb.url + "/data/services/auth", data=form, timeout=T)
    assert resp.status_code == 401
    assert "<h3>Authentication failed.</h3>" in resp.text  # xnatpy shows the <h3> text
    assert cookie_line(resp, "JSESSIONID") is None


def test_form_login_rejects_get(sb):
    resp = requests.get(
        sb.url + "/data/services/auth",
        params={"username": sb.user, "password": sb.password},
        timeout=T,
    )
    assert resp.status_code == 405


def test_data_auth_names_the_logged_in_user(sb):
    sb.add_user("bob", "pw")
    resp = requests.get(sb.url + "/data/auth", auth=("bob", "pw"), timeout=T)
    assert resp.status_code == 200
    assert resp.text == "User 'bob' is logged in"

    anonymous = requests.get(sb.url + "/data/auth", timeout=T)
    assert anonymous.status_code == 401
    assert anonymous.headers["WWW-Authenticate"].startswith("Basic")


# -- session cap and idle timeout -----------------------------------------------------------------
def test_session_cap_refuses_new_logins_until_one_ends(make_sandbox):
    sb = make_sandbox(seed=None, auth=AuthSettings(max_sessions=3))
    sb.add_user("bob", "pw")
    sids = [login(sb) for _ in range(3)]
    assert len(set(sids)) == 3

    basic = requests.get(sb.url + "/data/auth", auth=(sb.user, sb.password), timeout=T)
    assert basic.status_code == 401
    form = requests.put(
        sb.url + "/data/services/auth",
        data={"username": sb.user, "password": sb.password},
        timeout=T,
    )
    assert form.status_code == 401
    assert all(whoami(sb, sid) == 200 for sid in sids)  # old sessions are not evicted
    assert requests.get(sb.url + "/data/auth", auth=("bob", "pw"), timeout=T).status_code == 200

    ended = requests.delete(sb.url + "/data/JSESSION", cookies={"JSESSIONID": sids[0]}, timeout=T)
    assert ended.status_code == 200
    again = requests.get(sb.url + "/data/auth", auth=(sb.user, sb.password), timeout=T)
    assert again.status_code == 200


def test_idle_session_expires(make_sandbox):
    sb = make_sandbox(seed=None, auth=AuthSettings(session_timeout=0.5))
    with requests.Session() as http:
        first = http.get(sb.url + "/data/auth", auth=(sb.user, sb.password), timeout=T)
        assert first.status_code == 200
        assert http.cookies["SESSION_EXPIRATION_TIME"].strip('"').endswith(",500")
        assert http.get(sb.url + "/data/auth", timeout=T).status_code == 200
        time.sleep(1.0)
        expired = http.get(sb.url + "/data/auth", timeout=T)
        assert expired.status_code == 401
        assert expired.headers["WWW-Authenticate"].startswith("Basic")
        browser = http.get(
            sb.url + "/data/auth",
            headers={"User-Agent": BROWSER_UA},
            timeout=T,
            allow_redirects=False,
        )
        assert browser.status_code == 302


def test_session_in_use_does_not_expire(make_sandbox):
    sb = make_sandbox(seed=None, auth=AuthSettings(session_timeout=1.0))
    sid = login(sb)
    for _ in range(4):  # 1.2 s in all, longer than the timeout, but never 1 s idle
        time.sleep(0.3)
        assert whoami(sb, sid) == 200


# -- failed-login lockout -------------------------------------------------------------------------
def test_lockout_refuses_the_right_password_while_locked(make_sandbox):
    sb = make_sandbox(seed=None, auth=AuthSettings(max_failed_logins=3, lockout_seconds=60))
    sb.add_user("bob", "pw")
    for _ in range(3):
        bad = requests.get(sb.url + "/data/auth", auth=(sb.user, "wrong"), timeout=T)
        assert bad.status_code == 401
    basic = requests.get(sb.url + "/data/auth", auth=(sb.user, sb.password), timeout=T)
    assert basic.status_code == 401
    form = requests.put(
        sb.url + "/data/services/auth",
        data={"username": sb.user, "password": sb.password},
        timeout=T,
    )
    assert form.status_code == 401
    assert requests.get(sb.url + "/data/auth", auth=("bob", "pw"), timeout=T).status_code == 200


def test_form_login_failures_count_towards_lockout(make_sandbox):
    sb = make_sandbox(seed=None, auth=AuthSettings(max_failed_logins=3, lockout_seconds=60))
    for _ in range(3):
        resp = requests.put(
            sb.url + "/data/services/auth",
            data={"username": sb.user, "password": "wrong"},
            timeout=T,
        )
        assert resp.status_code == 401
    basic = requests.get(sb.url + "/data/auth", auth=(sb.user, sb.password), timeout=T)
    assert basic.status_code == 401


def test_lockout_ends_after_lockout_duration(make_sandbox):
    sb = make_sandbox(seed=None, auth=AuthSettings(max_failed_logins=3, lockout_seconds=0.5))
    for _ in range(3):
        requests.get(sb.url + "/data/auth", auth=(sb.user, "wrong"), timeout=T)
    assert (
        requests.get(sb.url + "/data/auth", auth=(sb.user, sb.password), timeout=T).status_code
        == 401
    )
    time.sleep(1.0)
    assert (
        requests.get(sb.url + "/data/auth", auth=(sb.user, sb.password), timeout=T).status_code
        == 200
    )


def test_successful_login_resets_failure_count(make_sandbox):
    sb = make_sandbox(seed=None, auth=AuthSettings(max_failed_logins=3, lockout_seconds=60))
    for _ in range(3):
        for _ in range(2):
            bad = requests.get(sb.url + "/data/auth", auth=(sb.user, "wrong"), timeout=T)
            assert bad.status_code == 401
        good = requests.get(sb.url + "/data/auth", auth=(sb.user, sb.password), timeout=T)
        assert good.status_code == 200
