"""Hostile and broken lab recipes from the command line: `recipes list` shows them, every other
command that looks a recipe up warns once and carries on, the chosen one fails in one line, and
nothing a template holds ever runs (not even in a dry run)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from hpcbridge import recipes
from hpcbridge.cli import main

NOT_CODE = "a recipe may use its variables, filters and tests, not Python's internals"
GOOD = '[run]\ncommand = "echo {{ input_dir }} > {{ output_dir }}/seen"\n'
IO = ["--input", "/in", "--output", "/out"]


def run(*args: str) -> Result:
    recipes._reported.clear()  # one invocation is one process: it warns afresh
    return CliRunner().invoke(main, list(args))


@pytest.fixture()
def marker(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "a recipe template ran a command"


@pytest.fixture()
def lab(tmp_path: Path, isolated_home: Path, marker: Path) -> Path:
    """A lab folder: one good recipe, one that runs a command at discovery without a sandbox,
    one that runs it in its setup, one whose attribute names exist only at render time."""
    folder = tmp_path / "lab"
    folder.mkdir()
    (folder / "good.toml").write_text(GOOD)
    touch = f"os.system('touch {marker}')"
    (folder / "evil.toml").write_text(
        f'[run]\ncommand = "{{{{ cycler.__init__.__globals__.{touch} }}}}"\n'
    )
    (folder / "setup.toml").write_text(
        f"[environment]\nsetup = \"{{{{ lipsum.__globals__['os'].system('touch {marker}') }}}}\"\n"
        + GOOD
    )
    (folder / "sly.toml").write_text(
        '[parameters.i]\ndefault = "__init__"\n[parameters.g]\ndefault = "__globals__"\n'
        f'[run]\ncommand = "{{{{ (joiner|attr(params.i)|attr(params.g)).{touch} }}}}"\n'
    )
    return folder


def _one_error(result: Result) -> str:
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("hpcbridge: error: ")
    return lines[0].removeprefix("hpcbridge: error: ")


def _warning(lab: Path) -> str:
    return (
        f"hpcbridge: warning: skipped 2 broken recipes ({lab / 'evil.toml'}, "
        f"{lab / 'setup.toml'}); `hpcbridge recipes list` shows why\n"
    )


def test_list_shows_the_broken_beside_the_good(lab: Path) -> None:
    evil = (
        f"{lab / 'evil.toml'} [run] command: template tries to reach an unsafe attribute "
        f"'__init__' on line 1 ({NOT_CODE})"
    )
    setup = (
        f"{lab / 'setup.toml'} [environment] setup: template tries to reach an unsafe "
        f"attribute '__globals__' on line 1 ({NOT_CODE})"
    )
    listed = run("recipes", "list", "--recipes", str(lab))
    assert listed.exit_code == 0, listed.output
    names = [line.split()[0] for line in listed.stdout.splitlines()[1:] if line[:1].isalpha()]
    assert names[:6] == ["dcm2niix", "dicom-qc", "fsl-bet", "good", "sly", "broken,"]
    assert listed.stdout.endswith(f"\nbroken, not used (2):\n  {evil}\n  {setup}\n")
    assert listed.stderr == ""
    rows = json.loads(run("--json", "recipes", "list", "--recipes", str(lab)).stdout)
    assert {r["name"]: r["error"] for r in rows if r["origin"] == str(lab)} == {
        "good": None,
        "sly": None,
        "evil": evil,
        "setup": setup,
    }


def test_render_of_a_good_recipe_warns_once_and_runs_nothing(lab: Path) -> None:
    rendered = run("render", "good", "--recipes", str(lab), "--scheduler", "slurm", *IO)
    assert rendered.exit_code == 0, rendered.output
    assert rendered.stdout.endswith("# Recipe good\necho /in > /out/seen\n")
    assert rendered.stderr == _warning(lab)
    shown = run("recipes", "show", "dcm2niix", "--recipes", str(lab))
    assert shown.exit_code == 0 and shown.stderr == _warning(lab)
    quiet = run("-q", "render", "good", "--recipes", str(lab), *IO)
    assert quiet.exit_code == 0 and quiet.stderr == ""


@pytest.mark.parametrize("command", ["render", "show"])
def test_a_hostile_recipe_by_name_is_one_line(lab: Path, command: str) -> None:
    before, after = (["render"], IO) if command == "render" else (["recipes", "show"], [])
    cases = {
        "evil": f"{lab / 'evil.toml'} [run] command: template tries to reach an unsafe "
        f"attribute '__init__' on line 1 ({NOT_CODE})",
        "setup": f"{lab / 'setup.toml'} [environment] setup: template tries to reach an unsafe "
        f"attribute '__globals__' on line 1 ({NOT_CODE})",
        "sly": f"{lab / 'sly.toml'} [run] command: template tries to reach an unsafe "
        f"attribute '__init__' ({NOT_CODE}); nothing was run",
    }
    for name, error in cases.items():
        result = run(*before, name, *after, "--recipes", str(lab))
        assert _one_error(result) == error, name
    by_path = run("render", str(lab / "sly.toml"), *IO)
    assert _one_error(by_path) == cases["sly"]


def test_a_folder_every_user_may_write(lab: Path) -> None:
    (lab / "dcm2niix.toml").write_text(GOOD)
    lab.chmod(0o777)
    try:
        error = (
            f"{lab} is writable by every user (mode 0777); refusing its recipes "
            f"(run `chmod o-w {lab}`)"
        )
        listed = run("recipes", "list", "--recipes", str(lab))
        assert listed.exit_code == 0
        assert listed.stdout.endswith(f"\nbroken, not used (1):\n  {error}\n")
        assert "\ngood " not in listed.stdout
        # Its dcm2niix is an error, not a silent fall-back to the built-in.
        assert _one_error(run("render", "dcm2niix", "--recipes", str(lab), *IO)) == error
        other = run("render", "fsl-bet", "--recipes", str(lab), *IO)
        assert other.exit_code == 0
        assert other.stderr == f"hpcbridge: warning: skipped a broken recipe: {error}\n"
    finally:
        lab.chmod(0o755)


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("cpus = 100000", "cpus 100000 must be a whole number from 1 to 4096"),
        ('memory = "1' + "0" * 30 + 'GB"', "is more than any node has (at most 64TB)"),
        ('walltime = "999999999:00:00"', "walltime '999999999:00:00' is longer than a year"),
    ],
)
def test_resources_no_scheduler_accepts(lab: Path, line: str, error: str) -> None:
    path = lab / "huge.toml"
    path.write_text(f"[resources]\n{line}\n" + GOOD)
    message = _one_error(run("render", "huge", "--recipes", str(lab), *IO))
    assert message.startswith(f"{path} [resources]: ")
    assert error in message


def test_dry_run_of_a_hostile_recipe_fails_and_runs_nothing(
    lab: Path, demo_sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HPCBRIDGE_XNAT", demo_sandbox.url)
    monkeypatch.setenv("HPCBRIDGE_USER", demo_sandbox.user)
    monkeypatch.setenv("HPCBRIDGE_PASSWORD", demo_sandbox.password)
    session = "PTV000/Haofei01/Haofei01_MR1"
    for name, error in {
        "evil": f"{lab / 'evil.toml'} [run] command: template tries to reach an unsafe "
        f"attribute '__init__' on line 1 ({NOT_CODE})",
        "sly": f"{lab / 'sly.toml'} [run] command: template tries to reach an unsafe "
        f"attribute '__init__' ({NOT_CODE}); nothing was run",
    }.items():
        dry = run("run", name, session, "--recipes", str(lab), "--dry-run")
        assert _one_error(dry) == error
    good = run("run", "good", session, "--scan", "4", "--recipes", str(lab), "--dry-run")
    assert good.exit_code == 0, good.output
    assert "echo " in good.stdout and "/seen" in good.stdout
    assert good.stderr.startswith(_warning(lab))
    assert good.stderr.count("hpcbridge: warning:") == 1
