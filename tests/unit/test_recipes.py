"""Recipe validation (the exact message a lab sees for each mistake) and discovery."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from hpcbridge import recipes
from hpcbridge.cli import hints
from hpcbridge.errors import RecipeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

GOOD = """
name = "t"

[parameters.f]
type = "float"
default = 0.5
help = "threshold"

[parameters.robust]
type = "bool"
default = false

[resources]
cpus = 2
memory = "4GB"
walltime = "01:00:00"

[[outputs]]
glob = "*.nii.gz"
resource = "NIFTI"

[run]
command = \"\"\"
bet {{ input_dir }} {{ output_dir }} -f {{ params.f }}{% if params.robust %} -R{% endif %}
\"\"\"
"""


def _write(tmp_path: Path, text: str, name: str = "t.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _error(tmp_path: Path, text: str) -> tuple[str, str]:
    path = _write(tmp_path, text)
    with pytest.raises(RecipeError) as err:
        recipes.load_recipe(path)
    return err.value.message, str(path)


def test_good_recipe_loads(tmp_path: Path) -> None:
    recipe = recipes.load_recipe(_write(tmp_path, GOOD))
    assert recipe.name == "t"
    assert recipe.values() == {"f": 0.5, "robust": False}
    assert recipe.values({"f": "0.3", "robust": "yes"}) == {"f": 0.3, "robust": True}
    assert recipe.resources == recipes.Resources(cpus=2, memory_mb=4096, walltime=3600)
    assert recipe.outputs == (recipes.Output("*.nii.gz", "NIFTI"),)


def test_unknown_top_level_key(tmp_path: Path) -> None:
    message, where = _error(tmp_path, 'colour = "red"\n' + GOOD)
    assert message == (
        f"{where}: unknown key 'colour' (known: description, environment, inputs, name, "
        "outputs, parameters, resources, run, version)"
    )


def test_unknown_resources_key(tmp_path: Path) -> None:
    message, where = _error(tmp_path, GOOD.replace("cpus = 2", "cpus = 2\nnodes = 3"))
    assert message == (
        f"{where} [resources]: unknown key 'nodes' "
        "(known: account, cpus, gpus, memory, queue, walltime)"
    )


def test_unknown_parameter_key(tmp_path: Path) -> None:
    message, where = _error(tmp_path, GOOD.replace('help = "threshold"', "min = 0.0"))
    assert message == (
        f"{where} [parameters.f]: unknown key 'min' (known: choices, default, help, type)"
    )


def test_unknown_outputs_key(tmp_path: Path) -> None:
    message, where = _error(
        tmp_path, GOOD.replace('resource = "NIFTI"', 'resource = "NIFTI"\npattern = "x"')
    )
    assert message == (
        f"{where} [[outputs]] #1: unknown key 'pattern' (known: content, format, glob, resource)"
    )


def test_missing_command(tmp_path: Path) -> None:
    message, where = _error(tmp_path, GOOD.split("[run]")[0])
    assert message == f"{where}: [run] command is missing"


@pytest.mark.parametrize("value", ["2h", "1:00:00:00", "01:60:00", ""])
def test_bad_walltime(tmp_path: Path, value: str) -> None:
    message, where = _error(tmp_path, GOOD.replace('"01:00:00"', f'"{value}"'))
    assert message == f"{where} [resources]: walltime {value!r} is not HH:MM:SS"


def test_zero_walltime(tmp_path: Path) -> None:
    message, where = _error(tmp_path, GOOD.replace('"01:00:00"', '"00:00:00"'))
    assert message == f"{where} [resources]: walltime '00:00:00' must be longer than zero"


@pytest.mark.parametrize("value", ["lots", "4 GiB", "-1GB", "GB"])
def test_bad_memory(tmp_path: Path, value: str) -> None:
    message, where = _error(tmp_path, GOOD.replace('"4GB"', f'"{value}"'))
    assert message == f"{where} [resources]: memory {value!r} is not a size like '2GB' or '512MB'"


@pytest.mark.parametrize(
    ("text", "mb"), [("512mb", 512), ("2GB", 2048), ("1.5g", 1536), ("1T", 1048576)]
)
def test_memory_units(tmp_path: Path, text: str, mb: int) -> None:
    recipe = recipes.load_recipe(_write(tmp_path, GOOD.replace('"4GB"', f'"{text}"')))
    assert recipe.resources.memory_mb == mb


def test_walltime_beyond_a_day(tmp_path: Path) -> None:
    recipe = recipes.load_recipe(_write(tmp_path, GOOD.replace('"01:00:00"', '"100:00:00"')))
    assert recipe.resources.walltime == 360000
    assert recipes.format_walltime(recipe.resources.walltime) == "100:00:00"


@pytest.mark.parametrize(
    ("old", "new", "error"),
    [
        ("default = 0.5", 'default = "high"', "'high' is not a float"),
        ("default = false", 'default = "maybe"', "'maybe' is not a bool"),
        ("default = false", "default = 1", "1 is not a bool"),
    ],
)
def test_default_of_the_wrong_type(tmp_path: Path, old: str, new: str, error: str) -> None:
    message, where = _error(tmp_path, GOOD.replace(old, new))
    name = "f" if old == "default = 0.5" else "robust"
    assert message == f"{where} [parameters.{name}] default: {error}"


@pytest.mark.parametrize(
    ("key", "value", "error"),
    [
        ("f", "abc", "--set f: 'abc' is not a float"),
        ("robust", "maybe", "--set robust: 'maybe' is not a bool"),
    ],
)
def test_set_value_of_the_wrong_type(tmp_path: Path, key: str, value: str, error: str) -> None:
    recipe = recipes.load_recipe(_write(tmp_path, GOOD))
    with pytest.raises(RecipeError) as err:
        recipe.values({key: value})
    assert err.value.message == error


def test_set_value_outside_choices(tmp_path: Path) -> None:
    text = GOOD.replace('help = "threshold"', "choices = [0.3, 0.5]")
    recipe = recipes.load_recipe(_write(tmp_path, text))
    assert recipe.values({"f": "0.3"})["f"] == 0.3
    with pytest.raises(RecipeError) as err:
        recipe.values({"f": "0.4"})
    assert err.value.message == "--set f: '0.4' is not one of 0.3, 0.5"


def test_unknown_parameter_in_set(tmp_path: Path) -> None:
    recipe = recipes.load_recipe(_write(tmp_path, GOOD))
    with pytest.raises(RecipeError) as err:
        recipe.values({"nosuch": "1"})
    assert err.value.message == "recipe t has no parameter 'nosuch' (parameters: f, robust)"


def test_unknown_variable_in_template(tmp_path: Path) -> None:
    message, where = _error(tmp_path, GOOD.replace("{{ input_dir }}", "{{ inputdir }}"))
    assert message == (
        f"{where} [run] command: unknown variable 'inputdir' (known: cpus, gpus, input_dir, "
        "memory_mb, output_dir, params, scan, walltime, work_dir, and params.NAME)"
    )


@pytest.mark.parametrize(
    "use",
    [
        "{{ params.nosuch }}",
        "{{ params['nosuch'] }}",
        # In a branch the default values do not take: still caught when the recipe loads.
        "{% if params.robust %}{{ params.nosuch }}{% endif %}",
    ],
)
def test_unknown_params_name_in_template(tmp_path: Path, use: str) -> None:
    message, where = _error(tmp_path, GOOD.replace("{{ output_dir }}", use))
    assert message == (
        f"{where} [run] command: unknown parameter params.nosuch (parameters: f, robust)"
    )


def test_template_syntax_error(tmp_path: Path) -> None:
    message, where = _error(tmp_path, GOOD.replace("{% endif %}", ""))
    assert message.startswith(f"{where} [run] command: template error on line 1: ")


def test_invalid_toml(tmp_path: Path) -> None:
    text = 'name = "t"\nresources = {cpus = \n'
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        detail = str(exc)
    message, where = _error(tmp_path, text)
    assert message == f"{where}: not valid TOML: {detail}"
    assert "line 2" in message


@pytest.mark.parametrize("field", ["queue", "account"])
@pytest.mark.parametrize("value", ["a b", "q;rm", "$(id)", "x\ny"])
def test_bad_queue_or_account_characters(tmp_path: Path, field: str, value: str) -> None:
    toml_value = value.replace("\n", "\\n")  # a TOML escape: the value holds a real newline
    message, where = _error(
        tmp_path, GOOD.replace("cpus = 2", f'cpus = 2\n{field} = "{toml_value}"')
    )
    assert message == (
        f"{where} [resources]: {field} {value!r} may only hold letters, digits and '_.@+-'"
    )


def test_both_command_and_command_file(tmp_path: Path) -> None:
    message, where = _error(tmp_path, GOOD + 'command_file = "c.sh.j2"\n')
    assert message == f"{where} [run]: give command or command_file, not both"


def test_bad_name(tmp_path: Path) -> None:
    message, where = _error(tmp_path, GOOD.replace('name = "t"', 'name = "1 bad"'))
    assert message == f"{where}: name '1 bad' must be a letter then letters, digits, '_' or '-'"


# -- discovery -------------------------------------------------------------------------------
LAB_DCM2NIIX = """
name = "dcm2niix"
description = "lab variant"
[run]
command = "dcm2niix -f sub-%n -o {{ output_dir }} {{ input_dir }}"
"""


def test_lab_folder_overrides_builtin_as_extra(tmp_path: Path) -> None:
    lab = tmp_path / "lab"
    lab.mkdir()
    _write(lab, LAB_DCM2NIIX, "dcm2niix.toml")
    found = recipes.discover([lab])
    assert found["dcm2niix"].description == "lab variant"
    assert found["dcm2niix"].origin == str(lab)
    assert found["fsl-bet"].origin == "built-in"
    assert recipes.find("dcm2niix", [lab]).description == "lab variant"
    assert recipes.find("dcm2niix").origin == "built-in"


def test_lab_folders_in_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    _write(second, LAB_DCM2NIIX, "dcm2niix.toml")
    _write(first, LAB_DCM2NIIX.replace("lab variant", "first wins"), "dcm2niix.toml")
    _write(second, GOOD.replace('name = "t"', 'name = "only-second"'), "only-second.toml")
    monkeypatch.setenv("HPCBRIDGE_RECIPES", f"{first}:{tmp_path / 'missing'}:{second}")
    found = recipes.discover()
    assert found["dcm2niix"].description == "first wins"
    assert found["dcm2niix"].origin == str(first)
    assert found["only-second"].origin == str(second)
    assert found["dicom-qc"].origin == "built-in"
    # --recipes folders come before the environment variable.
    extra = tmp_path / "extra"
    extra.mkdir()
    _write(extra, LAB_DCM2NIIX.replace("lab variant", "extra wins"), "dcm2niix.toml")
    assert recipes.discover([extra])["dcm2niix"].origin == str(extra)
    assert [origin for _, origin in recipes.search_path([extra])] == [
        str(extra),
        str(first),
        str(tmp_path / "missing"),
        str(second),
        "built-in",
    ]


def test_home_recipes_come_after_the_environment(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "recipes").mkdir(parents=True)
    _write(home / "recipes", LAB_DCM2NIIX, "dcm2niix.toml")
    found = recipes.discover(home=home)
    assert found["dcm2niix"].origin == str(home / "recipes")


def test_folder_recipe_with_command_file(tmp_path: Path) -> None:
    lab = tmp_path / "lab"
    (lab / "two-step").mkdir(parents=True)
    _write(
        lab / "two-step",
        'description = "folder"\n[run]\ncommand_file = "command.sh.j2"\n',
        "recipe.toml",
    )
    _write(lab / "two-step", "step1 {{ input_dir }}\nstep2 {{ output_dir }}\n", "command.sh.j2")
    recipe = recipes.find("two-step", [lab])
    assert recipe.name == "two-step"  # from the folder's name
    assert recipe.origin == str(lab)
    script = recipes.render_script(
        recipe, "slurm", values={}, input_dir="/w/in", output_dir="/w/out", work_dir="/w"
    )
    assert script.endswith("# Recipe two-step\nstep1 /w/in\nstep2 /w/out\n")


def test_missing_command_file(tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    path = _write(tmp_path / "r", '[run]\ncommand_file = "nope.sh.j2"\n', "recipe.toml")
    with pytest.raises(RecipeError) as err:
        recipes.load_recipe(path)
    assert err.value.message == (
        f"{path} [run] command_file: cannot read {tmp_path / 'r' / 'nope.sh.j2'}: "
        "No such file or directory"
    )


def test_find_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as err:
        recipes.find("nosuch")
    assert err.value.message == "no recipe named 'nosuch'"
    assert (
        hints.hint(err.value) == "known: dcm2niix, dicom-qc, fsl-bet; see `hpcbridge recipes list`"
    )


def test_find_by_path(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD)
    assert recipes.find(str(path)).origin == str(tmp_path)


def test_unknown_scheduler(tmp_path: Path) -> None:
    recipe = recipes.load_recipe(_write(tmp_path, GOOD))
    with pytest.raises(RecipeError) as err:
        recipes.render_script(
            recipe, "lsf", values=recipe.values(), input_dir="/a", output_dir="/b", work_dir="/c"
        )
    assert err.value.message == "unknown scheduler 'lsf' (one of pbs, torque, slurm, local)"


def test_relative_and_unsafe_work_dirs(tmp_path: Path) -> None:
    recipe = recipes.load_recipe(_write(tmp_path, GOOD))
    kw = {"values": recipe.values(), "input_dir": "/a", "output_dir": "/b"}
    with pytest.raises(RecipeError) as err:
        recipes.render_script(recipe, "pbs", work_dir="work", **kw)  # type: ignore[arg-type]
    assert err.value.message == "work directory 'work' must be an absolute path"
    with pytest.raises(RecipeError) as err:
        recipes.render_script(recipe, "pbs", work_dir="/my work", **kw)  # type: ignore[arg-type]
    assert err.value.message == (
        "work directory '/my work' cannot appear in a scheduler directive "
        "(letters, digits and '_./+@-' only)"
    )
    # The local scheduler has no directives: a path with a space is quoted, not refused.
    script = recipes.render_script(recipe, "local", work_dir="/my work", **kw)  # type: ignore[arg-type]
    assert "HPCBRIDGE_WORK='/my work'\n" in script
