"""Stage-out never reads through a symbolic link, nor a FIFO, socket or device, nor one of
hpcbridge's own secret files, whatever name it has: `stage-out` (paths and folders), `stage-out
--spec` (a chain's stage-out job), and runs (`run`, `sync`, on this machine and over SSH).

A job writes its output folder, and some tools link their inputs into it; a link there would
otherwise upload what it points to, such as $HPCBRIDGE_HOME/credentials.json. Every case here
checks the one-line error that names the file, and that nothing of it reached XNAT: no upload,
and not even the resource. Commands that could block on a FIFO run as subprocesses with a
timeout; the sandbox XNAT is real, over loopback.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from test_runs import (  # noqa: F401  (fixtures are found by name)
    FAST,
    PROVENANCE_FILE,
    T1_SCANS,
    WAIT_LIMIT,
    T,
    Xnat,
    hb,
    local_jobs,
    nothing_left_running,
    status_json,
    write_recipe,
)

from hpcbridge.cli import main
from hpcbridge.credentials import SessionCache, TokenStore, write_private
from hpcbridge.jobs import JobStore
from hpcbridge.sandbox import SandboxServer

SCAN4 = T1_SCANS[0]  # PTV000/Haofei01/Haofei01_MR1/4
ELSEWHERE = "https://xnat.example.org"  # a server the secrets are for: not the sandbox
SECRET = "Token-S3cret-never-in-xnat"
NETRC_SECRET = "Netrc-S3cret-never-in-xnat"


@pytest.fixture()
def xnat(sandbox: SandboxServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Xnat]:
    """The default profile pointed at a fresh sandbox of this test's own (as test_runs.py)."""
    monkeypatch.setenv("HPCBRIDGE_XNAT", sandbox.url)
    monkeypatch.setenv("HPCBRIDGE_USER", sandbox.user)
    monkeypatch.setenv("HPCBRIDGE_PASSWORD", sandbox.password)
    view = Xnat(sandbox, monkeypatch)
    yield view
    view.http.close()


@pytest.fixture()
def secrets(
    isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Path]:
    """The files of secrets an hpcbridge user has: a login's token, a cached session, the
    sandbox's ready-file and a netrc, each written as hpcbridge writes them (0600)."""
    TokenStore.under(isolated_home).put(ELSEWHERE, user="u", alias="a", secret=SECRET, expires=None)
    SessionCache.under(isolated_home).put(ELSEWHERE, "u", "JSESSION-S3cret")
    ready = isolated_home / "sandbox" / "ready.json"
    write_private(ready, {"url": "http://127.0.0.1:1", "user": "admin", "password": "admin"})
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine xnat.example.org login u password {NETRC_SECRET}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    [session] = (isolated_home / "sessions").iterdir()
    return {
        "credentials": isolated_home / "credentials.json",
        "session": session,
        "ready": ready,
        "netrc": netrc,
    }


def refused(path: object, what: str, scope: str = "given") -> str:
    return f"{path} is {what}; refusing to upload it or anything else {scope}"


def link(target: object) -> str:
    return f"a symbolic link (to {target})"


def same_file(secret: Path) -> str:
    return f"the same file as {secret}, which holds credentials"


def resource_exists(xnat: Xnat, scan: str, resource: str) -> bool:
    project, subject, experiment, scan_id = scan.split("/")
    resp = xnat.http.get(
        f"{xnat.server.url}/data/projects/{project}/subjects/{subject}/experiments/"
        f"{experiment}/scans/{scan_id}/resources",
        params={"format": "json"},
        timeout=T,
    )
    resp.raise_for_status()
    return resource in {r["label"] for r in resp.json()["ResultSet"]["Result"]}


def puts(xnat: Xnat) -> int:
    return int(xnat.stats()["requests"].get("PUT", 0))


