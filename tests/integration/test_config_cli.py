"""config init / config show: profiles written for people, settings shown with sources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from hpcbridge.cli import main
from hpcbridge.config import load_settings


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(main, list(args), input=input)


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
    assert result.output == f"profile 'artemis' written to {path}; next: hpcbridge login\n"
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
    assert data["scheduler"] == {"value": "local", "source": "default"}
    assert "hunter2-secret" not in json.dumps(data)
