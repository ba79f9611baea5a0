"""Golden job scripts: every built-in recipe x every scheduler, plus hostile and full cases.

A change to a recipe or a scheduler skeleton shows up here as a diff a reviewer can read. After
an intended change, regenerate with
``UPDATE_GOLDEN=1 python -m pytest tests/unit/test_recipe_golden.py`` and READ the diff.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hpcbridge import recipes
from hpcbridge.errors import RecipeError
from hpcbridge.sandbox.dicomgen import SeriesSpec, make_uid, series_files

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "recipes"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"
BUILTINS = ("dcm2niix", "dicom-qc", "fsl-bet")
FIXED = {"input_dir": "/work/in", "output_dir": "/work/out", "work_dir": "/work"}
HOSTILE = "a b'c$(touch /tmp/x)"

# Resources at the edges of what users write: hours beyond 24, lower-case memory units, no
# queue or account (so no -q/-P/-A/--partition/--account line at all).
HOSTILE_RECIPE = """
name = "hostile"
description = "edge-case resources and a free-text parameter"

[parameters.label]
type = "str"
default = "plain"
help = "free text that ends up in the command line"

[resources]
cpus = 2
memory = "512mb"
walltime = "100:00:00"

[environment]
modules = ["dcm2niix"]

[run]
command = \"\"\"
dcm2niix -f {{ params.label }} -o {{ output_dir }} {{ input_dir }}
\"\"\"
"""

# Every optional directive present, to freeze their order.
FULL_RECIPE = """
name = "full"

[resources]
cpus = 8
memory = "16GB"
walltime = "02:30:00"
queue = "gpu"
account = "ab12"
gpus = 1

[environment]
modules = ["fsl/6.0.7", "cuda"]
setup = "export OMP_NUM_THREADS=8"

