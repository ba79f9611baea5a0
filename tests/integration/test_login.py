"""login / whoami / ls / logout against a sandbox, token expiry, faults, and secrets that must
never show up in any output."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner, Result

from hpcbridge.cli import main
from hpcbridge.sandbox import AuthSettings, SandboxServer

PASSWORD = "pw-Very-Secret-71"
USER = "alice"


class Outputs:
    """Every output of this module's CLI runs, checked against every secret seen so far."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.secrets = {PASSWORD}
        self.seen: list[str] = []

    def collect_secrets(self) -> None:
        creds = self.home / "credentials.json"
        if creds.exists():
            for entry in json.loads(creds.read_text())["servers"].values():
                self.secrets.add(entry["secret"])
        for cached in (self.home / "sessions").glob("*.json"):
            self.secrets.add(json.loads(cached.read_text())["jsessionid"])

    def run(self, *args: str, input: str | None = None) -> Result:
        result = CliRunner().invoke(main, list(args), input=input)
        self.seen.append(result.output)
        self.collect_secrets()
        for text in self.seen:
            for secret in self.secrets:
                assert secret not in text, "a secret leaked into CLI output"
        return result


@pytest.fixture()
def out(isolated_home: Path) -> Outputs:
    return Outputs(isolated_home)


@pytest.fixture()
def server(make_sandbox) -> SandboxServer:
    return make_sandbox(admin_user=USER, admin_password=PASSWORD)


def login(out: Outputs, server: SandboxServer) -> Result:
    return out.run(
        "login", "--xnat", server.url, "--user", USER, "--password-stdin", input=PASSWORD + "\n"
    )


def stats(server: SandboxServer) -> dict:
    with requests.Session() as http:
        http.post(server.url + "/data/JSESSION", auth=(USER, PASSWORD), timeout=10)
        data = http.get(server.url + "/sandbox/stats", timeout=10).json()
        http.delete(server.url + "/data/JSESSION", timeout=10)
    return data


def test_login_whoami_ls_logout(out: Outputs, server: SandboxServer, isolated_home: Path) -> None:
    result = login(out, server)
    assert result.exit_code == 0, result.output
    assert re.fullmatch(
        rf"logged in to {re.escape(server.url)} as alice; alias token stored "
        r"\(expires on \d{4}-\d\d-\d\d \d\d:\d\d UTC \(in 1 day 23 h\)\)\n",
        result.output,
    )
    creds = isolated_home / "credentials.json"
    assert oct(creds.stat().st_mode & 0o777) == "0o600"
    assert PASSWORD not in creds.read_text()
    token = next(iter(json.loads(creds.read_text())["servers"].values()))

    who = out.run("whoami")
    assert who.exit_code == 0
    assert who.output.splitlines()[:3] == [
        f"server  {server.url}",
        "user    alice",
        "auth    alias token",
    ]
    assert json.loads(out.run("--json", "whoami").output)["token_expires"] == token["expires"]

    # No password anywhere now: the token (and one cached session) carry every call.
    for address in (
        "",
        "PTV000",
        "PTV000/Haofei01",
        "PTV000/Haofei01/Haofei01_MR1",
        "PTV000/Haofei01/Haofei01_MR1/4",
    ):
        assert out.run("ls", address).exit_code == 0, address
    sessions = list((isolated_home / "sessions").glob("*.json"))
    assert len(sessions) == 1 and oct(sessions[0].stat().st_mode & 0o777) == "0o600"

    bye = out.run("logout")
    assert bye.exit_code == 0, bye.output
    assert bye.output == f"logged out of {server.url}: alias token invalidated and deleted\n"
    assert not list((isolated_home / "sessions").glob("*.json"))
    assert json.loads(creds.read_text())["servers"] == {}
    check = requests.get(
        f"{server.url}/data/services/tokens/validate/{token['alias']}/x",
        auth=(USER, PASSWORD),
        timeout=10,
    )
    assert check.status_code == 404  # the token is gone on the server too
    after = out.run("ls")
    assert after.exit_code == 2
    assert after.output.startswith("hpcbridge: error: no XNAT server configured")


def test_login_keeps_one_session_and_ends_the_password_one(
    out: Outputs, server: SandboxServer
) -> None:
    before = stats(server)
    assert login(out, server).exit_code == 0
    for _ in range(20):
        assert out.run("ls", "PTV000").exit_code == 0
    after = stats(server)
    # login's password session (ended at once) + the token's one cached session; +1 for stats.
    assert after["sessions_created"] - before["sessions_created"] == 3
    assert after["sessions_live"] == before["sessions_live"] + 1
    assert after["tokens_issued"] == 1


