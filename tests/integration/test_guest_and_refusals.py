"""Issue 15, items 7 and 8, against the sandbox over real HTTP.

7. On an XNAT that allows guests a dead session is served as the guest user (404/403, never
   401): one look at /data/auth, one new login, the request again; a real 404 stays one.
8. A password XNAT refused is not sent again by unattended commands (XNAT would lock the
   account), until `hpcbridge login` succeeds or the password changes.
"""

from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner, Result

from hpcbridge.cli import main
from hpcbridge.sandbox import AuthSettings, SandboxServer

USER = "alice"
PASSWORD = "pw-Right-Secret-93"
WRONG = "pw-Wrong-Secret-41"
WRONG_TOO = "pw-Other-Wrong-Secret-17"


class Cli:
    """Runs hpcbridge and checks that no secret used in the test shows in any output."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.secrets = {PASSWORD, WRONG, WRONG_TOO}

    def __call__(self, *args: str, input: str | None = None) -> Result:
        result = CliRunner().invoke(main, list(args), input=input)
        creds = self.home / "credentials.json"
        if creds.exists():
            for entry in json.loads(creds.read_text())["servers"].values():
                self.secrets.add(entry["secret"])
        for cached in (self.home / "sessions").glob("*.json"):
            self.secrets.add(json.loads(cached.read_text())["jsessionid"])
        for secret in self.secrets:
            assert secret not in result.output, "a secret leaked into CLI output"
        return result


@pytest.fixture()
def cli(isolated_home: Path) -> Cli:
    return Cli(isolated_home)


def use_password(monkeypatch: pytest.MonkeyPatch, server: SandboxServer, password: str) -> None:
    monkeypatch.setenv("HPCBRIDGE_XNAT", server.url)
    monkeypatch.setenv("HPCBRIDGE_USER", USER)
    monkeypatch.setenv("HPCBRIDGE_PASSWORD", password)


def cached_session(home: Path) -> str:
    (cached,) = (home / "sessions").glob("*.json")
    return str(json.loads(cached.read_text())["jsessionid"])


def requests_to(server: SandboxServer, method: str, path: str) -> list[tuple]:
    return [entry for entry in server.request_log if entry[:2] == (method, path)]


# -- the sandbox's guest mode ----------------------------------------------------------------
def test_sandbox_guest_mode_serves_the_sessionless_as_guest(make_sandbox) -> None:
    server = make_sandbox(auth=AuthSettings(guest_access=True))
    with requests.Session() as http:
        auth = http.get(server.url + "/data/auth", timeout=10)
        assert (auth.status_code, auth.text) == (200, "User 'guest' is logged in")
        projects = http.get(server.url + "/data/projects?format=json", timeout=10)
        assert projects.json()["ResultSet"]["Result"] == []  # every sandbox project is private
        http.cookies.set("JSESSIONID", "0123456789ABCDEF0123456789ABCDEF")  # dead
        hidden = http.get(server.url + "/data/projects/PTV000/subjects?format=json", timeout=10)
        assert hidden.status_code == 404
        assert "Unable to identify project PTV000" in hidden.text
        for path in ("/data/experiments/XNAT_E00001", "/data/subjects/XNAT_S00001"):
            assert http.get(server.url + path, timeout=10).status_code == 404
        write = http.put(server.url + "/data/projects/PTV000/subjects/NEW", timeout=10)
        assert write.status_code == 403
        token = http.get(server.url + "/data/services/tokens/issue", timeout=10)
        assert token.status_code == 403
        stats = http.get(server.url + "/sandbox/stats", timeout=10)
        assert stats.status_code == 403
        bad = http.get(server.url + "/data/projects", auth=("admin", "nope"), timeout=10)
        assert bad.status_code == 401  # wrong credentials are still refused, not guest
        good = http.get(server.url + "/data/projects?format=json", auth=("admin", "admin"))
        assert [p["ID"] for p in good.json()["ResultSet"]["Result"]] == ["PTV000"]
    assert ("GET", "/data/auth", "guest", 200) in server.request_log


def test_sandbox_without_guest_mode_still_answers_401(sandbox: SandboxServer) -> None:
    assert requests.get(sandbox.url + "/data/auth", timeout=10).status_code == 401


def test_sandbox_serve_guest_access_with_a_short_session_timeout(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`hpcbridge sandbox serve --guest-access --session-timeout 1`, as a user would run it."""
    ready = tmp_path / "ready.json"
    serve = [sys.executable, "-m", "hpcbridge", "sandbox", "serve", "--seed", "demo"]
    serve += ["--guest-access", "--session-timeout", "1", "--port", "0"]
    proc = subprocess.Popen([*serve, "--ready-file", str(ready)], stdout=subprocess.DEVNULL)
    try:
        for _ in range(300):
            if ready.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        url = json.loads(ready.read_text())["url"]
        guest = requests.get(url + "/data/auth", timeout=10)
        assert (guest.status_code, guest.text) == (200, "User 'guest' is logged in")
        monkeypatch.setenv("HPCBRIDGE_XNAT", url)
        monkeypatch.setenv("HPCBRIDGE_USER", "admin")
        monkeypatch.setenv("HPCBRIDGE_PASSWORD", "admin")
        assert cli("ls", "PTV000").exit_code == 0
        time.sleep(1.5)  # the cached session dies; the sandbox now takes it for the guest
        dead = requests.get(
            url + "/data/projects/PTV000/subjects",
            cookies={"JSESSIONID": cached_session(cli.home)},
            timeout=10,
        )
        assert dead.status_code == 404
        result = cli("ls", "PTV000/Haofei01/Haofei01_MR1")
        assert result.exit_code == 0, result.output
        assert re.search(r"^4\s", result.output, re.M), result.output
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# -- item 7: a dead session on a site with guest access --------------------------------------
def guest_site(make_sandbox, **auth: float) -> SandboxServer:
    return make_sandbox(
        admin_user=USER,
        admin_password=PASSWORD,
        auth=AuthSettings(guest_access=True, **auth),  # type: ignore[arg-type]
    )


