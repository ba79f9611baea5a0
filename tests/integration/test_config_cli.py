"""config init / config show: profiles written for people, settings shown with sources."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from hpcbridge.cli import main
from hpcbridge.config import load_settings


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(main, list(args), input=input)


@pytest.fixture(autouse=True)
def bin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The only folder on PATH: empty (no qsub, no sbatch) unless a test puts a fake there, so
    what `config init` finds does not depend on the machine the tests run on."""
    folder = tmp_path / "bin"
    folder.mkdir()
    monkeypatch.setenv("PATH", str(folder))
    return folder


def fake_tools(folder: Path, *names: str) -> dict[str, Path]:
    made = {}
    for name in names:
        made[name] = folder / name
        made[name].write_text("#!/bin/sh\nexit 0\n")
        made[name].chmod(0o755)
    return made


@pytest.fixture()
def terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """config init as on a terminal: it asks; the runner's stdin answers."""
    monkeypatch.setattr(
        "hpcbridge.cli.config.sys", SimpleNamespace(stdin=SimpleNamespace(isatty=lambda: True))
    )


def test_init_writes_a_profile_that_settings_read(isolated_home: Path) -> None:
    result = run(
        "config",
        "init",
        "--name",
        "artemis",
        "--xnat",
        "https://xnat.example.org/",
        "--user",
        "alice",
        "--scheduler",
        "pbs",
    )
    path = isolated_home / "config.toml"
    assert result.exit_code == 0, result.output
    assert result.stdout == f"profile 'artemis' written to {path}; next: hpcbridge login\n"
    assert result.stderr == (
        "hpcbridge: note: profile 'artemis' has no account (--account: PBS Pro sites such as "
        "Artemis reject jobs without -P PROJECT) and no transfer_queue (--transfer-queue: "
        "run --chain needs one, Artemis: dtq)\n"
    )
    s = load_settings()
    assert (s.profile, s.xnat, s.user, s.scheduler) == (
        "artemis",
        "https://xnat.example.org",
        "alice",
        "pbs",
    )
    # A second profile keeps the first; --no-default leaves the default alone.
    assert (
        run(
            "config", "init", "--name", "gadi", "--xnat", "https://x.example.org", "--no-default"
        ).exit_code
        == 0
    )
    assert load_settings().profile == "artemis"
    assert load_settings(profile="gadi").xnat == "https://x.example.org"