[run]
command = "echo {{ cpus }} {{ memory_mb }} {{ walltime }} {{ gpus }} {{ scan.type }}"
"""


def _check(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.is_file(), f"no golden file {path}; run with UPDATE_GOLDEN=1 and read it"
    assert text == path.read_text(), f"{name} differs from its golden file"
    done = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, (name, done.stderr)


def _recipe(tmp_path: Path, text: str, name: str) -> recipes.Recipe:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return recipes.load_recipe(path)


def test_the_builtins_are_the_ones_with_goldens() -> None:
    assert set(recipes.discover()) == set(BUILTINS)
    assert all(r.origin == "built-in" for r in recipes.discover().values())
    expected = {f"{n}.{s}.sh" for n in (*BUILTINS, "hostile", "full") for s in recipes.SCHEDULERS}
    assert {p.name for p in GOLDEN.glob("*.sh")} == expected  # no stale goldens


@pytest.mark.parametrize("scheduler", recipes.SCHEDULERS)
@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_golden(name: str, scheduler: str) -> None:
    recipe = recipes.find(name)
    text = recipes.render_script(recipe, scheduler, values=recipe.values(), **FIXED)
    _check(f"{name}.{scheduler}.sh", text)


@pytest.mark.parametrize("scheduler", recipes.SCHEDULERS)
def test_hostile_golden(tmp_path: Path, scheduler: str) -> None:
    recipe = _recipe(tmp_path, HOSTILE_RECIPE, "hostile")
    text = recipes.render_script(
        recipe, scheduler, values=recipe.values({"label": HOSTILE}), name=HOSTILE, **FIXED
    )
    _check(f"hostile.{scheduler}.sh", text)
    # The job name is made safe, the value is one single-quoted word, nothing else changes.
    assert "a_b_c__touch__tmp_x" in text
    assert "-f 'a b'\"'\"'c$(touch /tmp/x)' -o /work/out /work/in\n" in text
    assert text.count("touch") == 2  # the quoted value and the sanitised job name, nowhere else


@pytest.mark.parametrize("scheduler", recipes.SCHEDULERS)
def test_full_golden(tmp_path: Path, scheduler: str) -> None:
    recipe = _recipe(tmp_path, FULL_RECIPE, "full")
    text = recipes.render_script(
        recipe, scheduler, values=recipe.values(), mail="lab@uni.example.edu", **FIXED
    )
    _check(f"full.{scheduler}.sh", text)


@pytest.mark.parametrize("field", ["queue", "account"])
@pytest.mark.parametrize("value", [HOSTILE, "batch\n#PBS -l ncpus=999", "a;b"])
def test_hostile_directive_values_are_refused(tmp_path: Path, field: str, value: str) -> None:
    recipe = _recipe(tmp_path, HOSTILE_RECIPE, "hostile")
    kwargs: dict[str, Any] = {field: value}
    with pytest.raises(RecipeError) as err:
        recipes.render_script(recipe, "pbs", values=recipe.values(), **kwargs, **FIXED)
    assert err.value.message == f"{field} {value!r} may only hold letters, digits and '_.@+-'"


# -- running the local script for real -------------------------------------------------------
FAKE_DCM2NIIX = """#!/bin/bash
# Records its arguments, NUL-separated, so a test can see exactly what it received.
printf '%s\\0' "$@" > "$FAKE_ARGV"
exit "${FAKE_EXIT:-0}"
"""


def _run_local(tmp_path: Path, label: str, exit_code: int = 0) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "dcm2niix"
    fake.write_text(FAKE_DCM2NIIX)
    fake.chmod(0o755)
    recipe = _recipe(tmp_path, HOSTILE_RECIPE, "hostile")
    (tmp_path / "in").mkdir()
    script = recipes.render_script(
        recipe,
        "local",
        values=recipe.values({"label": label}),
        name=label,
        input_dir=str(tmp_path / "in"),
        output_dir=str(tmp_path / "out"),
        work_dir=str(tmp_path / "work"),
    )
    (tmp_path / "job.sh").write_text(script)
    env = dict(
        os.environ,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        FAKE_ARGV=str(tmp_path / "argv"),
        FAKE_EXIT=str(exit_code),
    )
    return subprocess.run(
        ["bash", str(tmp_path / "job.sh")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_local_hostile_script_runs_the_value_as_one_literal_argument(tmp_path: Path) -> None:
    marker = tmp_path / "x"
    label = f"a b'c$(touch {marker}) `touch {marker}` ; touch {marker}"
    before = {p for p in tmp_path.rglob("*")}
    done = _run_local(tmp_path, label)
    assert done.returncode == 0, done.stderr
    argv = (tmp_path / "argv").read_text().split("\0")[:-1]
    assert argv == ["-f", label, "-o", str(tmp_path / "out"), str(tmp_path / "in")]
    assert not marker.exists()
    assert not [p for p in tmp_path.rglob("x")]
    created = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p not in before}
    assert created == {
        "bin",
        "bin/dcm2niix",
        "in",
        "hostile.toml",
        "job.sh",
        "argv",
        "out",
        "work",
        "work/.hpcbridge",
        "work/.hpcbridge/started.json",
        "work/.hpcbridge/status.json",
    }
    status = json.loads((tmp_path / "work" / ".hpcbridge" / "status.json").read_text())
    assert status["exit_code"] == 0
    started = json.loads((tmp_path / "work" / ".hpcbridge" / "started.json").read_text())
    assert set(started) == {"start", "host"}


def test_local_failing_command_records_its_exit_code(tmp_path: Path) -> None:
    done = _run_local(tmp_path, "plain", exit_code=3)
    assert done.returncode == 3
    status = json.loads((tmp_path / "work" / ".hpcbridge" / "status.json").read_text())
    assert status["exit_code"] == 3
    assert (tmp_path / "work" / ".hpcbridge" / "started.json").is_file()


def test_local_dicom_qc_runs_end_to_end(tmp_path: Path) -> None:
    """The dicom-qc built-in as a user runs it locally: python3 with hpcbridge on the PATH."""
    (tmp_path / "in").mkdir()
    for name, data in series_files(
        SeriesSpec(3, "T1", n_slices=3), patient_id="P", patient_name="P^Q", study_uid=make_uid("s")
    ):
        (tmp_path / "in" / name).write_bytes(data)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    recipe = recipes.find("dicom-qc")
    script = recipes.render_script(
        recipe,
        "local",
        values=recipe.values(),
        input_dir=str(tmp_path / "in"),
        output_dir=str(tmp_path / "out"),
        work_dir=str(tmp_path / "work"),
    )
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "out" / "qc.json").read_text())["ok"] is True
    assert "Series 3: T1" in (tmp_path / "out" / "qc.txt").read_text()