def test_a_session_ended_on_the_server_is_replaced_after_one_look(
    cli: Cli, make_sandbox, monkeypatch: pytest.MonkeyPatch, isolated_home: Path
) -> None:
    server = guest_site(make_sandbox)
    use_password(monkeypatch, server, PASSWORD)
    assert cli("ls", "PTV000").exit_code == 0  # caches a session
    server.authority.close_session(cached_session(isolated_home))
    server.app.request_log.clear()

    result = cli("ls", "PTV000/Haofei01/Haofei01_MR1")

    assert result.exit_code == 0, result.output
    assert re.search(r"^4\s", result.output, re.M), result.output
    log = server.request_log
    assert log[0][2:] == ("guest", 404)  # the dead session, served as the guest
    assert log[1] == ("GET", "/data/auth", "guest", 200)
    assert log[2][:2] == ("POST", "/data/JSESSION") and log[2][2:] == (USER, 200)
    assert log[3][1] == log[0][1] and log[3][2:] == (USER, 200)  # the same request again
    assert len(requests_to(server, "GET", "/data/auth")) == 1
    assert len(requests_to(server, "POST", "/data/JSESSION")) == 1
    assert all(user == USER for _, _, user, _ in log[2:])


def test_an_empty_listing_on_a_dead_session_is_checked_like_a_404(
    cli: Cli, make_sandbox, monkeypatch: pytest.MonkeyPatch, isolated_home: Path
) -> None:
    """The guest sees no project at all: 200 and an empty list, not a 404."""
    server = guest_site(make_sandbox)
    use_password(monkeypatch, server, PASSWORD)
    assert cli("ls", "PTV000").exit_code == 0
    server.authority.close_session(cached_session(isolated_home))
    server.app.request_log.clear()

    result = cli("ls")

    assert result.exit_code == 0, result.output
    assert "PTV000" in result.output
    assert [(e[0], e[1], e[2]) for e in server.request_log] == [
        ("GET", "/data/projects", "guest"),
        ("GET", "/data/auth", "guest"),
        ("POST", "/data/JSESSION", USER),
        ("GET", "/data/projects", USER),
    ]