def test_init_writes_the_cluster_keys_a_first_run_needs(isolated_home: Path) -> None:
    result = run(
        "config", "init", "--name", "artemis", "--xnat", "https://xnat.example.org",
        "--scheduler", "pbs", "--account", "PTV000", "--queue", "defaultQ",
        "--work-root", "/scratch/PTV000/hpcbridge", "--transfer-queue", "dtq",
        "--host", "hpc.example.org",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    s = load_settings()
    assert (s.account, s.queue, s.work_root, s.transfer_queue, s.host) == (
        "PTV000", "defaultQ", "/scratch/PTV000/hpcbridge", "dtq", "hpc.example.org"
    )  # fmt: skip
    relative = run("config", "init", "--name", "x", "--xnat", "https://a.org", "--work-root", "hb")
    assert relative.exit_code == 2
    assert relative.output == "hpcbridge: error: --work-root must be an absolute path, not 'hb'\n"


def test_init_refuses_to_replace_without_force(isolated_home: Path) -> None:
    assert run("config", "init", "--xnat", "https://a.example.org").exit_code == 0
    again = run("config", "init", "--xnat", "https://b.example.org")
    assert again.exit_code == 2
    assert again.output == (
        f"hpcbridge: error: profile 'default' already exists in "
        f"{isolated_home / 'config.toml'} (add --force to replace it)\n"
    )
    assert run("config", "init", "--xnat", "https://b.example.org", "--force").exit_code == 0
    assert load_settings().xnat == "https://b.example.org"


def test_init_needs_a_url_when_not_interactive() -> None:
    result = run("config", "init", input="")
    assert result.exit_code == 2
    assert result.output == "hpcbridge: error: an XNAT server URL is needed (pass --xnat URL)\n"
    bad = run("config", "init", "--xnat", "xnat.example.org")
    assert bad.output == "hpcbridge: error: 'xnat.example.org' is not an http(s) URL\n"
    hostless = run("config", "init", "--xnat", "https://")  # would write a profile that never loads
    assert hostless.exit_code == 2
    assert hostless.output == "hpcbridge: error: 'https://' is not an http(s) URL\n"


def test_show_masks_secrets_and_names_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (
        run("config", "init", "--xnat", "https://xnat.example.org", "--user", "alice").exit_code
        == 0
    )
    monkeypatch.setenv("HPCBRIDGE_PASSWORD", "hunter2-secret")
    monkeypatch.setenv("HPCBRIDGE_TIMEOUT", "15")
    result = run("config", "show")
    assert result.exit_code == 0
    assert "hunter2-secret" not in result.output
    lines = {line.split()[0]: line for line in result.output.splitlines()[1:]}
    assert "https://xnat.example.org" in lines["xnat"] and "file " in lines["xnat"]
    assert lines["timeout"].split()[1:] == ["15.0", "environment", "HPCBRIDGE_TIMEOUT"]
    assert "alice:****" in lines["credentials"] and "environment" in lines["credentials"]
    data = json.loads(run("--json", "config", "show").output)
    assert data["credentials"]["value"] == "alice:****"
    # no qsub or sbatch on the PATH: local, written into the profile as chosen
    assert data["scheduler"]["value"] == "local"
    assert data["scheduler"]["source"].startswith("file ")
    assert "hunter2-secret" not in json.dumps(data)


# --- the scheduler when --scheduler is not given, and what a PBS profile needs ----------------

CHOSEN = {
    (): ("local", "neither qsub nor sbatch is on the PATH, so jobs run on this machine"),
    ("qsub",): (
        "pbs",
        "qsub is on the PATH ({qsub}); PBS Pro or Torque is told apart by `qstat --version` "
        "when jobs are submitted",
    ),
    ("sbatch",): ("slurm", "sbatch is on the PATH ({sbatch})"),
    ("qsub", "sbatch"): (
        "slurm",
        "sbatch and qsub are both on the PATH ({sbatch}, {qsub}), and qsub beside sbatch is "
        "usually Slurm's PBS wrapper",
    ),
}


@pytest.mark.parametrize("tools", list(CHOSEN))
def test_init_without_a_scheduler_takes_the_one_on_the_path_and_says_why(
    bin_dir: Path, tools: tuple[str, ...]
) -> None:
    """Not a silent `local` on a login node, where jobs would then run on the login node."""
    paths = fake_tools(bin_dir, *tools)
    result = run("config", "init", "--xnat", "https://xnat.example.org", "--account", "PTV000",
                 "--transfer-queue", "dtq")  # fmt: skip
    assert result.exit_code == 0, result.output
    scheduler, why = CHOSEN[tools]
    why = why.format(**{name: str(path) for name, path in paths.items()})
    assert result.stderr == (
        f"hpcbridge: note: scheduler {scheduler}: {why} (--scheduler chooses another)\n"
    )
    assert load_settings().scheduler == scheduler
    # An explicit --scheduler is taken as given, without a note; so is -q's silence.
    again = run("config", "init", "--name", "b", "--xnat", "https://xnat.example.org",
                "--scheduler", "local")  # fmt: skip
    assert (again.exit_code, again.stderr) == (0, "")
    assert load_settings().scheduler == "local"
    quiet = run("-q", "config", "init", "--name", "c", "--xnat", "https://xnat.example.org")
    assert (quiet.exit_code, quiet.stderr) == (0, "")
    assert load_settings().scheduler == scheduler


def test_init_on_a_terminal_proposes_the_scheduler_found_and_asks_for_project_and_queue(
    bin_dir: Path, terminal: None
) -> None:
    qsub = fake_tools(bin_dir, "qsub")["qsub"]
    # server, user, scheduler (Enter: the one proposed), project, transfer queue
    answers = "https://xnat.example.org\nalice\n\nPTV000\ndtq\n"
    result = run("config", "init", "--name", "artemis", input=answers)
    assert result.exit_code == 0, result.output
    assert result.stderr == (
        f"proposing scheduler pbs: qsub is on the PATH ({qsub}); PBS Pro or Torque is told "
        "apart by `qstat --version` when jobs are submitted\n"
    )
    assert "Batch scheduler (local, pbs, torque, slurm) [pbs]: " in result.stdout
    assert "Project for jobs (-P, required on Artemis, e.g. PTV000; empty for none): " in (
        result.stdout
    )
    assert "Queue for run --chain's transfer jobs, whose nodes must reach XNAT" in result.stdout
    s = load_settings()
    assert (s.xnat, s.user, s.scheduler, s.account, s.transfer_queue) == (
        "https://xnat.example.org", "alice", "pbs", "PTV000", "dtq"
    )  # fmt: skip


def test_init_on_a_terminal_asks_only_what_the_options_leave_out(
    bin_dir: Path, terminal: None
) -> None:
    fake_tools(bin_dir, "qsub")
    given = run("config", "init", "--xnat", "https://xnat.example.org", "--user", "alice",
                "--scheduler", "pbs", "--account", "PTV000", "--transfer-queue", "dtq",
                input="")  # fmt: skip
    assert given.exit_code == 0, given.output
    assert "Project" not in given.output and "Queue" not in given.output
    assert "scheduler" not in given.output
    # Empty answers leave the keys unset; another scheduler can be picked over the proposal.
    answers = "slurm\n"
    picked = run("config", "init", "--name", "s", "--xnat", "https://xnat.example.org",
                 "--user", "bob", input=answers)  # fmt: skip
    assert picked.exit_code == 0, picked.output
    assert "Project" not in picked.output  # Slurm needs no -P
    assert load_settings().scheduler == "slurm"
    answers = "\n\n"
    empty = run("config", "init", "--name", "t", "--xnat", "https://xnat.example.org",
                "--user", "bob", "--scheduler", "torque", input=answers)  # fmt: skip
    assert empty.exit_code == 0, empty.output
    assert "Project for jobs (-A; empty for none): " in empty.stdout
    s = load_settings()
    assert (s.scheduler, s.account, s.transfer_queue) == ("torque", None, None)


def test_init_with_a_host_needs_the_scheduler_of_that_host(bin_dir: Path) -> None:
    """This machine's PATH says nothing of a login node reached over SSH."""
    fake_tools(bin_dir, "sbatch")
    args = ["config", "init", "--xnat", "https://xnat.example.org", "--host", "hpc.example.org"]
    refused = run(*args)
    assert refused.exit_code == 2
    assert refused.output == (
        "hpcbridge: error: --host hpc.example.org needs --scheduler: which scheduler takes jobs "
        "there (pass --scheduler pbs, torque or slurm)\n"
    )
    assert not load_settings().xnat  # nothing written


def test_init_with_a_host_on_a_terminal_asks_for_its_scheduler(
    bin_dir: Path, terminal: None
) -> None:
    answers = "alice\npbs\nPTV000\ndtq\n"
    result = run("config", "init", "--xnat", "https://xnat.example.org", "--host",
                 "hpc.example.org", input=answers)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Batch scheduler on hpc.example.org (pbs, torque, slurm): " in result.stdout
    s = load_settings()
    assert (s.host, s.scheduler, s.account, s.transfer_queue) == (
        "hpc.example.org", "pbs", "PTV000", "dtq"
    )  # fmt: skip
