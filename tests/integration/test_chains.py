"""Job chains (`run --chain`) against a sandbox XNAT, the local scheduler and the real dcm2niix:
per scan a stage-in job, the compute job after it and a stage-out job after that, the
transfers done by `hpcbridge stage-in/stage-out` inside the jobs with a token from a private
file. The helpers and fixtures are test_runs.py's. The whole chain of every T1 is written once
for every scheduler: with the CI clusters (tests/cluster/) it runs on qsub (Slurm's PBS
wrappers), sbatch and PBS Pro too, its transfer jobs on the cluster's side of SSH.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from clusters import EVERY_SCHEDULER, SchedulerQueue
from test_runs import (  # noqa: F401  (fixtures are found by name)
    CLUSTER_FAST,
    CLUSTER_WAIT_LIMIT,
    FAST,
    PROVENANCE_FILE,
    RUN_T1,
    T1_OUTPUTS,
    T1_SCANS,
    WAIT_LIMIT,
    Crash,
    T,
    Xnat,
    cli,
    hb,
    http_timeout,
    local_jobs,
    nothing_left_running,
    sleep_until,
    states,
    status_json,
    write_recipe,
)

from hpcbridge.cli import hints
from hpcbridge.config import load_settings
from hpcbridge.errors import ConfigError
from hpcbridge.ledger import Ledger
from hpcbridge.runs import RunRequest, start_run, wait_run
from hpcbridge.runs.sync import sync
from hpcbridge.schedulers.local import LocalScheduler
from hpcbridge.xnat import connect

CHAIN_T1 = [*RUN_T1, "--chain"]
# distinctive, so a search for it in every file the run wrote finds only real leaks
PASSWORD = "Chain-Pa55word-never-on-disk"


@pytest.fixture()
def sandbox(make_sandbox: Any) -> Any:
    """This module's sandbox has an admin password worth searching for: PASSWORD."""
    return make_sandbox(admin_password=PASSWORD)