def test_an_idle_expired_session_is_replaced_and_whoami_is_not_guest(
    cli: Cli, make_sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = guest_site(make_sandbox, session_timeout=0.5)
    use_password(monkeypatch, server, PASSWORD)
    assert cli("ls").exit_code == 0
    time.sleep(0.8)
    result = cli("ls", "PTV000/Haofei01/Haofei01_MR1/4")
    assert result.exit_code == 0, result.output
    assert len(requests_to(server, "GET", "/data/auth")) == 1
    time.sleep(0.8)
    who = cli("whoami")
    assert who.exit_code == 0, who.output
    assert who.output.splitlines()[1] == f"user    {USER}"


def test_a_missing_scan_is_still_not_found_after_one_look(
    cli: Cli, make_sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = guest_site(make_sandbox)
    use_password(monkeypatch, server, PASSWORD)
    assert cli("ls", "PTV000").exit_code == 0
    server.app.request_log.clear()

    result = cli("ls", "PTV000/Haofei01/Haofei01_MR1/77")

    assert result.exit_code == 1
    assert result.output.startswith("hpcbridge: error: not found: ")
    assert "77" in result.output
    assert requests_to(server, "GET", "/data/auth") == [("GET", "/data/auth", USER, 200)]
    assert requests_to(server, "POST", "/data/JSESSION") == []  # the session was ours
    assert all(user == USER for _, _, user, _ in server.request_log)


def test_the_library_checks_once_per_request_and_never_loops(make_sandbox) -> None:
    from hpcbridge.errors import XnatNotFoundError
    from hpcbridge.xnat import Secret, XnatClient

    server = guest_site(make_sandbox)
    creds = Secret(USER, PASSWORD, "environment")
    with XnatClient(server.url, creds) as client:
        client.ensure_session()
        client._proven_at = None  # as if reused from a cache
        server.app.request_log.clear()
        with pytest.raises(XnatNotFoundError):
            client.request("GET", "/data/projects/NOPE/subjects", "subjects of NOPE")
        assert [e[1] for e in server.request_log] == ["/data/projects/NOPE/subjects", "/data/auth"]
        server.app.request_log.clear()
        with pytest.raises(XnatNotFoundError):  # proven ours a moment ago: no second look
            client.request("GET", "/data/projects/NOPE/subjects", "subjects of NOPE")
        assert [e[1] for e in server.request_log] == ["/data/projects/NOPE/subjects"]
        server.authority.close_session(client.session_id or "")
        client._proven_at = None
        server.app.request_log.clear()
        with pytest.raises(XnatNotFoundError):  # guest, new login, still 404: then it is real
            client.request("GET", "/data/projects/NOPE/subjects", "subjects of NOPE")
        assert [(e[0], e[1], e[2]) for e in server.request_log] == [
            ("GET", "/data/projects/NOPE/subjects", "guest"),
            ("GET", "/data/auth", "guest"),
            ("POST", "/data/JSESSION", USER),
            ("GET", "/data/projects/NOPE/subjects", USER),
        ]


# -- item 8: refused credentials are not retried by unattended commands ----------------------
FAST_FAIL = (
    r"hpcbridge: error: XNAT refused the credentials for alice at {url} at \d\d:\d\d UTC; "
    r"not trying again, to keep XNAT from locking the account \(run `hpcbridge login`\)\n"
)


def refused_by_xnat(url: str) -> str:
    return (
        f"hpcbridge: error: XNAT at {url} refused the credentials of alice (from environment); "
        "wrong password, locked account, or too many open sessions (run `hpcbridge login`)\n"
    )


def failed_logins(server: SandboxServer) -> list[tuple]:
    return [e for e in requests_to(server, "POST", "/data/JSESSION") if e[3] == 401]


def test_a_refused_password_is_sent_once_not_by_every_cron_run(
    cli: Cli, make_sandbox, monkeypatch: pytest.MonkeyPatch, isolated_home: Path
) -> None:
    server = make_sandbox(
        admin_user=USER, admin_password=PASSWORD, auth=AuthSettings(max_failed_logins=3)
    )
    use_password(monkeypatch, server, WRONG)

    first = cli("ls", "PTV000")
    assert (first.exit_code, first.output) == (1, refused_by_xnat(server.url))
    for _ in range(5):
        again = cli("ls", "PTV000")
        assert again.exit_code == 1
        assert re.fullmatch(FAST_FAIL.format(url=re.escape(server.url)), again.output)
    assert len(failed_logins(server)) == 1
    assert server.authority.failed_logins(USER) == 1
    assert not server.authority.is_locked(USER)  # 3 would lock it; 6 commands ran

    (marker,) = (isolated_home / "refused").glob("*.json")
    assert stat.S_IMODE(marker.stat().st_mode) == 0o600
    text = marker.read_text()
    assert WRONG not in text and PASSWORD not in text
    data = json.loads(text)
    assert (data["user"], data["source"]) == (USER, "environment")
    assert abs(data["refused_at"] - time.time()) < 60

    # A new password is tried (once); the refused one stays refused.
    monkeypatch.setenv("HPCBRIDGE_PASSWORD", WRONG_TOO)
    assert cli("ls", "PTV000").output == refused_by_xnat(server.url)
    assert re.fullmatch(FAST_FAIL.format(url=re.escape(server.url)), cli("ls").output)
    assert len(failed_logins(server)) == 2
    assert not server.authority.is_locked(USER)

    # `hpcbridge login` always asks XNAT, and a success clears the mark.
    monkeypatch.delenv("HPCBRIDGE_PASSWORD")
    typo = cli("login", "--password-stdin", input=WRONG_TOO + "\n")
    assert typo.exit_code == 1 and "not trying again" not in typo.output
    assert len(failed_logins(server)) == 3  # tried: XNAT counted it (and locked at 3)
    server.authority.failures.clear()  # an administrator unlocks the account
    assert cli("login", "--password-stdin", input=PASSWORD + "\n").exit_code == 0
    assert list((isolated_home / "refused").glob("*.json")) == []
    assert cli("ls", "PTV000").exit_code == 0


def test_the_right_password_after_a_refusal_is_tried_and_clears_it(
    cli: Cli, make_sandbox, monkeypatch: pytest.MonkeyPatch, isolated_home: Path
) -> None:
    server = make_sandbox(admin_user=USER, admin_password=PASSWORD)
    use_password(monkeypatch, server, WRONG)
    assert cli("ls").exit_code == 1
    assert len(list((isolated_home / "refused").glob("*.json"))) == 1
    monkeypatch.setenv("HPCBRIDGE_PASSWORD", PASSWORD)  # someone fixed the cron job
    result = cli("ls", "PTV000")
    assert result.exit_code == 0, result.output
    assert list((isolated_home / "refused").glob("*.json")) == []
    monkeypatch.setenv("HPCBRIDGE_PASSWORD", WRONG)
    for cached in (isolated_home / "sessions").glob("*.json"):
        cached.unlink()
    assert cli("ls").output == refused_by_xnat(server.url)  # cleared, so asked again
    assert len(failed_logins(server)) == 2


def test_a_refused_token_is_not_retried_either(
    cli: Cli, make_sandbox, monkeypatch: pytest.MonkeyPatch, isolated_home: Path
) -> None:
    server = make_sandbox(admin_user=USER, admin_password=PASSWORD)
    login = cli(
        "login", "--xnat", server.url, "--user", USER, "--password-stdin", input=PASSWORD + "\n"
    )
    assert login.exit_code == 0, login.output
    token = next(iter(json.loads((isolated_home / "credentials.json").read_text())["servers"]))
    entry = json.loads((isolated_home / "credentials.json").read_text())["servers"][token]
    requests.get(
        f"{server.url}/data/services/tokens/invalidate/{entry['alias']}",
        auth=(USER, PASSWORD),
        timeout=10,
    )
    for cached in (isolated_home / "sessions").glob("*.json"):
        cached.unlink()
    assert "refused the stored alias token" in cli("ls").output
    fast = cli("ls")
    assert fast.exit_code == 1
    assert re.fullmatch(
        rf"hpcbridge: error: XNAT refused the alias token for alice at {re.escape(server.url)} "
        r"at \d\d:\d\d UTC; not trying again, to keep XNAT from locking the account "
        r"\(run `hpcbridge login`\)\n",
        fast.output,
    )
    refused = [e for e in requests_to(server, "POST", "/data/JSESSION") if e[3] == 401]
    assert len(refused) == 1
    assert entry["secret"] not in (next((isolated_home / "refused").glob("*.json"))).read_text()
    again = cli(
        "login", "--xnat", server.url, "--user", USER, "--password-stdin", input=PASSWORD + "\n"
    )
    assert again.exit_code == 0
    assert cli("ls").exit_code == 0