def test_login_with_a_web_issued_alias(out: Outputs, server: SandboxServer) -> None:
    token = requests.get(
        server.url + "/data/services/tokens/issue", auth=(USER, PASSWORD), timeout=10
    ).json()
    out.secrets.add(token["secret"])
    result = out.run(
        "login",
        "--xnat",
        server.url,
        "--alias",
        token["alias"],
        "--password-stdin",
        input=token["secret"] + "\n",
    )
    assert result.exit_code == 0, result.output
    assert result.output.startswith(
        f"logged in to {server.url} as alice; alias token stored (expires on "
    )
    assert out.run("whoami").output.splitlines()[1] == "user    alice"


def test_wrong_password(out: Outputs, server: SandboxServer) -> None:
    result = out.run(
        "login",
        "--xnat",
        server.url,
        "--user",
        USER,
        "--password-stdin",
        input="not-the-password\n",
    )
    assert result.exit_code == 1
    assert result.output == (
        f"hpcbridge: error: XNAT at {server.url} refused the credentials of alice (from "
        "password); wrong password, locked account, or too many open sessions "
        "(run `hpcbridge login`)\n"
    )


def test_expired_token(out: Outputs, make_sandbox) -> None:
    server = make_sandbox(
        admin_user=USER, admin_password=PASSWORD, auth=AuthSettings(token_lifetime=1.0)
    )
    assert login(out, server).exit_code == 0
    warn = out.run("whoami")
    assert "hpcbridge: warning: the alias token expires on " in warn.output
    assert "run `hpcbridge login` to renew it" in warn.output
    (Path(out.home) / "sessions").mkdir(exist_ok=True)
    for cached in (Path(out.home) / "sessions").glob("*.json"):
        cached.unlink()  # the cached session would outlive the token; the token is the test
    time.sleep(1.2)
    result = out.run("ls")
    assert result.exit_code == 1
    assert re.fullmatch(
        rf"hpcbridge: error: the alias token stored for {re.escape(server.url)} expired on "
        r"\S+ \S+ UTC \(expired\) \(run `hpcbridge login`\)\n",
        result.output,
    )


def test_invalidated_token(out: Outputs, server: SandboxServer, isolated_home: Path) -> None:
    assert login(out, server).exit_code == 0
    token = next(
        iter(json.loads((isolated_home / "credentials.json").read_text())["servers"].values())
    )
    requests.get(
        f"{server.url}/data/services/tokens/invalidate/{token['alias']}/x",
        auth=(USER, PASSWORD),
        timeout=10,
    )
    result = out.run("ls")
    assert result.exit_code == 1
    assert result.output == (
        f"hpcbridge: error: XNAT at {server.url} refused the stored alias token (invalidated or "
        "expired on the server) (run `hpcbridge login`)\n"
    )


def test_expired_cached_session_logs_in_again(out: Outputs, make_sandbox) -> None:
    server = make_sandbox(
        admin_user=USER, admin_password=PASSWORD, auth=AuthSettings(session_timeout=0.5)
    )
    assert login(out, server).exit_code == 0
    assert out.run("ls").exit_code == 0
    time.sleep(0.8)
    assert out.run("ls", "PTV000").exit_code == 0  # the 401 is handled by one new login