@pytest.fixture()
def xnat(
    sandbox: Any, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[Xnat]:
    """The default profile pointed at this test's sandbox, whose admin password is PASSWORD."""
    monkeypatch.setenv("HPCBRIDGE_XNAT", sandbox.url)
    monkeypatch.setenv("HPCBRIDGE_USER", sandbox.user)
    monkeypatch.setenv("HPCBRIDGE_PASSWORD", PASSWORD)
    view = Xnat(sandbox, monkeypatch, timeout=http_timeout(request))
    yield view
    view.http.close()


@pytest.fixture()
def chain_profile(run_profile: Path, isolated_home: Path, chain_settings: str) -> Path:
    """The run profile, with the transfer jobs running this checkout's hpcbridge on a queue
    whose nodes may reach XNAT (on a cluster kind)."""
    config = isolated_home / "config.toml"
    config.write_text(config.read_text() + chain_settings)
    return run_profile


STEPS = ["stage-in", "compute", "stage-out"]


def chains(home: Path) -> dict[str, list[dict[str, Any]]]:
    """The local scheduler's jobs per scan folder, in submission order."""
    found: dict[str, list[dict[str, Any]]] = {}
    for job in local_jobs(home):
        folder = job["work_dir"].split("/chain/")[0]
        found.setdefault(folder, []).append(job)
    return found


def step_of(job: dict[str, Any]) -> str:
    return job["work_dir"].rsplit("/chain/", 1)[1] if "/chain/" in job["work_dir"] else "compute"


def job_record(home: Path, job_id: str) -> dict[str, Any]:
    """hpcbridge's own record of a job (what `hpcbridge jobs` shows)."""
    from hpcbridge.jobs import JobStore

    job = JobStore(home, "default").get(job_id)
    assert job is not None, f"no record of job {job_id}"
    return job.to_json()


def every_file_text(*folders: Path) -> str:
    text = []
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and path.suffix not in (".gz", ".dcm", ".sqlite", ".nii"):
                text.append(path.read_text(errors="replace"))
    return "\n".join(text)


@pytest.mark.parametrize("kind", EVERY_SCHEDULER, indirect=True)
def test_a_chain_converts_every_t1_with_transfers_done_by_jobs(
    kind: str,
    chain_profile: Path,
    xnat: Xnat,
    isolated_home: Path,
    scheduler_queue: SchedulerQueue,
) -> None:
    limit, fast = (WAIT_LIMIT, FAST) if kind == "local" else (CLUSTER_WAIT_LIMIT, CLUSTER_FAST)
    before = xnat.stats()
    started = hb(*CHAIN_T1, timeout=limit)  # one pass: plans and submits the chains
    assert started.returncode == 0, started.stderr
    assert started.stdout == "1\n"
    assert started.stderr.count("(stage-in -> compute -> stage-out)") == 3

    # The token the jobs use is in a private file of the run's folder, not the password.
    home = chain_profile / "run-1" / ".hpcbridge-chain"
    creds = home / "credentials.json"
    # (a setgid bit inherited from PBS Pro's group folder above it gives the group nothing)
    assert stat.S_IMODE(home.stat().st_mode) & ~stat.S_ISGID == 0o700
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    stored = json.loads(creds.read_text())
    token = next(iter(stored["servers"].values()))
    assert token["secret"] and token["secret"] != PASSWORD
    assert xnat.stats()["tokens_issued"] - before["tokens_issued"] == 1

    # Three jobs per scan, each after the one before (the local scheduler's own records).
    if kind == "local":
        submitted = chains(isolated_home)
        assert len(submitted) == 3
        for jobs in submitted.values():
            assert [step_of(j) for j in jobs] == STEPS
            assert jobs[0]["after"] == []
            assert jobs[1]["after"] == [jobs[0]["id"]] and jobs[2]["after"] == [jobs[1]["id"]]

    done = hb("sync", "1", "--watch", *fast, timeout=limit)
    assert done.returncode == 0, done.stderr
    data = status_json(1)
    assert states(data) == dict.fromkeys(T1_SCANS, "uploaded")
    for scan in T1_SCANS:
        assert xnat.files(scan, "NIFTI") == T1_OUTPUTS
        prov = xnat.json_file(scan, "NIFTI", PROVENANCE_FILE)
        job = next(j for j in data["jobs"] if j["scan"] == scan)
        assert prov["job"]["id"] == job["job_id"]  # the compute job's id
        assert prov["recipe"] == "dcm2niix" and prov["converter_version"]
        assert prov["ended"]  # from the compute job's own status file
        assert prov["submitted"] and prov["submitted"] <= prov["ended"]
        assert xnat.files(scan, "NIFTI") == sorted(u["name"] for u in job["uploaded"])
        # the stage-in and stage-out ran as jobs in the work_root, on the cluster's side
        session = scan.split("/")[2]
        folder = next(chain_profile.glob(f"run-*/{session}/scans/4-*"))
        assert (folder / "resources" / "DICOM" / "manifest.json").is_file()
        assert (folder / "chain" / "stage-in" / ".hpcbridge" / "status.json").is_file()
        report = json.loads((folder / "chain" / "stage-out" / "uploaded.json").read_text())
        assert report["uploaded"] == job["uploaded"]
    for job in data["jobs"]:
        assert sorted(u["name"] for u in job["uploaded"]) == T1_OUTPUTS

    # Three jobs per scan went to the scheduler, once each; a cluster's scheduler knows them by
    # hpcbridge's names (the local one by their scripts').
    assert len(scheduler_queue.under(chain_profile)) == 9
    if kind != "local":
        run_prefix = data["jobs"][0]["name"].split("_", 1)[0]  # hb<run>-<tag>
        assert run_prefix.startswith("hb1-")
        names = sorted(j.name for j in scheduler_queue.all() if j.name.startswith(run_prefix + "_"))
        assert len(names) == 9, names
        assert sum(n.endswith("_in") for n in names) == 3
        assert sum(n.endswith("_out") for n in names) == 3

    # The password appears in no script, spec, config, log or job record, here or on the
    # cluster's side.
    assert PASSWORD not in every_file_text(isolated_home)
    for path in chain_profile.rglob("*"):
        if path.is_file() and path.suffix not in (".dcm", ".gz"):
            assert PASSWORD not in path.read_text(errors="replace"), path
    # Once the run is done, its token is gone from the cluster and refused by XNAT, and the
    # sessions the transfer jobs shared are ended: only the bridge's own (kept for its next
    # run) and this test's are live.
    assert not creds.exists()
    assert not (home / "sessions").exists()
    assert xnat.stats()["sessions_live"] == before["sessions_live"] + 1
    refused = requests.get(
        f"{xnat.server.url}/data/projects",
        auth=(token["alias"], token["secret"]),
        params={"format": "json"},
        timeout=T,
    )
    assert refused.status_code == 401


def test_a_failing_step_cancels_the_rest_of_its_chain_and_retry_redoes_it(
    xnat: Xnat, isolated_home: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "fail-marker"
    marker.touch()
    recipes = write_recipe(
        tmp_path / "recipes",
        "flaky",
        f"if [ -e '{marker}' ]; then echo \"flaky: the marker is there\" >&2; exit 3; fi\n"
        "ls {{ input_dir }} > {{ output_dir }}/listing.txt",
        resource="LISTING",
    )
    args = ["run", "flaky", "PTV000", "--scan-type", "*T1*", "--recipes", str(recipes), "--chain"]
    failed = hb(*args, "--wait", *FAST)
    assert failed.returncode == 3, failed.stderr
    data = status_json(1)
    assert states(data) == dict.fromkeys(T1_SCANS, "failed")
    for job in data["jobs"]:
        assert job["error"] == f"compute job {job['job_id']} failed: exit code 3"
        assert "flaky: the marker is there" in job["log_tail"]
    for jobs in chains(isolated_home).values():
        assert job_record(isolated_home, jobs[2]["id"])["state"] == "cancelled"  # never ran
    for scan in T1_SCANS:
        assert xnat.files(scan, "LISTING") == []

    marker.unlink()
    retried = cli("retry", "1")
    assert retried.exit_code == 0, retried.output
    assert retried.stderr.count("(stage-in -> compute -> stage-out)") == 3
    done = hb("sync", "1", "--watch", *FAST)
    assert done.returncode == 0, done.stderr
    assert states(status_json(1)) == dict.fromkeys(T1_SCANS, "uploaded")
    assert len(local_jobs(isolated_home)) == 18  # two whole chains per scan
    for scan in T1_SCANS:
        assert xnat.files(scan, "LISTING") == sorted(["listing.txt", PROVENANCE_FILE])


def test_a_bridge_command_that_cannot_run_stops_the_run_before_any_chain(
    xnat: Xnat, isolated_home: Path
) -> None:
    isolated_home.mkdir(parents=True, exist_ok=True)
    config = isolated_home / "config.toml"
    config.write_text('[profiles.default]\nbridge_command = "/nonexistent/hpcbridge"\n')
    stopped = cli(*CHAIN_T1, "--scan", "4")
    assert stopped.exit_code == 2, stopped.output
    lines = stopped.stderr.splitlines()
    assert lines[-1].startswith(
        "hpcbridge: error: run 1: the chain's transfer jobs would run `/nonexistent/hpcbridge`, "
        "which fails on this machine: "
    )
    assert lines[-1].endswith("; then `hpcbridge sync 1` goes on)")
    assert "set bridge_command in the profile to its absolute path" in lines[-1]
    assert local_jobs(isolated_home) == []  # nothing queued that would fail
    assert set(states(status_json(1)).values()) == {"planned"}

    config.write_text("")  # the default: this Python's hpcbridge
    done = hb("sync", "1", "--watch", *FAST)
    assert done.returncode == 0, done.stderr
    assert states(status_json(1)) == dict.fromkeys(T1_SCANS, "uploaded")


def test_a_failing_stage_in_cancels_the_rest_of_its_chain(
    xnat: Xnat, isolated_home: Path, tmp_path: Path
) -> None:
    from hpcbridge import __version__

    fake = tmp_path / "fake-bridge.sh"
    fake.write_text(
        'case "$*" in *--version*) echo "hpcbridge, version ' + __version__ + '"; exit 0;; esac\n'
        "echo 'fake: stage-in refused' >&2\nexit 1\n"
    )
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "config.toml").write_text(
        f'[profiles.default]\nbridge_command = "/bin/sh {fake}"\n'
    )
    failed = hb(*CHAIN_T1, "--scan", "4", "--wait", *FAST)
    assert failed.returncode == 3, failed.stderr
    for job in status_json(1)["jobs"]:
        assert job["state"] == "failed"
        assert job["error"].startswith("stage-in job ")
        assert job["error"].endswith("failed: exit code 1")
        assert "fake: stage-in refused" in job["log_tail"]
    for jobs in chains(isolated_home).values():
        for later in jobs[1:]:
            assert job_record(isolated_home, later["id"])["state"] == "cancelled"


def test_dry_run_with_chain_prints_the_three_scripts_and_changes_nothing(
    xnat: Xnat, isolated_home: Path
) -> None:
    before = xnat.stats()
    result = cli(*CHAIN_T1, "--dry-run")
    assert result.exit_code == 0, result.output
    for title in ("stage-in job", "compute job", "stage-out job"):
        assert f"# {title} script for {T1_SCANS[0]}:" in result.stderr
    assert result.stdout.count("#!/bin/bash") == 3
    assert " stage-in " in result.stdout and " stage-out " in result.stdout
    assert "dcm2niix -z y" in result.stdout
    assert PASSWORD not in result.output
    after = xnat.stats()
    assert after["tokens_issued"] == before["tokens_issued"]
    assert not (isolated_home / "ledger.sqlite").exists()
    assert not (isolated_home / "work").exists()
    assert local_jobs(isolated_home) == []


def test_a_token_that_may_expire_before_the_chain_ends_is_warned_about_and_replaced(
    make_sandbox: Any, isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hpcbridge.sandbox.auth import AuthSettings

    server = make_sandbox(auth=AuthSettings(token_lifetime=3600.0))
    monkeypatch.setenv("HPCBRIDGE_XNAT", server.url)
    monkeypatch.setenv("HPCBRIDGE_USER", server.user)
    monkeypatch.setenv("HPCBRIDGE_PASSWORD", server.password)
    started = cli(*CHAIN_T1, "--max-queued", "1")
    assert started.exit_code == 0, started.output
    warnings = [line for line in started.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1, started.stderr
    assert warnings[0].startswith("hpcbridge: warning: the XNAT token the chains use expires on ")
    assert "02:20:00 of walltime plus up to 12 h queued" in warnings[0]
    assert len(server.store.tokens_of(server.user)) == 1

    # Each pass that submits a chain needs a token lasting its walltimes: a new one replaces
    # the old. The old stays valid while the run goes on (jobs that read it when they started
    # log in with it again when their session expires); at the end of the run none is left.
    chain_home = isolated_home / "work" / "run-1" / ".hpcbridge-chain"

    def installed() -> dict[str, Any]:
        stored = json.loads((chain_home / "credentials.json").read_text())
        return dict(next(iter(stored["servers"].values())))

    first = installed()
    warned = 0
    deadline = time.monotonic() + WAIT_LIMIT
    while True:
        step = hb("sync", "1")
        assert step.returncode == 0, step.stderr
        warned += step.stderr.count("hpcbridge: warning: the XNAT token")
        if installed()["alias"] != first["alias"]:
            break
        assert time.monotonic() < deadline, "the token was never replaced"
        time.sleep(0.2)
    live = [t["alias"] for t in server.store.tokens_of(server.user)]
    assert first["alias"] in live and len(live) == 2
    retired = json.loads((chain_home / "retired-tokens.json").read_text())
    assert retired == {"aliases": [first["alias"]]}
    done = hb("sync", "1", "--watch", *FAST)
    assert done.returncode == 0, done.stderr
    warned += done.stderr.count("hpcbridge: warning: the XNAT token")
    assert warned == 2  # two more submissions
    assert states(status_json(1)) == dict.fromkeys(T1_SCANS, "uploaded")
    assert server.store.tokens_of(server.user) == []
    assert not (chain_home / "retired-tokens.json").exists()


class SaveCrash(Crash):
    pass


def test_a_chain_cut_by_a_crash_between_its_jobs_is_completed_not_repeated(
    xnat: Xnat, isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bridge dies after the scheduler took a chain's compute job but before the job was
    recorded anywhere of ours: the next pass finds it in the scheduler and submits only the
    stage-out job."""
    from hpcbridge import chain as chain_module
    from hpcbridge import jobs as jobs_module

    settings = load_settings()
    scheduler = LocalScheduler(isolated_home / "local-jobs")
    # the bridge command is tried once per connection, not on every pass that submits chains
    tried: list[list[str]] = []
    check = chain_module._check_bridge

    def counted_check(transport: Any, bridge: list[str], where: str) -> str | None:
        tried.append(bridge)
        return check(transport, bridge, where)

    monkeypatch.setattr(chain_module, "_check_bridge", counted_check)
    bounded_sleep = sleep_until(time.monotonic() + WAIT_LIMIT)

    with Ledger.for_settings(settings) as ledger, connect(settings) as client:
        plan = start_run(
            settings, client, ledger, RunRequest("dcm2niix", "PTV000", ("4",), chain=True)
        )
        assert plan.run is not None
        save = jobs_module.JobStore.save
        saved: list[str] = []

        def crash_on_second_save(self: Any, job: Any) -> None:
            if len(saved) == 1:
                raise SaveCrash
            saved.append(job.native_id)
            save(self, job)

        monkeypatch.setattr(jobs_module.JobStore, "save", crash_on_second_save)
        with pytest.raises(SaveCrash):
            sync(settings, client, ledger, scheduler, plan.run)
        monkeypatch.setattr(jobs_module.JobStore, "save", save)
        assert len(local_jobs(isolated_home)) == 2  # stage-in and compute of the first scan

        report = wait_run(
            settings, client, ledger, scheduler, plan.run, interval=0.2, sleep=bounded_sleep
        )
    assert report.counts["uploaded"] == 3, report
    assert len(tried) == 1, tried  # two passes submitted chains
    submitted = chains(isolated_home)
    assert len(local_jobs(isolated_home)) == 9  # nothing submitted twice
    for jobs in submitted.values():
        assert [step_of(j) for j in jobs] == STEPS
    for scan in T1_SCANS:
        assert xnat.files(scan, "NIFTI") == T1_OUTPUTS


def test_stage_out_spec_errors_are_one_line(xnat: Xnat, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    spec = tmp_path / "spec.json"
    spec.write_text('{"outputs": "not a list of outputs"}')
    scan = T1_SCANS[0]
    bad = cli("stage-out", scan, "--spec", str(spec), str(out))
    assert bad.exit_code == 1
    assert bad.stderr.startswith(f"hpcbridge: error: {spec}: not a stage-out spec written by ")
    assert len(bad.stderr.splitlines()) == 1
    both = cli("stage-out", scan, "--spec", str(spec), "--resource", "NIFTI", str(out))
    assert both.exit_code == 2
    assert "--spec takes one output folder and no --resource or --assessor" in both.stderr
    neither = cli("stage-out", scan, str(out))
    assert neither.exit_code == 2 and "Missing option '--resource'." in neither.stderr
    spec.write_text(json.dumps({"outputs": [{"glob": "*.txt", "resource": "R"}], "provenance": {}}))
    missing = cli("stage-out", scan, "--spec", str(spec), str(tmp_path / "nope"))
    assert missing.exit_code == 1
    assert missing.stderr == f"hpcbridge: error: {tmp_path / 'nope'}: no such output folder\n"
    empty = cli("stage-out", scan, "--spec", str(spec), str(out))
    assert empty.exit_code == 1
    assert empty.stderr == f"hpcbridge: error: the job wrote no output matching *.txt in {out}\n"


def test_a_stage_out_job_that_reports_nothing_fails_its_scan_when_a_second_pass_finds_the_same(
    xnat: Xnat, isolated_home: Path, tmp_path: Path
) -> None:
    import shlex
    import sys

    real = shlex.join([sys.executable, "-m", "hpcbridge"])
    fake = tmp_path / "bridge.sh"  # the real stage-in; a stage-out that ends 0 having done nothing
    fake.write_text(f'case "$*" in *stage-out*) exit 0;; esac\nexec {real} "$@"\n')
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "config.toml").write_text(
        f'[profiles.default]\nbridge_command = "/bin/sh {fake}"\nretry_interval = 0.5\n'
    )
    failed = hb(*CHAIN_T1, "--scan", "4", "--wait", *FAST)
    assert failed.returncode == 3, failed.stderr
    for job in status_json(1)["jobs"]:
        folder = job["work_dir"]
        assert job["state"] == "failed"
        assert job["error"] == (
            "stage-out failed: the stage-out job ended without a readable report at "
            f"{folder}/chain/stage-out/uploaded.json"
        )
    # A missing report is no passing trouble: tried once more, then the scan fails.
    assert failed.stderr.count("stage-out failed, will retry once at ") == 3
    for scan in T1_SCANS:
        assert xnat.files(scan, "NIFTI") == []


def test_a_server_that_issues_no_token_stops_chains_with_one_warning(
    xnat: Xnat, isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hpcbridge.errors import XnatPermissionError
    from hpcbridge.xnat.client import XnatClient

    def refuse(self: XnatClient) -> dict[str, Any]:
        raise XnatPermissionError("not allowed: issuing an alias token")

    monkeypatch.setattr(XnatClient, "issue_token", refuse)
    started = cli(*CHAIN_T1, "--scan", "4")
    assert started.exit_code == 0, started.output
    warnings = [line for line in started.stderr.splitlines() if "warning" in line]
    assert warnings == [
        "hpcbridge: warning: no chains submitted: cannot issue an XNAT alias token for the "
        "chain's transfer jobs: not allowed: issuing an alias token (run `hpcbridge login` "
        "(it stores a token the chains can use))"
    ]
    assert local_jobs(isolated_home) == []
    assert set(states(status_json(1)).values()) == {"planned"}


# --- PBS: the transfer jobs need a queue whose nodes reach XNAT (Artemis: dtq) -------------


def _profile(home: Path, **keys: str) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    config = home / "config.toml"
    lines = "".join(f'{key} = "{value}"\n' for key, value in keys.items())
    config.write_text(f'default_profile = "artemis"\n[profiles.artemis]\n{lines}')
    return config


def _no_transfer_queue(scheduler: str, config: Path) -> str:
    return (
        f"hpcbridge: error: run --chain on the {scheduler} scheduler needs the profile's "
        "transfer_queue: its stage-in and stage-out jobs talk to XNAT, which compute nodes "
        "usually cannot reach; on Artemis only the data-transfer queue dtq can "
        f'(add transfer_queue = "dtq" to [profiles.artemis] in {config}, naming your site\'s '
        "data-transfer queue)\n"
    )


@pytest.mark.parametrize("scheduler", ["pbs", "torque"])
def test_a_pbs_chain_without_a_transfer_queue_is_refused_before_anything_changes(
    xnat: Xnat, isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scheduler: str
) -> None:
    """On Artemis `queue` is the compute queue, whose nodes cannot reach XNAT: it is no
    stand-in for the transfer queue, so a profile naming only it is refused too."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    called = tmp_path / "scheduler-called"
    for tool in ("qsub", "qstat", "qdel"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "$0 $*" >> {called}\nexit 1\n')
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    config = _profile(isolated_home, scheduler=scheduler, queue="defaultQ", account="PTV000")
    before = xnat.stats()["sessions_created"]
    for extra in ([], ["--dry-run"], ["--wait"]):
        refused = cli(*CHAIN_T1, *extra)
        assert refused.exit_code == 2, (extra, refused.output)
        assert refused.stderr == _no_transfer_queue(scheduler, config), extra
        assert refused.stdout == ""
    assert not called.exists()  # no qsub, not even a qstat --version
    assert xnat.stats()["sessions_created"] == before  # XNAT not even asked
    assert not (isolated_home / "ledger.sqlite").exists()
    assert not (isolated_home / "work").exists()
    # The same run without --chain is not the chain's business: its dry run goes ahead.
    plain = cli(*RUN_T1, "--dry-run")
    assert plain.exit_code == 0, plain.output


def test_a_pbs_chain_puts_its_transfer_jobs_on_the_transfer_queue(
    xnat: Xnat, isolated_home: Path
) -> None:
    _profile(isolated_home, scheduler="pbs", queue="defaultQ", account="PTV000",
             transfer_queue="dtq", pbs_flavour="pbspro")  # fmt: skip
    shown = cli(*CHAIN_T1, "--dry-run")
    assert shown.exit_code == 0, shown.output
    stage_in, compute, stage_out = shown.stdout.split("#!/bin/bash")[1:]
    for transfer in (stage_in, stage_out):
        assert "#PBS -q dtq\n" in transfer and "#PBS -P PTV000\n" in transfer
    assert "#PBS -q defaultQ\n" in compute and "dcm2niix" in compute


def test_a_slurm_chain_without_a_transfer_queue_uses_the_profile_partition(
    xnat: Xnat, isolated_home: Path
) -> None:
    _profile(isolated_home, scheduler="slurm", queue="batch")
    shown = cli(*CHAIN_T1, "--dry-run")
    assert shown.exit_code == 0, shown.output
    assert shown.stdout.count("#SBATCH --partition=batch\n") == 3


def test_sync_submits_no_chain_once_a_pbs_profile_lacks_its_transfer_queue(
    xnat: Xnat, isolated_home: Path
) -> None:
    """A chain run started before the transfer queue was required (or whose profile lost it):
    the next pass stops before queueing stage-in jobs that could not reach XNAT."""
    settings = load_settings()
    pbs = dataclasses.replace(settings, scheduler="pbs")
    scheduler = LocalScheduler(isolated_home / "local-jobs")
    request = RunRequest("dcm2niix", "PTV000", ("4",), chain=True)
    with Ledger.for_settings(settings) as ledger, connect(settings) as client:
        with pytest.raises(ConfigError, match="needs the profile's transfer_queue"):
            start_run(pbs, client, ledger, request)
        assert ledger.runs() == []
        plan = start_run(settings, client, ledger, request)
        assert plan.run is not None
        with pytest.raises(ConfigError) as stopped:
            sync(pbs, client, ledger, scheduler, plan.run)
        assert stopped.value.message.startswith(
            f"run {plan.run.id}: run --chain on the pbs scheduler needs the profile's "
            "transfer_queue"
        )
        hint = hints.hint(stopped.value)
        assert hint is not None
        assert hint.endswith(f"then `hpcbridge sync {plan.run.id}` goes on")
        assert {job.state.value for job in ledger.jobs(plan.run.id)} == {"planned"}
    assert local_jobs(isolated_home) == []


def test_cancel_of_a_chain_run_ends_its_token_at_once(xnat: Xnat, isolated_home: Path) -> None:
    # The token is a credential on the cluster: a cancelled run must not leave it valid
    # until it expires, nor wait for a sync that may never come.
    started = hb(*CHAIN_T1)
    assert started.returncode == 0, started.stderr
    creds = isolated_home / "work" / "run-1" / ".hpcbridge-chain" / "credentials.json"
    token = next(iter(json.loads(creds.read_text())["servers"].values()))
    cancelled = hb("cancel", "--run", "1")
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.startswith("run 1: cancelled ")
    assert not creds.exists()
    refused = requests.get(
        f"{xnat.server.url}/data/projects",
        auth=(token["alias"], token["secret"]),
        params={"format": "json"},
        timeout=T,
    )
    assert refused.status_code == 401