def bridge(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """hpcbridge in a subprocess that cannot outlive ``timeout``: opening a FIFO would block."""
    return subprocess.run(
        [sys.executable, "-m", "hpcbridge", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ),
    )


def one_line(returncode: int, stdout: str, stderr: str) -> str:
    assert returncode == 1, (stdout, stderr)
    assert stdout == "" and "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("hpcbridge: error: ")
    return lines[0].removeprefix("hpcbridge: error: ")


def assert_nothing_sent(xnat: Xnat, before: int, resource: str = "NIFTI") -> None:
    assert puts(xnat) == before
    assert not resource_exists(xnat, SCAN4, resource)


# -- hpcbridge stage-out: what a folder given holds --------------------------------------------

Plant = Callable[[Path, dict[str, Path]], tuple[Path, str]]


def _absolute_link(out: Path, s: dict[str, Path]) -> tuple[Path, str]:
    (out / "T1.nii.gz").symlink_to(s["credentials"])
    return out / "T1.nii.gz", link(s["credentials"])


def _relative_link(out: Path, s: dict[str, Path]) -> tuple[Path, str]:
    target = os.path.relpath(s["credentials"], out)
    (out / "T1.json").symlink_to(target)
    return out / "T1.json", link(target)


def _link_to_a_folder(out: Path, s: dict[str, Path]) -> tuple[Path, str]:
    (out / "state").symlink_to(s["credentials"].parent, target_is_directory=True)
    return out / "state", link(s["credentials"].parent)


def _dangling_link(out: Path, s: dict[str, Path]) -> tuple[Path, str]:
    (out / "T1.json").symlink_to(out / "gone.json")
    return out / "T1.json", link(out / "gone.json")


def _link_in_a_sub_folder(out: Path, s: dict[str, Path]) -> tuple[Path, str]:
    (out / "anat").mkdir()
    (out / "anat" / "T1w.json").symlink_to(s["session"])
    return out / "anat" / "T1w.json", link(s["session"])


def _hard_link(key: str) -> Plant:
    def plant(out: Path, s: dict[str, Path]) -> tuple[Path, str]:
        os.link(s[key], out / "T1.json")
        return out / "T1.json", same_file(s[key])

    return plant


def _fifo(out: Path, s: dict[str, Path]) -> tuple[Path, str]:
    os.mkfifo(out / "T1.nii.gz")
    return out / "T1.nii.gz", "a named pipe (FIFO)"


def _socket(out: Path, s: dict[str, Path]) -> tuple[Path, str]:
    here = os.getcwd()
    os.chdir(out)  # a socket's path must be short: bind the name, not the whole path
    try:
        with socket.socket(socket.AF_UNIX) as server:
            server.bind("T1.nii.gz")  # the socket file stays when it is closed
    finally:
        os.chdir(here)
    return out / "T1.nii.gz", "a socket"


def _zero_device(out: Path, s: dict[str, Path]) -> tuple[Path, str]:
    if os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    os.mknod(out / "T1.nii.gz", stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero: endless
    return out / "T1.nii.gz", "a character device"


HOSTILE: dict[str, Plant] = {
    "absolute link to credentials.json": _absolute_link,
    "relative link to credentials.json": _relative_link,
    "link to the state folder": _link_to_a_folder,
    "dangling link": _dangling_link,
    "link to a session file in a sub-folder": _link_in_a_sub_folder,
    "hard link to credentials.json": _hard_link("credentials"),
    "hard link to a cached session": _hard_link("session"),
    "hard link to the sandbox's ready-file": _hard_link("ready"),
    "hard link to the netrc": _hard_link("netrc"),
    "FIFO": _fifo,
    "socket": _socket,
    "character device": _zero_device,
}


@pytest.mark.parametrize("plant", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_folder_holding_a_link_or_special_file_uploads_nothing(
    xnat: Xnat, secrets: dict[str, Path], tmp_path: Path, plant: Plant
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_good.nii.gz").write_bytes(b"\x1f\x8b image")
    (out / "z_good.json").write_text("{}")
    bad, what = plant(out, secrets)
    before = puts(xnat)
    done = bridge("stage-out", SCAN4, "--resource", "NIFTI", str(out), timeout=30)
    assert one_line(done.returncode, done.stdout, done.stderr) == refused(bad, what)
    assert_nothing_sent(xnat, before)


@pytest.mark.parametrize(
    "plant",
    [_absolute_link, _relative_link, _dangling_link, _hard_link("credentials"), _fifo],
    ids=["absolute link", "relative link", "dangling link", "hard link", "FIFO"],
)
def test_a_link_or_special_file_given_as_a_path_uploads_nothing(
    xnat: Xnat, secrets: dict[str, Path], tmp_path: Path, plant: Plant
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "good.json").write_text("{}")
    bad, what = plant(out, secrets)
    before = puts(xnat)
    args = ("stage-out", SCAN4, "--resource", "NIFTI", str(out / "good.json"), str(bad))
    done = bridge(*args, timeout=30)
    assert one_line(done.returncode, done.stdout, done.stderr) == refused(bad, what)
    assert_nothing_sent(xnat, before)


def test_the_credential_file_itself_and_a_linked_folder_given_are_refused(
    xnat: Xnat, secrets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = puts(xnat)
    cred = secrets["credentials"]
    result = CliRunner().invoke(main, ["stage-out", SCAN4, "--resource", "NIFTI", str(cred)])
    assert one_line(result.exit_code, result.stdout, result.stderr) == refused(
        cred, same_file(cred)
    )
    # the output folder itself a link (to the state folder), given by a relative name
    (tmp_path / "out").symlink_to(cred.parent, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["stage-out", SCAN4, "--resource", "NIFTI", "out"])
    assert one_line(result.exit_code, result.stdout, result.stderr) == refused(
        "out", link(cred.parent)
    )
    assert_nothing_sent(xnat, before)


def test_regular_files_and_folders_still_go_up(
    xnat: Xnat, secrets: dict[str, Path], tmp_path: Path
) -> None:
    """The checks refuse only what they must: plain files, sub-folders and small-file zips
    upload as before, even beside the secrets' folder."""
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    for i in range(9):
        (out / "sub" / f"slice_{i}.txt").write_text(f"slice {i}\n")
    (out / "T1.json").write_text("{}")
    result = CliRunner().invoke(main, ["stage-out", SCAN4, "--resource", "QC", str(out)])
    assert result.exit_code == 0, result.output
    assert xnat.files(SCAN4, "QC") == sorted(["T1.json", *(f"slice_{i}.txt" for i in range(9))])


# -- hpcbridge stage-out --spec: a chain's stage-out job ----------------------------------------


@pytest.mark.parametrize(
    "plant",
    [_absolute_link, _relative_link, _hard_link("credentials"), _fifo],
    ids=["absolute link", "relative link", "hard link", "FIFO"],
)
def test_stage_out_spec_refuses_an_output_that_is_a_link_or_special_file(
    xnat: Xnat, secrets: dict[str, Path], tmp_path: Path, plant: Plant
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.nii.gz").write_bytes(b"\x1f\x8b image")
    bad, what = plant(out, secrets)
    spec = tmp_path / "spec.json"
    globs = [{"glob": g, "resource": "NIFTI"} for g in ("*.nii.gz", "*.json")]
    spec.write_text(json.dumps({"outputs": globs, "provenance": {}}))
    before = puts(xnat)
    done = bridge("stage-out", SCAN4, "--spec", str(spec), str(out), timeout=30)
    assert one_line(done.returncode, done.stdout, done.stderr) == refused(bad, what, "of this scan")
    assert_nothing_sent(xnat, before)
    assert not (out / PROVENANCE_FILE).exists()  # nothing written before the checks either


def test_stage_out_spec_refuses_an_output_folder_that_is_a_link(
    xnat: Xnat, secrets: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.symlink_to(secrets["credentials"].parent, target_is_directory=True)
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps({"outputs": [{"glob": "*.json", "resource": "R"}], "provenance": {}})
    )
    before = puts(xnat)
    done = bridge("stage-out", SCAN4, "--spec", str(spec), str(out), timeout=30)
    line = one_line(done.returncode, done.stdout, done.stderr)
    assert line == refused(out, link(secrets["credentials"].parent), "of this scan")
    assert_nothing_sent(xnat, before, "R")
    assert not (secrets["credentials"].parent / PROVENANCE_FILE).exists()


# -- runs: the job leaves the link; its scan fails, the others upload ---------------------------

# From <work_root>/run-1/<experiment>/scans/<scan>-<type>/out to $HPCBRIDGE_HOME, where the
# default work_root (HPCBRIDGE_HOME/work) is.
UP_TO_HOME = "../../../../../.."

RUN_CASES = {
    # name: (what the job of Haofei01 does, the entry refused (relative to out), what it is)
    "absolute link": ("ln -s {home}/credentials.json {out}/stolen.txt", "stolen.txt", None),
    "relative link": (
        f"ln -s {UP_TO_HOME}/credentials.json {{out}}/stolen.txt",
        "stolen.txt",
        None,
    ),
    "hard link": ("ln {home}/credentials.json {out}/stolen.txt", "stolen.txt", "same"),
    "FIFO": ("mkfifo {out}/stolen.txt", "stolen.txt", "a named pipe (FIFO)"),
    # Not matched by the recipe's *.txt: still a link among the scan's outputs.
    "link no pattern matches": ("ln -s {home} {out}/state.dat", "state.dat", None),
    "FIFO in a sub-folder": (
        "mkdir {out}/sub && mkfifo {out}/sub/pipe",
        "sub/pipe",
        "a named pipe (FIFO)",
    ),
    "output folder a link": ("rm -r {out} && ln -s {home} {out}", "", None),
}


@pytest.mark.parametrize("case", RUN_CASES.values(), ids=RUN_CASES.keys())
def test_a_run_fails_the_scan_whose_job_left_a_link_and_uploads_the_others(
    xnat: Xnat, secrets: dict[str, Path], isolated_home: Path, tmp_path: Path, case: Any
) -> None:
    command, bad_name, what = case
    hostile = command.format(home=isolated_home, out="{{ output_dir }}")
    recipes = write_recipe(
        tmp_path / "recipes",
        "linker",
        "echo fine > {{ output_dir }}/ok.txt\n"
        f"if [ {{{{ scan.subject }}}} = Haofei01 ]; then {hostile}; fi",
    )
    args = ["run", "linker", "PTV000", "--scan-type", "*T1*", "--recipes", str(recipes)]
    done = hb(*args, "--wait", *FAST)
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr
    assert "will retry" not in done.stderr  # refused at once: retrying would find the same

    jobs = {j["scan"]: j for j in status_json(1)["jobs"]}
    bad_job = jobs[SCAN4]
    out = Path(bad_job["work_dir"]) / "out"
    bad = out / bad_name if bad_name else out
    if what is None:
        what = link(os.readlink(bad))
    elif what == "same":
        what = same_file(secrets["credentials"])
    error = refused(bad, what, "of this scan")
    assert bad_job["state"] == "failed"
    assert bad_job["error"] == f"stage-out failed: {error}"
    assert done.stderr.count(f"{SCAN4}: failed: stage-out: {error}\n") == 1
    assert not resource_exists(xnat, SCAN4, "RESULT")  # not even ok.txt went up
    for scan in T1_SCANS[1:]:
        assert jobs[scan]["state"] == "uploaded"
        assert xnat.files(scan, "RESULT") == ["hpcbridge-provenance.json", "ok.txt"]
    assert not (isolated_home / PROVENANCE_FILE).exists()  # nor written through the link
    assert len(local_jobs(isolated_home)) == 3


@pytest.mark.parametrize("how", ["ln -s", "ln"], ids=["symbolic link", "hard link"])
def test_a_chain_stage_out_job_refuses_a_link_to_the_chain_token(
    xnat: Xnat, isolated_home: Path, tmp_path: Path, how: str
) -> None:
    """The token a chain's transfer jobs use sits in the run's folder, within a job's reach."""
    token = "../../../../.hpcbridge-chain/credentials.json"  # from the scan's out/
    recipes = write_recipe(
        tmp_path / "recipes",
        "linker",
        "echo fine > {{ output_dir }}/ok.txt\n"
        f"if [ {{{{ scan.subject }}}} = Haofei01 ]; then cd {{{{ output_dir }}}}; "
        f"{how} {token} stolen.txt; fi",
    )
    args = ["run", "linker", "PTV000", "--scan-type", "*T1*", "--recipes", str(recipes)]
    done = hb(*args, "--chain", "--wait", *FAST, timeout=WAIT_LIMIT * 2)
    assert done.returncode == 3, done.stderr
    jobs = {j["scan"]: j for j in status_json(1)["jobs"]}
    bad_job = jobs[SCAN4]
    assert bad_job["state"] == "failed"
    assert bad_job["error"].startswith("stage-out job ")
    assert bad_job["error"].endswith(" failed: exit code 1")
    out = Path(bad_job["work_dir"]) / "out"
    chain_token = isolated_home / "work" / "run-1" / ".hpcbridge-chain" / "credentials.json"
    what = link(token) if how == "ln -s" else same_file(chain_token)
    error = refused(out / "stolen.txt", what, "of this scan")
    assert f"hpcbridge: error: {error}" in bad_job["log_tail"]
    assert not resource_exists(xnat, SCAN4, "RESULT")
    for scan in T1_SCANS[1:]:
        assert jobs[scan]["state"] == "uploaded"
        assert xnat.files(scan, "RESULT") == ["hpcbridge-provenance.json", "ok.txt"]


# -- over SSH: outputs copied back by SFTP ------------------------------------------------------


@pytest.fixture()
def cluster_ssh(cluster: dict[str, Any]) -> Iterator[Any]:
    """An SSH connection to the test cluster's sshd (a real one, on loopback)."""
    from hpcbridge.ssh import SshTransport

    with SshTransport(
        cluster["ssh"]["alias"], ssh_config=Path(cluster["ssh"]["ssh_config"])
    ) as ssh:
        ssh.sftp_timeout = 10.0  # an open that blocks (a FIFO) fails the test, not hangs it
        yield ssh


SFTP_CASES: dict[str, tuple[str, str, str | None]] = {
    # name: (shell commands run in the scan folder, the entry refused, what it is)
    "link to credentials.json": ("ln -s {secret} out/T1.txt", "out/T1.txt", None),
    "relative link": ("ln -s ../../secret.json out/T1.txt", "out/T1.txt", None),
    "dangling link": ("ln -s /nonexistent out/T1.txt", "out/T1.txt", None),
    "link to a folder": ("ln -s {home} out/state", "out/state", None),
    "FIFO": ("mkfifo out/T1.txt", "out/T1.txt", "a named pipe (FIFO)"),
    "output folder a link": ("rm -r out && ln -s {home} out", "out", None),
    "a folder above it a link": (
        "mkdir ../real && mv out ../real/ && cd .. && rmdir scan && ln -s real scan",
        "scan",
        None,
    ),
}


@pytest.mark.parametrize("case", SFTP_CASES.values(), ids=SFTP_CASES.keys())
def test_outputs_copied_over_sftp_never_follow_a_link(
    cluster_ssh: Any, tmp_path: Path, case: tuple[str, str, str | None]
) -> None:
    from hpcbridge.stageout import RefusedFileError

    command, bad_name, what = case
    home = tmp_path / "home"
    home.mkdir()
    secret = home / "credentials.json"
    secret.write_text(json.dumps({"secret": SECRET}))
    (tmp_path / "secret.json").write_text(json.dumps({"secret": SECRET}))
    root = tmp_path / "run-1" / "exp"
    scan = root / "scan"
    (scan / "out").mkdir(parents=True)
    (scan / "out" / "ok.txt").write_text("fine\n")
    subprocess.run(
        ["sh", "-c", command.format(secret=secret, home=home)], cwd=scan, check=True, timeout=T
    )
    bad = (root if bad_name == "scan" else scan) / bad_name
    if what is None:
        what = link(os.readlink(bad))
    local = tmp_path / "fetched"
    local.mkdir()
    with pytest.raises(RefusedFileError) as refusal:
        cluster_ssh.get_files(f"{scan}/out", local, below=str(tmp_path / "run-1"), scope="here")
    assert refusal.value.message == refused(bad, what, "here")
    assert list(local.iterdir()) == []  # nothing copied before the check


def test_regular_outputs_are_copied_over_sftp_and_sub_folders_left(
    cluster_ssh: Any, tmp_path: Path
) -> None:
    out = tmp_path / "run-1" / "scan" / "out"
    (out / "sub").mkdir(parents=True)
    (out / "a.txt").write_text("a\n")
    (out / "b.json").write_text("{}")
    (out / "sub" / "c.txt").write_text("c\n")
    local = tmp_path / "fetched"
    local.mkdir()
    names = cluster_ssh.get_files(str(out), local, below=str(tmp_path / "run-1"))
    assert names == ["a.txt", "b.json"]
    assert sorted(p.name for p in local.iterdir()) == ["a.txt", "b.json"]
    assert (local / "a.txt").read_text() == "a\n"
    missing = cluster_ssh.get_files(str(tmp_path / "nope" / "out"), local, below=str(tmp_path))
    assert missing == []


@pytest.mark.e2e
def test_a_run_over_ssh_fails_the_scan_whose_job_left_a_link(
    cluster: dict[str, Any],
    xnat: Xnat,
    secrets: dict[str, Path],
    isolated_home: Path,
    tmp_path: Path,
) -> None:
    """The whole way: a Slurm job on the cluster links the bridge's credentials into its
    output folder; the bridge, copying outputs back over SFTP, refuses it."""
    work_root = tmp_path / "cluster-work"
    (isolated_home / "config.toml").write_text(
        'default_profile = "ci"\n\n[profiles.ci]\n'
        f'host = "{cluster["ssh"]["alias"]}"\n'
        f'ssh_config = "{cluster["ssh"]["ssh_config"]}"\n'
        'scheduler = "slurm"\n'
        f'work_root = "{work_root}"\n'
    )
    cred = secrets["credentials"]
    recipes = write_recipe(
        tmp_path / "recipes",
        "linker",
        "echo fine > {{ output_dir }}/ok.txt\n"
        "if [ {{ scan.subject }} = Haofei01 ]; then "
        f"ln -s {cred} {{{{ output_dir }}}}/T1.txt; fi",
    )
    args = ["run", "linker", "PTV000", "--scan-type", "*T1*", "--recipes", str(recipes)]
    try:
        done = hb(*args, "--wait", *FAST, timeout=WAIT_LIMIT * 3)
    finally:
        # a run cut short leaves nothing queued: its jobs are cancelled by their ids
        live = [j.native_id for j in JobStore(isolated_home, "ci").all() if not j.final]
        if live:
            subprocess.run(["scancel", *live], capture_output=True, timeout=T, check=False)
    assert done.returncode == 3, done.stderr
    jobs = {j["scan"]: j for j in status_json(1)["jobs"]}
    out = Path(jobs[SCAN4]["work_dir"]) / "out"
    assert str(out).startswith(str(work_root))  # the remote folder, named as the cluster has it
    assert jobs[SCAN4]["state"] == "failed"
    assert jobs[SCAN4]["error"] == (
        f"stage-out failed: {refused(out / 'T1.txt', link(cred), 'of this scan')}"
    )
    assert not resource_exists(xnat, SCAN4, "RESULT")
    assert not list((isolated_home / "staging").rglob("T1.txt"))  # not even copied back
    for scan in T1_SCANS[1:]:
        assert jobs[scan]["state"] == "uploaded"
        assert xnat.files(scan, "RESULT") == ["hpcbridge-provenance.json", "ok.txt"]
