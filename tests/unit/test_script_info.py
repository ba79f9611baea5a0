"""What the submit layer reads from a job script (parse_script), and array range specs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from hpcbridge import recipes
from hpcbridge.errors import SchedulerError
from hpcbridge.schedulers.local import array_indices
from hpcbridge.schedulers.script import (
    ScriptInfo,
    parse_script,
    walltime_seconds,
    without_pbs_project,
)

RECIPE = """
name = "t1-prep"

[resources]
cpus = 2
memory = "4GB"
walltime = "02:30:00"

[run]
command = '''
echo {{ input_dir }} {{ output_dir }}
'''
"""


@pytest.fixture()
def recipe(tmp_path: Path) -> recipes.Recipe:
    path = tmp_path / "t1-prep.toml"
    path.write_text(RECIPE)
    return recipes.load_recipe(path)


def _render(recipe: recipes.Recipe, scheduler: str, work: str, **kw: str) -> str:
    return recipes.render_script(
        recipe,
        scheduler,
        values={},
        input_dir="/scratch/in",
        output_dir="/scratch/out",
        work_dir=work,
        **kw,
    )


# --- rendered scripts -------------------------------------------------------------------------


def test_pbs_pro_script(recipe: recipes.Recipe) -> None:
    text = _render(recipe, "pbs", "/scratch/PTV000/run1", queue="defaultQ", account="PTV000")
    assert parse_script(text) == ScriptInfo(
        work_dir="/scratch/PTV000/run1",
        stdout="/scratch/PTV000/run1/.hpcbridge/job.out",
        stderr="/scratch/PTV000/run1/.hpcbridge/job.err",
        name="t1-prep",
        project="PTV000",
        queue="defaultQ",
        walltime="02:30:00",
    )
    assert parse_script(text).state_dir == "/scratch/PTV000/run1/.hpcbridge"


def test_pbs_walltime_is_found_among_several_resource_lines(recipe: recipes.Recipe) -> None:
    text = _render(recipe, "pbs", "/w")
    # select=... comes first and has no walltime; the second -l line has it.
    assert text.index("#PBS -l select=") < text.index("#PBS -l walltime=")
    assert parse_script(text).walltime == "02:30:00"


def test_torque_script(recipe: recipes.Recipe) -> None:
    info = parse_script(_render(recipe, "torque", "/home/u/run", queue="batch"))
    assert info.work_dir == "/home/u/run"
    assert info.name == "t1-prep"
    assert info.queue == "batch"
    assert info.walltime == "02:30:00"
    assert info.stdout == "/home/u/run/.hpcbridge/job.out"
    assert info.stderr == "/home/u/run/.hpcbridge/job.err"


def test_slurm_script(recipe: recipes.Recipe) -> None:
    text = _render(recipe, "slurm", "/scratch/run2", queue="short", account="lab42")
    assert parse_script(text) == ScriptInfo(
        work_dir="/scratch/run2",
        stdout="/scratch/run2/.hpcbridge/job.out",
        stderr="/scratch/run2/.hpcbridge/job.err",
        name="t1-prep",
        project="lab42",
        queue="short",
        walltime="02:30:00",
    )


def test_local_script_takes_the_walltime_from_its_comment(recipe: recipes.Recipe) -> None:
    info = parse_script(_render(recipe, "local", "/tmp/run3"))
    assert info == ScriptInfo(
        work_dir="/tmp/run3",
        stdout="/tmp/run3/.hpcbridge/job.out",
        stderr="/tmp/run3/.hpcbridge/job.err",
        walltime="02:30:00",
    )
    assert walltime_seconds(info.walltime or "") == 9000


@pytest.mark.parametrize(
    "work",
    [
        "/data/my study/run 1",
        "/data/it's here",
        '/data/"quoted" dir',
        "/data/$HOME and `date` and \\n",
        "/data/mixed 'single' \"double\" $x",
    ],
)
def test_work_dir_with_spaces_and_quotes_round_trips(recipe: recipes.Recipe, work: str) -> None:
    text = _render(recipe, "local", work)
    info = parse_script(text)
    assert info.work_dir == work
    assert info.state_dir == f"{work}/.hpcbridge"
    assert info.stderr == f"{work}/.hpcbridge/job.err"
    # ...and it is what bash itself makes of the line.
    line = next(x for x in text.splitlines() if x.startswith("HPCBRIDGE_WORK="))
    shown = subprocess.run(
        ["bash", "-c", f'{line}\nprintf %s "$HPCBRIDGE_WORK"'],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert shown == work


def test_a_work_line_that_is_not_one_shell_word_is_not_a_work_dir() -> None:
    assert parse_script("#!/bin/bash\nHPCBRIDGE_WORK=/a /b\n").work_dir is None
    assert parse_script("#!/bin/bash\nHPCBRIDGE_WORK='/unterminated\n").work_dir is None


# --- hand-written scripts ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "#!/bin/bash\necho hello\n",
        "#!/bin/bash\n# runs for a while\nsleep 1\n",
        "#!/bin/sh\nWORK=/tmp/x\ncd $WORK\n",
        "",
    ],
)
def test_hand_written_scripts_say_nothing(text: str) -> None:
    info = parse_script(text)
    assert info == ScriptInfo()
    assert all(value is None for value in vars(info).values())
    assert info.state_dir is None


def test_hand_written_directives_are_read() -> None:
    text = (
        "#!/bin/bash\n"
        "#SBATCH --job-name=mine\n"
        "#SBATCH --time=00:05:00\n"
        "#SBATCH --output=/home/u/mine.out\n"
        "#SBATCH --partition debug\n"
        "srun hostname\n"
    )
    info = parse_script(text)
    assert info.name == "mine"
    assert info.walltime == "00:05:00"
    assert info.stdout == "/home/u/mine.out"
    assert info.queue == "debug"
    # No hpcbridge work folder: no default error log either.
    assert info.stderr is None and info.work_dir is None


def test_slurm_time_in_another_format_is_not_a_walltime() -> None:
    assert parse_script("#!/bin/bash\n#SBATCH --time=1-00:00:00\n").walltime is None
    assert parse_script("#!/bin/bash\n#SBATCH --time=30\n").walltime is None


# --- without_pbs_project ----------------------------------------------------------------------


def test_without_pbs_project_neutralises_only_the_project_line(recipe: recipes.Recipe) -> None:
    text = _render(recipe, "pbs", "/scratch/run", queue="defaultQ", account="PTV000")
    assert "#PBS -P PTV000\n" in text
    out = without_pbs_project(text)
    assert "#PBS -P" not in out
    assert "# hpcbridge: -P PTV000 is passed on the qsub command line\n" in out
    # Every other line is untouched, so the job still parses the same apart from the project.
    pairs = zip(text.splitlines(), out.splitlines(), strict=True)
    assert [a for a, b in pairs if a != b] == ["#PBS -P PTV000"]
    before, after = parse_script(text), parse_script(out)
    assert after.project is None
    assert after == ScriptInfo(**{**vars(before), "project": None})


def test_without_pbs_project_leaves_scripts_without_one_alone(recipe: recipes.Recipe) -> None:
    text = _render(recipe, "pbs", "/scratch/run")
    assert "#PBS -P" not in text
    assert without_pbs_project(text) == text
    # -P inside a later line (not a directive) is not touched.
    other = "#!/bin/bash\necho '#PBS -P X'\nqsub -P X job.sh\n"
    assert without_pbs_project(other) == other


# --- walltime_seconds -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("00:00:01", 1),
        ("00:10:00", 600),
        ("01:02:03", 3723),
        ("48:00:00", 172800),
        ("100:00:00", 360000),
    ],
)
def test_walltime_seconds(text: str, seconds: int) -> None:
    assert walltime_seconds(text) == seconds


# --- array_indices ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "indices"),
    [
        ("1-10", list(range(1, 11))),
        ("1-10:2", [1, 3, 5, 7, 9]),
        ("0-6:3", [0, 3, 6]),
        ("1,3,5", [1, 3, 5]),
        ("1-3%2", [1, 2, 3]),
        ("7", [7]),
        ("5,1-3,2", [1, 2, 3, 5]),
        ("1, 3", [1, 3]),
    ],
)
def test_array_indices(spec: str, indices: list[int]) -> None:
    assert array_indices(spec) == indices


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "a",
        "1-",
        "-3",
        "3-1",
        "1-10:0",
        "1--3",
        "1,,3",
        "1-3%",
        "1-3%x",
        "1-3%0",
        "1.5",
        "0-10000",  # 10001 tasks
        "1-5000,6000-11000",
    ],
)
def test_bad_array_specs_are_scheduler_errors(spec: str) -> None:
    with pytest.raises(SchedulerError, match="array range"):
        array_indices(spec)


def test_a_huge_array_range_is_refused_without_building_it() -> None:
    # A typo must fail at once with a clear message, not allocate a billion indices.
    with pytest.raises(SchedulerError, match="more than 10000 tasks"):
        array_indices("1-1000000000")