def test_503_burst_is_retried(out: Outputs, make_sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    server = make_sandbox(admin_user=USER, admin_password=PASSWORD)
    monkeypatch.setenv("HPCBRIDGE_XNAT", server.url)
    monkeypatch.setenv("HPCBRIDGE_USER", USER)
    monkeypatch.setenv("HPCBRIDGE_PASSWORD", PASSWORD)
    assert out.run("ls", "PTV000").exit_code == 0  # a cached session first, then the burst
    server.faults.update({"fail_every": 2})
    result = out.run("ls", "PTV000/Haofei01/Haofei01_MR1")
    assert result.exit_code == 0, result.output
    server.faults.update({"fail_every": 1})
    result = out.run("ls", "PTV000")
    assert result.exit_code == 1
    assert result.output == (
        "hpcbridge: error: XNAT is unavailable (503 for subjects of PTV000): Service Unavailable "
        "(sandbox fault injection) (try again later)\n"
    )


def test_group_readable_credentials_are_refused(
    out: Outputs, server: SandboxServer, isolated_home: Path
) -> None:
    assert login(out, server).exit_code == 0
    creds = isolated_home / "credentials.json"
    creds.chmod(0o644)
    result = out.run("ls")
    assert result.exit_code == 1
    assert result.output == (
        f"hpcbridge: error: {creds} is readable by other users (mode 0644); refusing to use it "
        f"(run `chmod 600 {creds}`)\n"
    )


def test_xnatpy_environment_names_and_netrc(
    out: Outputs, server: SandboxServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XNAT_HOST", server.url)
    monkeypatch.setenv("XNAT_USER", USER)
    monkeypatch.setenv("XNAT_PASS", PASSWORD)
    assert "PTV000" in out.run("ls").output
    monkeypatch.delenv("XNAT_PASS")
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login {USER} password {PASSWORD}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    for cached in (out.home / "sessions").glob("*.json"):
        cached.unlink()
    assert "PTV000" in out.run("ls").output
    netrc.chmod(0o640)
    for cached in (out.home / "sessions").glob("*.json"):
        cached.unlink()
    result = out.run("ls")
    assert result.exit_code == 1
    assert result.output == (
        f"hpcbridge: error: {netrc} is readable by other users (mode 0640); refusing to use it "
        f"(run `chmod 600 {netrc}`)\n"
    )


def test_verbose_logs_hold_no_secret(
    out: Outputs, server: SandboxServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    assert login(out, server).exit_code == 0
    assert out.run("-vv", "ls", "PTV000").exit_code == 0
    assert out.run("-vv", "logout").exit_code == 0
    for secret in out.secrets:
        assert secret not in caplog.text


def test_walking_200_experiments_costs_one_session_and_one_listing(
    out: Outputs, make_sandbox
) -> None:
    from hpcbridge.config import load_settings
    from hpcbridge.xnat import connect
    from hpcbridge.xnat.browse import project_scans

    server = make_sandbox(seed=None, admin_user=USER, admin_password=PASSWORD)
    store = server.store
    store.create_project("BIG", USER)
    for n in range(200):
        subject = store.create_subject("BIG", f"S{n:03d}", USER)
        expt = store.create_experiment(
            "BIG", subject["id"], f"S{n:03d}_MR1", "xnat:mrSessionData", USER
        )
        store.put_scan(expt["id"], "1", "xnat:mrScanData", type="T1w")
        store.put_scan(expt["id"], "2", "xnat:mrScanData", type="BOLD")
    before = stats(server)
    settings = load_settings(
        environ={
            "HPCBRIDGE_XNAT": server.url,
            "HPCBRIDGE_USER": USER,
            "HPCBRIDGE_HOME": str(out.home),
        }
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HPCBRIDGE_PASSWORD", PASSWORD)
        with connect(settings, cache_session=False) as client:
            refs = project_scans(client, "BIG")
    after = stats(server)
    assert len(refs) == 400
    assert {r.type for r in refs} == {"T1w", "BOLD"}
    assert refs[0].address.startswith("BIG/S")
    assert after["sessions_created"] - before["sessions_created"] == 2  # ours + the stats one
    gets = after["requests"]["GET"] - before["requests"]["GET"]
    assert gets == 2  # the one listing + the stats call
    assert after["sessions_live"] == before["sessions_live"]  # ended on close


def test_experiment_lookup_by_label_or_accession_id(demo_sandbox: SandboxServer) -> None:
    from hpcbridge.errors import XnatNotFoundError
    from hpcbridge.xnat import Secret, XnatClient
    from hpcbridge.xnat.browse import experiment

    creds = Secret(demo_sandbox.user, demo_sandbox.password, "environment")
    with XnatClient(demo_sandbox.url + "/", creds) as client:
        by_label = experiment(client, "Haofei02_MR1", project="PTV000")
        by_id = experiment(client, by_label.id)
        assert by_label == by_id
        assert (by_label.label, by_label.project, by_label.xsi_type) == (
            "Haofei02_MR1",
            "PTV000",
            "xnat:mrSessionData",
        )
        assert by_label.id.startswith("XNAT_E") and by_label.subject_id.startswith("XNAT_S")
        with pytest.raises(XnatNotFoundError, match="not found: experiment Haofei02_MR1"):
            experiment(client, "Haofei02_MR1")  # a label needs its project, as on XNAT


def test_an_experiment_is_looked_up_once_per_client(demo_sandbox: SandboxServer) -> None:
    """A run stages in and out many scans of a session through one client: its ID is asked once."""
    from hpcbridge.xnat import Secret, XnatClient
    from hpcbridge.xnat.browse import experiment

    creds = Secret(demo_sandbox.user, demo_sandbox.password, "environment")
    admin = requests.Session()
    admin.auth = (demo_sandbox.user, demo_sandbox.password)

    def gets() -> int:
        stats = admin.get(demo_sandbox.url + "/sandbox/stats", timeout=10).json()
        return int(stats["requests"].get("GET", 0))

    with XnatClient(demo_sandbox.url, creds) as client:
        first = experiment(client, "Haofei03_MR1", project="PTV000", subject="Haofei03")
        before = gets()
        again = [
            experiment(client, "Haofei03_MR1", project="PTV000", subject="Haofei03")
            for _ in range(5)
        ]
        assert gets() - before == 1  # the stats call itself only
    assert all(e == first for e in again)
    with XnatClient(demo_sandbox.url, creds) as fresh:  # a new client asks again
        before = gets()
        experiment(fresh, "Haofei03_MR1", project="PTV000", subject="Haofei03")
        assert gets() - before == 2
    admin.close()
