"""Recipes from a shared folder are data, not code (issue 14).

Three classes of attack, each with payloads of several kinds: templates that reach Python through
Jinja (they must never run, not even when another recipe is looked up), recipe folders and files
that every user may write (refused, like OpenSSH's StrictModes), and resources no scheduler would
accept (refused where they are read and where they are rendered). Payloads that would run a
command try to create a marker file; its absence is what "nothing runs" means.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import jinja2.sandbox
import pytest

from hpcbridge import recipes
from hpcbridge.cli import hints
from hpcbridge.errors import RecipeError, Step

NOT_CODE = "a recipe may use its variables, filters and tests, not Python's internals"
PATHS = {"input_dir": "/w/in", "output_dir": "/w/out", "work_dir": "/w"}
GOOD = '[run]\ncommand = "echo {{ input_dir }}"\n'


@pytest.fixture(autouse=True)
def _fresh_reports() -> Iterator[None]:
    """Each test sees its own "warn once" (the module remembers what a process reported)."""
    recipes._reported.clear()
    yield
    recipes._reported.clear()


@pytest.fixture()
def lab(tmp_path: Path) -> Path:
    folder = tmp_path / "lab"
    folder.mkdir()
    folder.chmod(0o755)
    return folder


@pytest.fixture()
def marker(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "a recipe template ran a command"


def _toml(value: str) -> str:
    """A TOML basic string holding ``value`` (JSON's escapes are TOML's)."""
    return json.dumps(value)


def _payloads(marker: Path) -> dict[str, tuple[str, str]]:
    """Template payloads that run ``touch MARKER`` through Jinja without a sandbox, and the
    attribute the static check names first."""
    touch = f"'touch {marker}'"
    return {
        "subclasses walk": (
            "{% for c in ''.__class__.__mro__[1].__subclasses__() %}"
            "{% if c.__name__ == 'catch_warnings' %}"
            "{{ c()._module.__builtins__['__import__']('os').system(" + touch + ") }}"
            "{% endif %}{% endfor %}",
            "__class__",
        ),
        "cycler globals": (
            "{{ cycler.__init__.__globals__.os.system(" + touch + ") }}",
            "__init__",
        ),
        "lipsum globals": ("{{ lipsum.__globals__['os'].system(" + touch + ") }}", "__globals__"),
        "template reference": (
            "{{ self._TemplateReference__context.joiner.__init__.__globals__.os.system("
            + touch
            + ") }}",
            "_TemplateReference__context",
        ),
        "getitem walk": (
            "{{ cycler['__init__']['__globals__']['os'].popen(" + touch + ").read() }}",
            "__init__",
        ),
        "attr filter": (
            "{{ (namespace|attr('__init__')|attr('__globals__'))['os'].system(" + touch + ") }}",
            "__init__",
        ),
        "type mro": (
            "{% for c in dict.mro()[-1].__subclasses__() %}"
            "{% if c.__name__ == 'catch_warnings' %}"
            "{{ c()._module.__builtins__['__import__']('os').system(" + touch + ") }}"
            "{% endif %}{% endfor %}",
            "mro",
        ),
    }


READ_ONLY = {
    # Reads Python internals without calling anything: a leak (the environment's secrets).
    "format string": ("{{ '{0.__init__.__globals__[os].environ}'.format(cycler) }}", "__init__"),
    "params class": ("{{ params.__class__.__mro__ }}", "__class__"),
    "range internals": ("{{ range.__self__ }}", "__self__"),
}

# Where a recipe holds a template: (how the file is written, the field its errors name).
FIELDS = ("command", "command_file", "setup")


def _hostile(lab: Path, name: str, field: str, template: str) -> Path:
    """A recipe ``name`` in ``lab`` whose ``field`` is ``template``."""
    if field == "command":
        text = f"[run]\ncommand = {_toml(template)}\n"
    elif field == "setup":
        text = f"[environment]\nsetup = {_toml(template)}\n" + GOOD
    else:
        (lab / name).mkdir()
        (lab / name / "command.sh.j2").write_text(template + "\n")
        path = lab / name / "recipe.toml"
        path.write_text('[run]\ncommand_file = "command.sh.j2"\n')
        return path
    path = lab / f"{name}.toml"
    path.write_text(text)
    return path


def _label(field: str) -> str:
    return {
        "command": "[run] command",
        "command_file": "[run] command_file command.sh.j2",
        "setup": "[environment] setup",
    }[field]


# -- 1. templates cannot reach Python ---------------------------------------------------------
@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize(
    "kind",
    [
        "subclasses walk",
        "cycler globals",
        "lipsum globals",
        "template reference",
        "getitem walk",
        "attr filter",
        "type mro",
    ],
)
def test_code_running_payloads_are_broken_recipes_and_never_run(
    lab: Path, marker: Path, field: str, kind: str
) -> None:
    template, attribute = _payloads(marker)[kind]
    path = _hostile(lab, "evil", field, template)
    (lab / "good.toml").write_text(GOOD)
    expected = (
        f"{path} {_label(field)}: template tries to reach an unsafe attribute {attribute!r} "
        f"on line 1 ({NOT_CODE})"
    )
    found = recipes.discover([lab])
    assert "good" in found and "dcm2niix" in found  # the others stay usable
    assert [(b.path, b.name, b.error) for b in found.broken] == [(path, "evil", expected)]
    assert "evil" not in found and found.blocked["evil"].error == expected
    with pytest.raises(RecipeError) as err:
        recipes.find("evil", [lab])
    assert err.value.message == expected
    with pytest.raises(RecipeError) as err:
        recipes.load_recipe(path)
    assert err.value.message == expected
    # Another recipe of the same folder, dry or rendered, runs nothing of it.
    good = recipes.find("good", [lab])
    recipes.render_script(good, "local", values={}, **PATHS)


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("kind", sorted(READ_ONLY))
def test_read_only_payloads_are_refused(lab: Path, field: str, kind: str) -> None:
    template, attribute = READ_ONLY[kind]
    if field == "setup" and "params" in template:
        template = template.replace("params", "cycler")
    path = _hostile(lab, "peek", field, template)
    with pytest.raises(RecipeError) as err:
        recipes.find("peek", [lab])
    assert err.value.message == (
        f"{path} {_label(field)}: template tries to reach an unsafe attribute {attribute!r} "
        f"on line 1 ({NOT_CODE})"
    )


# Attribute names that only exist at render time (parameter values), so that no static check
# can see them: the sandbox alone stops these.
DYNAMIC = """
[parameters.i]
default = "__init__"
[parameters.g]
default = "__globals__"
[run]
command = "{{ (cycler|attr(params.i)|attr(params.g))['os'].system('touch MARKER') }}"
"""


def test_names_built_at_render_time_are_stopped_by_the_sandbox(lab: Path, marker: Path) -> None:
    path = lab / "sly.toml"
    path.write_text(DYNAMIC.replace("MARKER", str(marker)))
    (lab / "good.toml").write_text(GOOD)
    expected = (
        f"{path} [run] command: template tries to reach an unsafe attribute '__init__' "
        f"({NOT_CODE}); nothing was run"
    )
    found = recipes.discover([lab])  # discovery only parses: it cannot see the names
    assert set(found) >= {"sly", "good"} and found.broken == []
    recipes.find("good", [lab])
    with pytest.raises(RecipeError) as err:
        recipes.find("sly", [lab])
    assert err.value.message == expected
    recipe = recipes.load_recipe(path)
    with pytest.raises(RecipeError) as err:
        recipes.render_script(recipe, "pbs", values=recipe.values(), **PATHS)
    assert err.value.message == expected


@pytest.mark.parametrize(
    ("template", "error"),
    [
        ("{{ 1 // 0 }}", "template failed: ZeroDivisionError: integer division or modulo by zero"),
        ("{{ params.update({}) }}", "template tries to reach an unsafe attribute 'update'"),
        ("{{ 'x' * 100000000 }}", "template refused: it builds a value of more than 1000000"),
        ("{{ 7 ** 100000000 }}", "template refused: it builds a number of more than 1000000"),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "template failed: RecursionError"),
        ("{% for i in range(10**9) %}{% endfor %}", "template failed: OverflowError: Range"),
    ],
)
def test_templates_that_fail_only_when_rendered_do_not_break_discovery(
    lab: Path, template: str, error: str
) -> None:
    path = lab / "bad.toml"
    path.write_text(f"[run]\ncommand = {_toml(template)}\n")
    (lab / "good.toml").write_text(GOOD)
    found = recipes.discover([lab])
    assert {"bad", "good"} <= set(found)
    assert recipes.find("good", [lab]).name == "good"
    with pytest.raises(RecipeError) as err:
        recipes.find("bad", [lab])
    assert err.value.message.startswith(f"{path} [run] command: {error}")
    assert "\n" not in err.value.message


def test_the_sandbox_keeps_what_good_templates_use(lab: Path) -> None:
    template = (
        "{% set ns = namespace(n=0) %}{% for k, v in params.items() %}{% set ns.n = ns.n + 1 %}"
        "{{ loop.index }}={{ v }} {% endfor %}{{ ns.n }} {{ '-' * 3 }} {{ '%s_%d' % ('a', 1) }} "
        "{{ '{}:{}'.format(cpus, gpus) }} {{ 'a b' | q }} {{ '*.nii' | raw }} {{ 'a b' }} "
        "{{ range(3) | join(',') }} {{ scan.id ~ '_T1' }} {{ params.on }}"
    )
    (lab / "ok.toml").write_text(
        '[parameters.x]\ndefault = "a b"\n[parameters.on]\ntype = "bool"\ndefault = true\n'
        '[environment]\nsetup = "{% if true %}export A=1{% endif %}\\n"\n'
        f"[run]\ncommand = {_toml(template)}\n"
    )
    recipe = recipes.find("ok", [lab])
    script = recipes.render_script(recipe, "local", values=recipe.values(), **PATHS)
    assert ("1='a b' 2=true 2 --- a_1 1:0 'a b' *.nii 'a b' 0,1,2 1_T1 true\n") in script.split(
        "# Recipe ok\n"
    )[1]
    assert "\nexport A=1\n" in script


def test_setup_has_no_variables(lab: Path) -> None:
    path = lab / "s.toml"
    path.write_text('[environment]\nsetup = "export X={{ input_dir }}"\n' + GOOD)
    with pytest.raises(RecipeError) as err:
        recipes.load_recipe(path)
    assert err.value.message == (
        f"{path} [environment] setup: unknown variable 'input_dir' (setup is the recipe's own "
        "shell text; it has no variables)"
    )


def test_unknown_scan_field_is_found_without_rendering(lab: Path) -> None:
    path = lab / "s.toml"
    path.write_text('[run]\ncommand = "{% if false %}{{ scan.sesion }}{% endif %}"\n')
    with pytest.raises(RecipeError) as err:
        recipes.load_recipe(path)
    assert err.value.message == (
        f"{path} [run] command: unknown variable scan.sesion (known: project, subject, "
        "experiment, id, type, series_description)"
    )


def test_unknown_filter_is_found_without_rendering(lab: Path) -> None:
    path = lab / "f.toml"
    path.write_text('[run]\ncommand = "{{ input_dir | shout }}"\n')
    with pytest.raises(RecipeError) as err:
        recipes.load_recipe(path)
    assert err.value.message == (
        f"{path} [run] command: template error on line 1: No filter named 'shout'."
    )


def test_scheduler_skeletons_render_in_the_sandbox() -> None:
    assert isinstance(recipes.scheduler_environment(), jinja2.sandbox.SandboxedEnvironment)
    assert isinstance(recipes.setup_environment(), jinja2.sandbox.SandboxedEnvironment)


# -- one broken recipe never blocks the others -----------------------------------------------
def test_broken_recipes_are_kept_apart_and_reported_once(
    lab: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (lab / "good.toml").write_text(GOOD)
    bad_toml = lab / "typo.toml"
    bad_toml.write_text("[run\ncommand = 'x'\n")
    (lab / "nocmd").mkdir()
    no_command = lab / "nocmd" / "recipe.toml"
    no_command.write_text('description = "no command"\n')
    found = recipes.discover([lab])
    assert {"good", "dcm2niix", "dicom-qc", "fsl-bet"} <= set(found)
    assert [(b.path, b.name, b.origin) for b in found.broken] == [
        (bad_toml, "typo", str(lab)),
        (no_command, "nocmd", str(lab)),
    ]
    assert found.broken[0].error.startswith(f"{bad_toml}: not valid TOML: ")
    assert found.broken[1].error == f"{no_command}: [run] command is missing"
    with caplog.at_level(logging.WARNING, logger="hpcbridge"):
        assert recipes.find("good", [lab]).name == "good"
        assert recipes.find("dcm2niix", [lab]).origin == "built-in"  # warned once, not again
    assert [(r.getMessage(), r.step) for r in caplog.records] == [
        (f"skipped 2 broken recipes ({bad_toml}, {no_command})", Step.RECIPES_WHY)
    ]
    assert hints.WORDS[Step.RECIPES_WHY] == "`hpcbridge recipes list` shows why"
    with pytest.raises(RecipeError) as err:
        recipes.find("nocmd", [lab])
    assert err.value.message == f"{no_command}: [run] command is missing"


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ("a = " + "[" * 50000 + "]" * 50000, "{path}: not valid TOML: nested too deeply"),
        (
            '[run]\ncommand = "{{ ' + "(" * 50000 + "1" + ")" * 50000 + ' }}"\n',
            "{path} [run] command: template error: nested too deeply",
        ),
        (b"[run]\ncommand = '\xff\xfe'\n", "{path}: not valid TOML: not UTF-8 text"),
        (
            '[parameters.x]\ndefault = 1\nchoices = 5\n[run]\ncommand = "echo"\n',
            "{path} [parameters.x]: choices must be a list",
        ),
        (
            '[run]\ncommand_file = "a\\u0000b"\n',
            "{path} [run] command_file: cannot read '{lab}/a\\x00b': embedded null byte",
        ),
    ],
    ids=["deep TOML", "deep template", "not UTF-8", "choices", "NUL in command_file"],
)
def test_files_that_crashed_the_loader_are_broken_recipes(
    lab: Path, content: str | bytes, error: str
) -> None:
    path = lab / "odd.toml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    (lab / "good.toml").write_text(GOOD)
    found = recipes.discover([lab])
    assert "good" in found
    assert [(b.name, b.error) for b in found.broken] == [("odd", error.format(path=path, lab=lab))]


def test_a_link_loop_is_a_broken_recipe(lab: Path) -> None:
    (lab / "loop.toml").symlink_to(lab / "loop.toml")
    (lab / "good.toml").write_text(GOOD)
    found = recipes.discover([lab])
    assert "good" in found
    assert [(b.name, b.error.split(": ")[0]) for b in found.broken] == [
        ("loop", str(lab / "loop.toml"))
    ]


def test_a_broken_lab_override_is_an_error_not_the_builtin(lab: Path) -> None:
    path = lab / "dcm2niix.toml"
    path.write_text('name = "dcm2niix"\n[run]\ncommand = "dcm2niix {{ inputdir }}"\n')
    with pytest.raises(RecipeError) as err:
        recipes.find("dcm2niix", [lab])
    assert err.value.message.startswith(f"{path} [run] command: unknown variable 'inputdir'")
    assert "dcm2niix" not in recipes.discover([lab])


# -- 2. folders and files every user may write ------------------------------------------------
def test_a_folder_every_user_may_write_is_refused_as_a_whole(
    lab: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (lab / "good.toml").write_text(GOOD)
    (lab / "dcm2niix.toml").write_text(GOOD)
    lab.chmod(0o777)
    error = (
        f"{lab} is writable by every user (mode 0777); refusing its recipes (run `chmod o-w {lab}`)"
    )
    found = recipes.discover([lab])
    assert [(b.path, b.name, b.error) for b in found.broken] == [(lab, "", error)]
    assert "good" not in found and found["fsl-bet"].origin == "built-in"
    for name in ("good", "dcm2niix"):  # its names are errors, not a fall-back to a built-in
        with pytest.raises(RecipeError) as err:
            recipes.find(name, [lab])
        assert err.value.message == error
    with caplog.at_level(logging.WARNING, logger="hpcbridge"):
        recipes.find("fsl-bet", [lab])
    assert [r.getMessage() for r in caplog.records] == [f"skipped a broken recipe: {error}"]
    with pytest.raises(RecipeError) as err:
        recipes.find(str(lab / "good.toml"))
    assert err.value.message == error


def test_the_sticky_bit_does_not_excuse_the_recipe_folder_itself(lab: Path) -> None:
    (lab / "good.toml").write_text(GOOD)
    lab.chmod(0o1777)
    found = recipes.discover([lab])
    assert found.broken[0].error == (
        f"{lab} is writable by every user (mode 1777); refusing its recipes (run `chmod o-w {lab}`)"
    )


def test_a_parent_every_user_may_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    (shared / "recipes").mkdir(parents=True)
    (shared / "recipes" / "good.toml").write_text(GOOD)
    shared.chmod(0o777)
    found = recipes.discover([shared / "recipes"])
    assert found.broken[0].error == (
        f"{shared} is writable by every user (mode 0777), so anyone may replace "
        f"{shared / 'recipes'}; refusing its recipes (run `chmod o-w {shared}`)"
    )
    shared.chmod(0o1777)  # sticky: nobody may rename or delete another user's folder in it
    assert recipes.discover([shared / "recipes"]).broken == []


def test_a_file_every_user_may_write_is_refused(lab: Path) -> None:
    (lab / "good.toml").write_text(GOOD)
    open_file = lab / "open.toml"
    open_file.write_text(GOOD)
    open_file.chmod(0o666)
    error = (
        f"{open_file} is writable by every user (mode 0666); refusing it "
        f"(run `chmod o-w {open_file}`)"
    )
    found = recipes.discover([lab])
    assert [(b.path, b.name, b.error) for b in found.broken] == [(open_file, "open", error)]
    assert "good" in found
    with pytest.raises(RecipeError) as err:
        recipes.find("open", [lab])
    assert err.value.message == error
    with pytest.raises(RecipeError) as err:
        recipes.find(str(open_file))
    assert err.value.message == error


def test_a_folder_recipe_every_user_may_write_is_refused(lab: Path) -> None:
    (lab / "two").mkdir()
    (lab / "two" / "recipe.toml").write_text('[run]\ncommand_file = "c.sh.j2"\n')
    command = lab / "two" / "c.sh.j2"
    command.write_text("echo {{ input_dir }}\n")
    command.chmod(0o646)
    with pytest.raises(RecipeError) as err:
        recipes.find("two", [lab])
    assert err.value.message == (
        f"{lab / 'two' / 'recipe.toml'} [run] command_file: {command} is writable by every user "
        f"(mode 0646); refusing it (run `chmod o-w {command}`)"
    )
    command.chmod(0o644)
    (lab / "two").chmod(0o757)
    with pytest.raises(RecipeError) as err:
        recipes.find("two", [lab])
    assert err.value.message == (
        f"{lab / 'two'} is writable by every user (mode 0757); refusing its recipes "
        f"(run `chmod o-w {lab / 'two'}`)"
    )


def test_a_link_into_a_folder_every_user_may_write_is_refused(lab: Path, tmp_path: Path) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "real.toml").write_text(GOOD)
    drop.chmod(0o777)
    (lab / "linked.toml").symlink_to(drop / "real.toml")
    found = recipes.discover([lab])
    assert [b.error for b in found.broken] == [
        f"{drop} is writable by every user (mode 0777); refusing its recipes "
        f"(run `chmod o-w {drop}`)"
    ]


def test_group_writable_lab_folders_are_normal(lab: Path) -> None:
    (lab / "good.toml").write_text(GOOD)
    (lab / "good.toml").chmod(0o664)
    (lab / "two").mkdir()
    (lab / "two").chmod(0o2775)
    (lab / "two" / "recipe.toml").write_text(GOOD)
    lab.chmod(0o2775)
    found = recipes.discover([lab])
    assert found.broken == [] and {"good", "two"} <= set(found)


def test_a_folder_with_spaces_gets_a_chmod_it_can_paste(tmp_path: Path) -> None:
    folder = tmp_path / "lab recipes"
    folder.mkdir()
    (folder / "good.toml").write_text(GOOD)
    folder.chmod(0o777)
    assert recipes.discover([folder]).broken[0].error.endswith(f"(run `chmod o-w '{folder}'`)")


# -- 3. resources no scheduler could accept ---------------------------------------------------
RES = '[resources]\n{line}\n[run]\ncommand = "echo"\n'


def _resource_error(lab: Path, line: str) -> str:
    path = lab / "r.toml"
    path.write_text(RES.format(line=line))
    with pytest.raises(RecipeError) as err:
        recipes.load_recipe(path)
    assert "\n" not in err.value.message
    return err.value.message.removeprefix(f"{path} [resources]: ")


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("cpus = 0", "cpus 0 must be a whole number from 1 to 4096"),
        ("cpus = 4097", "cpus 4097 must be a whole number from 1 to 4096"),
        (f"cpus = {10**30}", f"cpus {10**30} must be a whole number from 1 to 4096"),
        ("cpus = true", "cpus True must be a whole number from 1 to 4096"),
        ("cpus = 2.5", "cpus 2.5 must be a whole number from 1 to 4096"),
        ("cpus = nan", "cpus nan must be a whole number from 1 to 4096"),
        ("gpus = -1", "gpus -1 must be a whole number from 0 to 64"),
        ("gpus = 65", "gpus 65 must be a whole number from 0 to 64"),
        ("gpus = inf", "gpus inf must be a whole number from 0 to 64"),
    ],
)
def test_cpus_and_gpus_out_of_range(lab: Path, line: str, error: str) -> None:
    assert _resource_error(lab, line) == error


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ('"65T"', "memory '65T' is more than any node has (at most 64TB)"),
        ('"99999999999999999999999T"', "is more than any node has (at most 64TB)"),
        ('"' + "1" * 400 + 'GB"', "is more than any node has (at most 64TB)"),
        (str(10**30), f"memory {10**30} is more than any node has (at most 64TB)"),
        ("67108865", "memory 67108865 is more than any node has (at most 64TB)"),
        ('"1e999GB"', "memory '1e999GB' is not a size like '2GB' or '512MB'"),
        ('"nanGB"', "memory 'nanGB' is not a size like '2GB' or '512MB'"),
        ('"infGB"', "memory 'infGB' is not a size like '2GB' or '512MB'"),
        ("inf", "memory inf is not a size like '2GB' or '512MB'"),
        ("-5", "memory -5 is not a size like '2GB' or '512MB'"),
        ('"\u0662GB"', "memory '\u0662GB' is not a size like '2GB' or '512MB'"),
        ('"0.1k"', "memory '0.1k' is less than 1 MB"),
    ],
)
def test_memory_out_of_range(lab: Path, value: str, error: str) -> None:
    assert error in _resource_error(lab, f"memory = {value}")


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (
            "999999999:00:00",
            "walltime '999999999:00:00' is longer than a year (at most 8760:00:00)",
        ),
        ("8760:00:01", "walltime '8760:00:01' is longer than a year (at most 8760:00:00)"),
        ("9" * 5000 + ":00:00", "is longer than a year (at most 8760:00:00)"),
        ("\u0660\u0661:00:00", "walltime '\u0660\u0661:00:00' is not HH:MM:SS"),
        ("-1:00:00", "walltime '-1:00:00' is not HH:MM:SS"),
    ],
)
def test_walltime_out_of_range(lab: Path, value: str, error: str) -> None:
    assert error in _resource_error(lab, f"walltime = {_toml(value)}")


def test_the_limits_themselves_are_accepted(lab: Path) -> None:
    path = lab / "big.toml"
    path.write_text(
        RES.format(line='cpus = 4096\ngpus = 64\nmemory = "64T"\nwalltime = "8760:00:00"')
    )
    res = recipes.load_recipe(path).resources
    assert (res.cpus, res.gpus, res.memory_mb, res.walltime) == (4096, 64, 67108864, 31536000)
    assert recipes.parse_memory("00000000000000000002GB", "x") == 2048  # leading zeros are fine


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"cpus": 10**30}, f"cpus {10**30} must be a whole number from 1 to 4096"),
        ({"cpus": 0}, "cpus 0 must be a whole number from 1 to 4096"),
        ({"gpus": 100}, "gpus 100 must be a whole number from 0 to 64"),
        (
            {"memory_mb": float("nan")},
            "memory_mb nan must be a whole number of MB from 1 to 67108864 (64TB)",
        ),
        (
            {"memory_mb": 10**12},
            f"memory_mb {10**12} must be a whole number of MB from 1 to 67108864 (64TB)",
        ),
        (
            {"walltime": -60},
            "walltime -60 must be a whole number of seconds from 1 to 31536000 (a year)",
        ),
        (
            {"walltime": float("inf")},
            "walltime inf must be a whole number of seconds from 1 to 31536000 (a year)",
        ),
    ],
)
def test_render_checks_resources_that_did_not_come_from_a_file(
    lab: Path, change: dict[str, object], error: str
) -> None:
    (lab / "good.toml").write_text(GOOD)
    recipe = recipes.find("good", [lab])
    changed = dataclasses.replace(recipe, resources=dataclasses.replace(recipe.resources, **change))
    for scheduler in recipes.SCHEDULERS:
        with pytest.raises(RecipeError) as err:
            recipes.render_script(changed, scheduler, values={}, **PATHS)
        assert err.value.message == f"recipe good [resources]: {error}"


# -- parameters: a float no tool means is refused ------------------------------------------------


@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "1e999", "-1e400"])
def test_a_float_parameter_refuses_nan_and_inf_from_set(lab: Path, text: str) -> None:
    (lab / "fp.toml").write_text(
        '[parameters.frac]\ntype = "float"\ndefault = 0.5\n'
        '[run]\ncommand = "bet -f {{ params.frac }}"\n'
    )
    recipe = recipes.find("fp", [lab])
    with pytest.raises(RecipeError, match=rf"--set frac: '{text}' is not a finite number"):
        recipe.values({"frac": text})
    assert recipe.values({"frac": "0.25"})["frac"] == 0.25


@pytest.mark.parametrize("default", ["nan", "inf", "-inf"])
def test_a_float_parameter_refuses_a_toml_nan_or_inf_default(lab: Path, default: str) -> None:
    (lab / "fp.toml").write_text(
        f'[parameters.frac]\ntype = "float"\ndefault = {default}\n[run]\ncommand = "bet"\n'
    )
    with pytest.raises(RecipeError, match="default: .* is not a finite number"):
        recipes.find("fp", [lab])


def test_a_huge_whole_number_for_a_float_parameter_is_refused(lab: Path) -> None:
    (lab / "fp.toml").write_text(
        f'[parameters.frac]\ntype = "float"\ndefault = {10**400}\n[run]\ncommand = "bet"\n'
    )
    with pytest.raises(RecipeError, match="is not a float"):
        recipes.find("fp", [lab])
