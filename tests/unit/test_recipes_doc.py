"""docs/recipes.md, followed from scratch: its tutorial recipe loads, validates and renders."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from hpcbridge import recipes
from hpcbridge.errors import RecipeError

DOC = Path(__file__).resolve().parents[2] / "docs" / "recipes.md"


def _tutorial_recipe() -> str:
    """The first ```toml block under the heading "Your first recipe"."""
    text = DOC.read_text()
    section = text.split("\n## Your first recipe\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```toml\n(.*?)```", section, re.S)[0]


@pytest.fixture()
def tutorial(tmp_path: Path) -> recipes.Recipe:
    lab = tmp_path / "lab-recipes"
    lab.mkdir()
    (lab / "bet-fast.toml").write_text(_tutorial_recipe())
    return recipes.find("bet-fast", [lab])


def test_tutorial_recipe_loads_as_described(tutorial: recipes.Recipe, tmp_path: Path) -> None:
    assert tutorial.name == "bet-fast"
    assert tutorial.origin == str(tmp_path / "lab-recipes")
    assert tutorial.values() == {"f": 0.5, "mask": False}
    assert tutorial.values({"mask": "true"}) == {"f": 0.5, "mask": True}
    assert tutorial.modules == ("fsl",)
    assert tutorial.input_resource == "NIFTI"
    assert [o.resource for o in tutorial.outputs] == ["BRAIN"]


@pytest.mark.parametrize("scheduler", recipes.SCHEDULERS)
def test_tutorial_recipe_renders(tutorial: recipes.Recipe, scheduler: str) -> None:
    script = recipes.render_script(
        tutorial,
        scheduler,
        values=tutorial.values({"mask": "true"}),
        input_dir="/scratch/me/in",
        output_dir="/scratch/me/out",
        work_dir="/scratch/me",
    )
    done = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "export FSLOUTPUTTYPE=NIFTI_GZ\n" in script
    assert (
        'bet "$image" /scratch/me/out/"$(basename "$image" .nii.gz)_brain" -f 0.5 -m\ndone\n'
    ) in script


def test_documented_error_examples_match(tutorial: recipes.Recipe) -> None:
    """Two rows of the guide's error table, checked against the real messages."""
    doc = DOC.read_text()
    with pytest.raises(RecipeError) as err:
        tutorial.values({"nosuch": "1"})
    assert f"`{err.value.message}`" in doc
    with pytest.raises(RecipeError) as err:
        tutorial.values({"f": "abc"})
    assert f"`{err.value.message}`" in doc


def test_guide_lists_every_key_and_builtin() -> None:
    doc = DOC.read_text()
    keys = (
        recipes.TOP_KEYS
        | recipes.RESOURCE_KEYS
        | recipes.PARAM_KEYS
        | recipes.ENV_KEYS
        | recipes.INPUT_KEYS
        | recipes.OUTPUT_KEYS
        | recipes.RUN_KEYS
        | recipes.COMMAND_VARS
    )
    missing = sorted(k for k in keys if not any(f"`{s}{k}" in doc for s in ("", "[", "[[")))
    assert missing == []
    for name in recipes.discover():
        assert f"| `{name}` |" in doc
