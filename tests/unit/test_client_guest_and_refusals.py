"""Issue 15 items 7 and 8 where a live server cannot easily go: the refusal file itself, the
look at /data/auth answered in every way, and the trust window after a proof."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import pytest
import requests_mock

from hpcbridge.credentials import LoginRefusals, Secret, SessionCache
from hpcbridge.errors import CredentialError, XnatAuthError, XnatNotFoundError
from hpcbridge.xnat import XnatClient
from hpcbridge.xnat.session import _when

URL = "https://xnat.example.org/xnat"
SECRET = "s3cret-value-for-tests"
PATH = "/data/projects/P/subjects"
PROJECTS = URL + PATH


def test_a_refusal_is_kept_private_without_the_secret(tmp_path: Path) -> None:
    refusals = LoginRefusals.under(tmp_path)
    assert refusals.get(URL, "alice", SECRET) is None
    before = time.time()
    refusals.put(URL + "/", "alice", SECRET, source="environment")
    (path,) = (tmp_path / "refused").glob("*.json")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    text = path.read_text()
    assert SECRET not in text and "s3cret" not in text
    assert set(json.loads(text)) == {
        "server",
        "user",
        "source",
        "refused_at",
        "salt",
        "fingerprint",
    }
    found = refusals.get("https://XNAT.example.org/xnat", "alice", SECRET)
    assert found is not None and found.source == "environment"
    assert before <= found.refused_at <= time.time()
    assert refusals.get(URL, "alice", SECRET + "x") is None  # a new secret is tried
    assert refusals.get(URL, "bob", SECRET) is None
    assert refusals.get("https://other.example.org", "alice", SECRET) is None


def test_the_fingerprint_is_salted(tmp_path: Path) -> None:
    a, b = LoginRefusals.under(tmp_path / "a"), LoginRefusals.under(tmp_path / "b")
    a.put(URL, "alice", SECRET, source="netrc")
    b.put(URL, "alice", SECRET, source="netrc")
    (fa,) = (tmp_path / "a" / "refused").glob("*.json")
    (fb,) = (tmp_path / "b" / "refused").glob("*.json")
    assert json.loads(fa.read_text())["fingerprint"] != json.loads(fb.read_text())["fingerprint"]


def test_clear_one_user_or_the_whole_server(tmp_path: Path) -> None:
    refusals = LoginRefusals.under(tmp_path)
    refusals.put(URL, "alice", SECRET, source="environment")
    refusals.put(URL, "bob", SECRET, source="environment")
    refusals.put("https://other.example.org", "alice", SECRET, source="environment")
    refusals.clear(URL, "alice")
    assert refusals.get(URL, "alice", SECRET) is None
    assert refusals.get(URL, "bob", SECRET) is not None
    refusals.clear(URL)
    assert refusals.get(URL, "bob", SECRET) is None
    assert refusals.get("https://other.example.org", "alice", SECRET) is not None


def test_a_group_readable_refusal_file_is_refused(tmp_path: Path) -> None:
    refusals = LoginRefusals.under(tmp_path)
    refusals.put(URL, "alice", SECRET, source="environment")
    (path,) = (tmp_path / "refused").glob("*.json")
    path.chmod(0o644)
    with pytest.raises(CredentialError, match="readable by other users"):
        refusals.get(URL, "alice", SECRET)


def test_when_says_the_day_unless_today() -> None:
    noon = 1_780_000_000.0  # some day, 20:26 UTC
    assert _when(noon, now=noon + 60) == "at 20:26 UTC"
    assert _when(noon, now=noon + 86400) == "on 2026-05-28 at 20:26 UTC"


def client_with(tmp_path: Path, secret: Secret | None = None) -> XnatClient:
    return XnatClient(
        URL,
        secret or Secret("alice", SECRET, "environment"),
        backoff=0,
        session_cache=SessionCache.under(tmp_path),
        refusals=LoginRefusals.under(tmp_path),
    )


def test_refused_login_is_recorded_and_not_sent_again(tmp_path: Path) -> None:
    with requests_mock.Mocker() as m:
        login = m.post(f"{URL}/data/JSESSION", status_code=401, text="<h3>failed</h3>")
        with client_with(tmp_path) as client, pytest.raises(XnatAuthError, match="refused the"):
            client.request("GET", PATH, "x")
        with client_with(tmp_path) as client, pytest.raises(XnatAuthError) as caught:
            client.request("GET", PATH, "x")
        assert login.call_count == 1
        assert "not trying again, to keep XNAT from locking the account" in str(caught.value)
        assert SECRET not in str(caught.value)
        with client_with(tmp_path) as client, pytest.raises(XnatAuthError):
            client.login(retry_refused=True)  # `hpcbridge login`: always asks XNAT
        assert login.call_count == 2


def test_a_connection_failure_is_no_refusal(tmp_path: Path) -> None:
    import requests

    with requests_mock.Mocker() as m:
        m.post(f"{URL}/data/JSESSION", exc=requests.ConnectionError("Connection refused"))
        with client_with(tmp_path) as client, pytest.raises(Exception, match="cannot reach"):
            client.login()
    assert not (tmp_path / "refused").exists()


def reused(tmp_path: Path) -> XnatClient:
    SessionCache.under(tmp_path).put(URL, "alice", "OLD")
    return client_with(tmp_path)


@pytest.mark.parametrize(
    ("auth_status", "auth_text"),
    [(200, "User 'guest' is logged in"), (401, "<h3>no</h3>")],
)
def test_a_404_on_a_reused_session_that_is_not_ours_logs_in_again(
    tmp_path: Path, auth_status: int, auth_text: str
) -> None:
    with requests_mock.Mocker() as m:
        m.post(f"{URL}/data/JSESSION", text="NEW", cookies={"JSESSIONID": "NEW"})
        auth = m.get(f"{URL}/data/auth", status_code=auth_status, text=auth_text)
        data = m.get(
            PROJECTS,
            [{"status_code": 404, "text": ""}, {"status_code": 200, "json": {"ok": 1}}],
        )
        with reused(tmp_path) as client:
            assert client.request("GET", PATH, "x").json() == {"ok": 1}
        assert (auth.call_count, data.call_count) == (1, 2)
        assert data.request_history[0].headers["Cookie"] == "JSESSIONID=OLD"
        assert data.request_history[1].headers["Cookie"] == "JSESSIONID=NEW"


@pytest.mark.parametrize(
    ("auth_status", "auth_text"),
    [(200, "User 'alice' is logged in"), (500, "oops"), (200, "something else")],
)
def test_a_404_stands_when_the_session_is_ours_or_xnat_cannot_say(
    tmp_path: Path, auth_status: int, auth_text: str
) -> None:
    with requests_mock.Mocker() as m:
        login = m.post(f"{URL}/data/JSESSION", text="NEW", cookies={"JSESSIONID": "NEW"})
        auth = m.get(f"{URL}/data/auth", status_code=auth_status, text=auth_text)
        m.get(PROJECTS, status_code=404)
        with reused(tmp_path) as client, pytest.raises(XnatNotFoundError):
            client.request("GET", PATH, "x")
        assert (auth.call_count, login.call_count) == (1, 0)


def test_a_session_opened_for_the_request_is_not_doubted(tmp_path: Path) -> None:
    with requests_mock.Mocker() as m:
        m.post(f"{URL}/data/JSESSION", text="NEW", cookies={"JSESSIONID": "NEW"})
        auth = m.get(f"{URL}/data/auth", text="User 'alice' is logged in")
        m.get(PROJECTS, status_code=403)
        with client_with(tmp_path) as client:
            for _ in range(3):
                with pytest.raises(Exception, match="not allowed"):
                    client.request("GET", PATH, "x")
        assert auth.call_count == 0


def test_trust_lasts_at_most_half_the_servers_idle_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr("hpcbridge.xnat.session.time.monotonic", lambda: clock[0])
    with requests_mock.Mocker() as m:
        m.post(f"{URL}/data/JSESSION", text="NEW", cookies={"JSESSIONID": "NEW"})
        auth = m.get(f"{URL}/data/auth", text="User 'alice' is logged in")
        m.get(PROJECTS, status_code=404)
        with client_with(tmp_path) as client:
            client.ensure_session()
            # XNAT sets it on every answer (requests-mock's do not reach the session's jar):
            # "<now ms>,<idle timeout ms>", here 20 s.
            client.http.cookies.set("SESSION_EXPIRATION_TIME", '"1,20000"')
            for step in (0.0, 9.0, 2.0):  # proven at 1000; 1009 trusted; 1011 looked at
                clock[0] += step
                with pytest.raises(XnatNotFoundError):
                    client.request("GET", PATH, "x")
        assert auth.call_count == 1


def test_an_empty_listing_on_a_reused_session_is_checked_once(tmp_path: Path) -> None:
    empty = {"ResultSet": {"Result": []}}
    with requests_mock.Mocker() as m:
        login = m.post(f"{URL}/data/JSESSION", text="NEW", cookies={"JSESSIONID": "NEW"})
        auth = m.get(f"{URL}/data/auth", text="User 'alice' is logged in")
        m.get(f"{URL}/data/projects", json=empty)
        with reused(tmp_path) as client:
            assert client.listing("/data/projects", "projects") == []
            assert client.listing("/data/projects", "projects") == []  # proven: no look
        assert (auth.call_count, login.call_count) == (1, 0)
