"""The command line against a real sandbox over loopback: output, --json, errors, exit codes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
import requests
from click.testing import CliRunner

from hpcbridge.cli import main
from hpcbridge.sandbox import SandboxServer


@pytest.fixture()
def env(demo_sandbox: SandboxServer, monkeypatch: pytest.MonkeyPatch) -> SandboxServer:
    monkeypatch.setenv("HPCBRIDGE_XNAT", demo_sandbox.url)
    monkeypatch.setenv("HPCBRIDGE_USER", demo_sandbox.user)
    monkeypatch.setenv("HPCBRIDGE_PASSWORD", demo_sandbox.password)
    return demo_sandbox


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _command_paths(group: click.Group = main, prefix: tuple[str, ...] = ()) -> list[list[str]]:
    """Every command and group below ``group``, as the words that name it."""
    paths: list[list[str]] = []
    for name, command in sorted(group.commands.items()):
        paths.append([*prefix, name])
        if isinstance(command, click.Group):
            paths += _command_paths(command, (*prefix, name))
    return paths


#: Commands whose --help has no example yet. Remove a name once its help gains one: the strict
#: xfail then reminds you.
MISSING_EXAMPLES: set[str] = set()


def test_help_teaches_with_examples() -> None:
    result = run("--help")
    assert result.exit_code == 0
    assert "hpcbridge demo" in result.output  # the newcomer's first command
    # each command's summary fits its line in the list, none cut short with "..."
    listing = result.output.split("Commands:", 1)[1]
    lines = [line for line in listing.splitlines() if line.strip()]
    assert "..." not in listing and len(lines) == len(main.commands), listing
    assert len(_command_paths()) >= 25  # every command is below; a guard against finding none


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(
            path,
            id=" ".join(path),
            marks=[pytest.mark.xfail(strict=True, reason="its --help has no example yet")]
            if " ".join(path) in MISSING_EXAMPLES
            else [],
        )
        for path in _command_paths()
    ],
)
def test_every_help_has_a_summary_and_an_example(command: list[str]) -> None:
    """`hpcbridge COMMAND --help`: a one-line summary first, then an example to copy."""
    result = run(*command, "--help")
    assert result.exit_code == 0, result.output
    words = " ".join(command)
    found = main.commands[command[0]]
    for name in command[1:]:
        assert isinstance(found, click.Group)
        found = found.commands[name]
    summary = (found.help or "").strip().split("\n\n", 1)[0]
    assert "\n" not in summary and summary.endswith("."), summary
    assert len(summary) <= 100, summary
    examples = re.search(r"^  Examples?:\n((?:    .*\n)+)", result.output, re.M)
    assert examples, f"no Example: section in `hpcbridge {words} --help`"
    lines = examples.group(1).splitlines()
    assert any(re.search(rf"hpcbridge (-\S+ (\S+ )?)*{re.escape(words)}\b", x) for x in lines), (
        examples.group(1)
    )


def test_python_dash_m_works() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "hpcbridge", "--version"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and re.match(r"hpcbridge, version \d", out.stdout)


def test_ls_walks_down_to_files(env: SandboxServer) -> None:
    assert "PTV000" in run("ls").output
    out = run("ls", "PTV000").output
    assert re.search(r"Haofei02\s+XNAT_S\d+", out)
    out = run("ls", "PTV000/Haofei01/Haofei01_MR1").output
    assert re.search(r"^4\s+Ax 3D T1\s+Ax 3D T1\s+usable\s+12\s+\d+$", out, re.M)
    out = run("ls", "PTV000/Haofei01/Haofei01_MR1/4").output
    assert out.startswith("DICOM  format=DICOM  12 files")
    assert re.search(r"^  0001\.dcm  \d+  [0-9a-f]{32}$", out, re.M)


def test_ls_json_keeps_xnat_keys_with_numbers(env: SandboxServer) -> None:
    scans = json.loads(run("--json", "ls", "PTV000/Haofei01/Haofei01_MR1").output)
    t1 = next(s for s in scans if s["ID"] == "4")
    assert t1["type"] == "Ax 3D T1" and t1["file_count"] == 12 and isinstance(t1["file_size"], int)
    resources = json.loads(run("--json", "ls", "PTV000/Haofei01/Haofei01_MR1/4").output)
    assert resources[0]["label"] == "DICOM" and len(resources[0]["files"]) == 12
    assert all(isinstance(f["Size"], int) for f in resources[0]["files"])


def test_a_loop_of_200_ls_calls_opens_one_server_session(env: SandboxServer) -> None:
    """A shell loop of many hpcbridge calls must not open a Tomcat session per call."""
    with requests.Session() as admin:
        admin.post(env.url + "/data/JSESSION", auth=(env.user, env.password), timeout=10)
        before = admin.get(env.url + "/sandbox/stats", timeout=10).json()
        for _ in range(200):
            result = run("ls", "PTV000/Haofei01/Haofei01_MR1")
            assert result.exit_code == 0, result.output
        after = admin.get(env.url + "/sandbox/stats", timeout=10).json()
    assert after["sessions_created"] - before["sessions_created"] <= 1
    assert after["sessions_live"] - before["sessions_live"] <= 1


@pytest.mark.parametrize(
    ("args", "code", "line"),
    [
        (
            ["ls", "PTV000/Haofei01/Haofei01_MR1/77"],
            1,
            "hpcbridge: error: not found: PTV000/Haofei01/Haofei01_MR1/77 "
            "(no scan '77' in PTV000/Haofei01/Haofei01_MR1) "
            "(`hpcbridge ls PTV000/Haofei01/Haofei01_MR1` lists what is there)",
        ),
        (
            ["ls", "NOPE"],
            1,
            "hpcbridge: error: not found: NOPE (no project 'NOPE') "
            "(`hpcbridge ls` lists what is there)",
        ),
        (
            ["ls", "PTV000/x y"],
            2,
            "hpcbridge: error: address 'PTV000/x y': subject 'x y' may only hold letters, "
            "digits, '_' and '-'",
        ),
    ],
)
def test_ls_errors_are_one_line(env: SandboxServer, args: list[str], code: int, line: str) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == code
    assert result.output.strip() == line


def test_wrong_password_is_an_auth_error(
    env: SandboxServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HPCBRIDGE_PASSWORD", "wrong-secret-xyz")
    result = CliRunner().invoke(main, ["ls"])
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"hpcbridge: error: XNAT at {env.url} refused the credentials of admin (from "
        "environment); wrong password, locked account, or too many open sessions "
        "(run `hpcbridge login`)"
    )
    assert "wrong-secret-xyz" not in result.output


def test_no_xnat_configured() -> None:
    result = CliRunner().invoke(main, ["ls"])
    assert result.exit_code == 2
    assert result.output.strip() == (
        "hpcbridge: error: no XNAT server configured (run `hpcbridge login --xnat URL`, "
        "use `--profile sandbox` after "
        "`hpcbridge sandbox start`, or set HPCBRIDGE_XNAT)"
    )


def test_unreachable_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPCBRIDGE_XNAT", "http://127.0.0.1:9")
    monkeypatch.setenv("HPCBRIDGE_USER", "u")
    monkeypatch.setenv("HPCBRIDGE_PASSWORD", "p")
    result = CliRunner().invoke(main, ["ls"])
    assert result.exit_code == 1
    assert result.output.strip() == (
        "hpcbridge: error: cannot reach XNAT at http://127.0.0.1:9: connection refused "
        "(check the URL with `hpcbridge config show`, and that this machine can reach the server)"
    )


def test_sandbox_profile_when_not_running() -> None:
    result = CliRunner().invoke(main, ["--profile", "sandbox", "ls"])
    assert result.exit_code == 1
    assert result.output.strip() == (
        "hpcbridge: error: the sandbox is not running (start it with `hpcbridge sandbox start`)"
    )


def test_sandbox_start_status_stop_and_profile(isolated_home: Path) -> None:
    try:
        started = run("sandbox", "start")
        assert started.exit_code == 0, started.output
        assert re.match(
            r"sandbox XNAT started at http://127\.0\.0\.1:\d+ \(pid \d+\)", started.output
        )
        ready = isolated_home / "sandbox" / "ready.json"
        assert oct(ready.stat().st_mode & 0o777) == "0o600"
        again = run("--json", "sandbox", "start")
        assert json.loads(again.output)["started"] is False
        assert "password" not in again.output
        assert "Haofei01_MR1" in run("--profile", "sandbox", "ls", "PTV000/Haofei01").output
        assert run("sandbox", "status").output.startswith("sandbox running at http://127.0.0.1:")
    finally:
        stopped = run("sandbox", "stop")
    assert stopped.output.strip() == "sandbox stopped"
    assert not (isolated_home / "sandbox" / "ready.json").exists()
    status = CliRunner().invoke(main, ["sandbox", "status"])
    assert status.exit_code == 1
    assert status.output == "sandbox not running (start it with `hpcbridge sandbox start`)\n"
    as_json = CliRunner().invoke(main, ["--json", "sandbox", "status"])
    assert as_json.exit_code == 1  # as without --json
    assert json.loads(as_json.stdout) == {"running": False}


def test_group_readable_ready_file_is_refused(isolated_home: Path) -> None:
    ready = isolated_home / "sandbox" / "ready.json"
    ready.parent.mkdir(parents=True)
    ready.write_text(
        json.dumps({"url": "http://127.0.0.1:9", "user": "a", "password": "b", "pid": 1})
    )
    ready.chmod(0o644)
    result = CliRunner().invoke(main, ["--profile", "sandbox", "ls"])
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"hpcbridge: error: {ready} is readable by other users (mode 0644); refusing to use it "
        f"(run `chmod 600 {ready}`)"
    )


def test_serve_ready_file_curl_and_sigterm(tmp_path: Path, curl: str) -> None:
    """The issue's acceptance: serve --seed demo --port 0 --ready-file, list with Basic auth,
    and the scan-4 zip unpacks into the XNAT layout with valid DICOM."""
    import io
    import zipfile

    import pydicom

    ready = tmp_path / "f.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hpcbridge",
            "sandbox",
            "serve",
            "--seed",
            "demo",
            "--port",
            "0",
            "--ready-file",
            str(ready),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(300):
            if ready.exists() or proc.poll() is not None:
                break
            __import__("time").sleep(0.1)
        info = json.loads(ready.read_text())
        assert info["pid"] == proc.pid and info["user"] == "admin"
        url = info["url"]
        netrc = tmp_path / "netrc"
        netrc.write_text("machine 127.0.0.1 login admin password admin\n")
        netrc.chmod(0o600)
        listed = subprocess.run(
            [curl, "-sS", "-f", "--netrc-file", str(netrc), url + "/data/projects?format=json"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert listed.returncode == 0, listed.stderr
        assert [r["ID"] for r in json.loads(listed.stdout)["ResultSet"]["Result"]] == ["PTV000"]
        zipped = requests.get(
            url + "/data/projects/PTV000/subjects/Haofei01/experiments/Haofei01_MR1"
            "/scans/4/files?format=zip",
            auth=("admin", "admin"),
            timeout=30,
        )
        names = zipfile.ZipFile(io.BytesIO(zipped.content)).namelist()
        assert len(names) == 12
        assert all(
            n.startswith("Haofei01_MR1/scans/4-Ax_3D_T1/resources/DICOM/files/") for n in names
        )
        ds = pydicom.dcmread(io.BytesIO(zipfile.ZipFile(io.BytesIO(zipped.content)).read(names[0])))
        assert ds.SeriesDescription == "Ax 3D T1"
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "sandbox XNAT at http://127.0.0.1:" in out
    assert not ready.exists()


def test_serve_port_in_use(demo_sandbox: SandboxServer) -> None:
    result = CliRunner().invoke(main, ["sandbox", "serve", "--port", str(demo_sandbox.port)])
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"hpcbridge: error: cannot listen on 127.0.0.1:{demo_sandbox.port}: Address already in use"
    )
