"""examples/recipes as a lab folder: both example recipes load and render for every scheduler."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from hpcbridge import recipes

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "recipes"
SCAN = {"subject": "sub01", "experiment": "ses-1", "id": "4", "type": "T1", "project": "P"}


def test_examples_are_discovered_beside_the_builtins() -> None:
    found = recipes.discover([EXAMPLES])
    assert {n: r.origin for n, r in found.items() if r.origin != "built-in"} == {
        "lab-dcm2niix": str(EXAMPLES),
        "t1-brain": str(EXAMPLES),
    }
    assert found["t1-brain"].source == EXAMPLES / "t1-brain" / "recipe.toml"
    assert found["lab-dcm2niix"].values() == {"filename": "sub-%n_ses-%t_%p", "compress": "y"}


@pytest.mark.parametrize("scheduler", recipes.SCHEDULERS)
@pytest.mark.parametrize("name", ["lab-dcm2niix", "t1-brain"])
def test_example_renders(name: str, scheduler: str) -> None:
    recipe = recipes.find(name, [EXAMPLES])
    script = recipes.render_script(
        recipe,
        scheduler,
        values=recipe.values(),
        input_dir="/work/in",
        output_dir="/work/out",
        work_dir="/work",
        scan=SCAN,
    )
    done = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    if name == "lab-dcm2niix":
        assert "dcm2niix -z y -b n -f sub-%n_ses-%t_%p -o /work/out /work/in\n" in script
    else:
        assert "dcm2niix -z y -b n -f sub01_ses-1_T1w -o /work/out /work/in\n" in script
        assert 'bet "$image" "${image%.nii.gz}_brain" -f 0.4 -R -m\n' in script


def test_lab_dcm2niix_refuses_an_unknown_compression() -> None:
    recipe = recipes.find("lab-dcm2niix", [EXAMPLES])
    with pytest.raises(recipes.RecipeError) as err:
        recipe.values({"compress": "zip"})
    assert err.value.message == "--set compress: 'zip' is not one of y, n, o, i"


FAKE_DCM2NIIX = """#!/bin/bash
# Writes an empty OUT/NAME.nii.gz from -f NAME -o OUT, like dcm2niix would.
while [ $# -gt 0 ]; do
    case "$1" in -f) name=$2; shift ;; -o) out=$2; shift ;; esac
    shift
done
: > "$out/$name.nii.gz"
"""
FAKE_BET = """#!/bin/bash
printf '%s\\n' "$*" >> "$BET_LOG"
: > "$2.nii.gz"
"""


def test_t1_brain_chains_dcm2niix_into_bet(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, text in (("dcm2niix", FAKE_DCM2NIIX), ("bet", FAKE_BET)):
        (bin_dir / tool).write_text(text)
        (bin_dir / tool).chmod(0o755)
    (tmp_path / "in").mkdir()
    recipe = recipes.find("t1-brain", [EXAMPLES])
    script = recipes.render_script(
        recipe,
        "local",
        values=recipe.values({"robust": "false"}),
        input_dir=str(tmp_path / "in"),
        output_dir=str(tmp_path / "out"),
        work_dir=str(tmp_path / "work"),
        scan=SCAN,
    )
    env = dict(
        os.environ,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        BET_LOG=str(tmp_path / "bet.log"),
    )
    done = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    assert (tmp_path / "bet.log").read_text() == (
        f"{out}/sub01_ses-1_T1w.nii.gz {out}/sub01_ses-1_T1w_brain -f 0.4 -m\n"
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "sub01_ses-1_T1w.nii.gz",
        "sub01_ses-1_T1w_brain.nii.gz",
    ]
