"""recipes list/show/new and render from the command line."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from click.testing import CliRunner

from hpcbridge.cli import main


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_list_and_show_the_builtin() -> None:
    listed = json.loads(run("--json", "recipes", "list").output)
    dcm = next(r for r in listed if r["name"] == "dcm2niix")
    assert dcm["origin"] == "built-in"
    shown = json.loads(run("--json", "recipes", "show", "dcm2niix").output)
    assert shown["parameters"]["gzip"] == {
        "type": "bool",
        "default": True,
        "help": shown["parameters"]["gzip"]["help"],
    }
    assert shown["resources"]["walltime"] == "00:20:00"
    assert "dcm2niix -z" in shown["command"]
    text = run("recipes", "show", "dcm2niix").output
    assert "resources: 1 cpu, 2048 MB, walltime 00:20:00" in text


def test_new_scaffolds_a_valid_recipe_that_lists_where_it_came_from(tmp_path: Path) -> None:
    result = run("recipes", "new", "t1-lab", "--dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "t1-lab.toml").exists()
    listed = run("recipes", "list", "--recipes", str(tmp_path)).output
    assert any(line.split()[:2] == ["t1-lab", str(tmp_path)] for line in listed.splitlines())
    again = run("recipes", "new", "t1-lab", "--dir", str(tmp_path))
    assert again.exit_code == 1
    assert again.output == f"hpcbridge: error: {tmp_path / 't1-lab.toml'} already exists\n"


def test_render_writes_an_executable_script_that_bash_accepts(tmp_path: Path) -> None:
    out = tmp_path / "job.sh"
    result = run(
        "render",
        "dcm2niix",
        "--scheduler",
        "pbs",
        "--set",
        "gzip=false",
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(tmp_path / "out"),
        "--queue",
        "defaultQ",
        "--account",
        "PTV000",
        "-o",
        str(out),
    )
    assert result.exit_code == 0, result.output
    script = out.read_text()
    assert os.access(out, os.X_OK)
    assert "#PBS -q defaultQ\n" in script and "#PBS -P PTV000\n" in script
    assert "dcm2niix -z n" in script
    assert subprocess.run(["bash", "-n", str(out)], timeout=30).returncode == 0


def test_render_errors_are_one_line(tmp_path: Path) -> None:
    args = ["--input", str(tmp_path), "--output", str(tmp_path / "o")]
    cases = [
        (["render", "nosuch", *args], "hpcbridge: error: no recipe named 'nosuch' (known: "),
        (
            ["render", "dcm2niix", "--set", "gzip", *args],
            "hpcbridge: error: --set 'gzip' must look like NAME=VALUE\n",
        ),
        (
            ["render", "dcm2niix", "--set", "level=3", *args],
            "hpcbridge: error: recipe dcm2niix has no parameter 'level' (parameters: gzip, "
            "filename, bids)\n",
        ),
        (
            ["render", "dcm2niix", "--scheduler", "slurm", "--queue", "a b", *args],
            "hpcbridge: error: queue 'a b' may only hold letters, digits and '_.@+-'\n",
        ),
    ]
    for argv, line in cases:
        result = run(*argv)
        assert result.exit_code == 1, argv
        assert result.output.startswith(line), (argv, result.output)


def test_render_fills_scan_variables_from_xnat_or_warns_of_placeholders(
    tmp_path: Path, isolated_home: Path, demo_sandbox, monkeypatch
) -> None:
    monkeypatch.setenv("HPCBRIDGE_XNAT", demo_sandbox.url)
    monkeypatch.setenv("HPCBRIDGE_USER", demo_sandbox.user)
    monkeypatch.setenv("HPCBRIDGE_PASSWORD", demo_sandbox.password)
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "who.toml").write_text(
        'name = "who"\n[run]\ncommand = "echo {{ scan.subject }} {{ scan.type }} > '
        '{{ output_dir }}/who.txt"\n'
    )
    common = ["render", "who", "--recipes", str(recipes), "--input", "/in", "--output", "/out"]
    scan = "PTV000/Haofei01/Haofei01_MR1/5"
    filled = run(*common, "--scheduler", "local", "--scan", scan)
    assert filled.exit_code == 0, filled.output
    assert "echo Haofei01 'ep2d bold (rest)' > /out/who.txt" in filled.stdout
    assert "warning" not in filled.stderr
    placeholders = run(*common, "--scheduler", "local")
    assert placeholders.exit_code == 0
    assert "echo S T1 > /out/who.txt" in placeholders.stdout
    assert placeholders.stderr == (
        "hpcbridge: warning: recipe who uses scan.* variables; without --scan they hold "
        "placeholders (P, S, E, 1, T1)\n"
    )
    missing = run(*common, "--scheduler", "local", "--scan", "PTV000/Haofei01/Haofei01_MR1/77")
    assert missing.exit_code == 1
    assert missing.stderr == (
        "hpcbridge: error: no scan '77' in PTV000/Haofei01/Haofei01_MR1 "
        "(`hpcbridge ls PTV000/Haofei01/Haofei01_MR1` lists them)\n"
    )
    session = run(*common, "--scheduler", "local", "--scan", "PTV000/Haofei01/Haofei01_MR1")
    assert session.exit_code == 1
    assert session.stderr == (
        "hpcbridge: error: --scan needs PROJECT/SUBJECT/SESSION/SCAN, "
        "not 'PTV000/Haofei01/Haofei01_MR1'\n"
    )
    # the built-in dcm2niix uses no scan.* variable: no warning
    assert run("render", "dcm2niix", "--input", "/in", "--output", "/out").stderr == ""


NO_PROJECT = (
    "hpcbridge: warning: the script has no project: PBS Pro sites such as Artemis reject jobs "
    "without -P PROJECT (pass --account PROJECT, or set account in the profile)\n"
)


def test_a_pbs_script_without_a_project_is_printed_with_a_warning(
    tmp_path: Path, isolated_home: Path, monkeypatch
) -> None:
    io = ["--input", "/in", "--output", "/out"]
    written = tmp_path / "job.sh"
    assert run("render", "dcm2niix", "--scheduler", "pbs", *io, "-o", str(written)).exit_code == 0
    shown = run("render", "dcm2niix", "--scheduler", "pbs", *io)
    assert shown.exit_code == 0
    assert shown.stderr == NO_PROJECT
    # stdout is the script alone, byte for byte what -o writes: a pipe into qsub still works
    assert shown.stdout == written.read_text()
    assert "#PBS -P" not in shown.stdout
    # The profile's scheduler counts as --scheduler does.
    monkeypatch.setenv("HPCBRIDGE_SCHEDULER", "pbs")
    assert run("render", "dcm2niix", *io).stderr == NO_PROJECT


def test_a_project_from_the_option_recipe_or_profile_silences_the_warning(
    tmp_path: Path, isolated_home: Path, monkeypatch
) -> None:
    io = ["--input", "/in", "--output", "/out"]
    option = run("render", "dcm2niix", "--scheduler", "pbs", "--account", "PTV000", *io)
    assert (option.exit_code, option.stderr) == (0, "")
    assert "#PBS -P PTV000\n" in option.stdout
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "lab.toml").write_text(
        'name = "lab"\n[resources]\naccount = "LAB01"\n[run]\ncommand = "true"\n'
    )
    recipe = run("render", "lab", "--recipes", str(recipes), "--scheduler", "pbs", *io)
    assert (recipe.exit_code, recipe.stderr) == (0, "")
    assert "#PBS -P LAB01\n" in recipe.stdout
    monkeypatch.setenv("HPCBRIDGE_ACCOUNT", "PTV001")
    profile = run("render", "dcm2niix", "--scheduler", "pbs", *io)
    assert (profile.exit_code, profile.stderr) == (0, "")
    assert "#PBS -P PTV001\n" in profile.stdout


def test_no_project_warning_where_a_project_is_optional(monkeypatch) -> None:
    io = ["--input", "/in", "--output", "/out"]
    for kind in ("slurm", "torque", "local"):
        result = run("render", "dcm2niix", "--scheduler", kind, *io)
        assert (result.exit_code, result.stderr) == (0, ""), kind
    # A profile on Slurm's PBS wrappers (or Torque behind the pbs scheduler) needs no -P either.
    monkeypatch.setenv("HPCBRIDGE_SCHEDULER", "pbs")
    for flavour in ("wrapper", "torque"):
        monkeypatch.setenv("HPCBRIDGE_PBS_FLAVOUR", flavour)
        result = run("render", "dcm2niix", *io)
        assert (result.exit_code, result.stderr) == (0, ""), flavour
