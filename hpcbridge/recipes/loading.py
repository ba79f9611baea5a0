"""Reading recipe files: one, validated key by key with its command template checked without
being rendered; or every one on the search path, by name (the first of a name wins, so a lab
may override a built-in). A file or folder another user could have written is refused, and one
broken recipe is reported (``Catalog.broken``) without hiding the others.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

from ..errors import RecipeError, Step
from .model import PARAM_TYPES, Output, Parameter, Recipe, one_line, read_resources, unknown_keys
from .render import builtin_dir, check_render, check_template

log = logging.getLogger(__name__)

TOP_KEYS = set(
    "name description version parameters resources environment inputs outputs run".split()
)
PARAM_KEYS = {"type", "default", "help", "choices"}
ENV_KEYS = {"modules", "setup"}
INPUT_KEYS = {"resource", "scan_types"}
OUTPUT_KEYS = {"glob", "resource", "format", "content"}
RUN_KEYS = {"command", "command_file"}
NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


def _table(
    data: dict[str, Any], key: str, where: str, known: set[str] | None = None
) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise RecipeError(f"{where}: [{key}] must be a table")
    if known is not None:
        unknown_keys(value, known, f"{where} [{key}]")
    return value


def load_recipe(path: Path, origin: str = "") -> Recipe:
    """Read and validate one recipe file; errors name the file and the field."""
    path = Path(path)
    where = str(path)
    data = _read_toml(path, where)
    unknown_keys(data, TOP_KEYS, where)
    name = data.get("name") or (path.parent.name if path.name == "recipe.toml" else path.stem)
    if not isinstance(name, str) or not NAME.match(name):
        raise RecipeError(
            f"{where}: name {name!r} must be a letter then letters, digits, '_' or '-'"
        )
    params = _parameters(_table(data, "parameters", where), where)
    run = _table(data, "run", where, RUN_KEYS)
    command, command_field = _command(run, path, where)
    env = _table(data, "environment", where, ENV_KEYS)
    inputs = _table(data, "inputs", where, INPUT_KEYS)
    recipe = Recipe(
        name=name,
        description=str(data.get("description", "")),
        source=path,
        origin=origin or str(path.parent),
        command=command,
        parameters=params,
        resources=read_resources(_table(data, "resources", where), where),
        modules=tuple(_strings(env.get("modules", []), f"{where} [environment] modules")),
        setup=str(env.get("setup", "")),
        input_resource=str(inputs.get("resource", "DICOM")),
        scan_types=tuple(_strings(inputs.get("scan_types", ["*"]), f"{where} [inputs] scan_types")),
        outputs=_outputs(data.get("outputs", []), where),
        version=str(data.get("version", "")),
        command_field=command_field,
    )
    # Only parsed, never rendered: loading (and so discovering) a recipe runs none of it.
    check_template(recipe, where)
    return recipe


def _read_toml(path: Path, where: str) -> dict[str, Any]:
    problem = _file_problem(path)
    if problem:
        raise RecipeError(problem)
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{where}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{where}: not valid TOML: not UTF-8 text") from None
    except RecursionError:  # tomllib recurses into nested arrays and tables
        raise RecipeError(f"{where}: not valid TOML: nested too deeply") from None
    except OSError as exc:
        raise RecipeError(f"{where}: cannot read: {exc.strerror}") from None


def _strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RecipeError(f"{where}: must be a list of strings")
    return value


def _parameters(table: dict[str, Any], where: str) -> dict[str, Parameter]:
    params = {}
    for name, spec in table.items():
        at = f"{where} [parameters.{name}]"
        if not isinstance(spec, dict):
            raise RecipeError(f"{at}: must be a table with type, default and help")
        unknown_keys(spec, PARAM_KEYS, at)
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise RecipeError(f"{at}: parameter names are letters, digits and '_'")
        kind = spec.get("type", "str")
        if kind not in PARAM_TYPES:
            raise RecipeError(f"{at}: type {kind!r} is not one of {', '.join(PARAM_TYPES)}")
        if "default" not in spec:
            raise RecipeError(f"{at}: a default is needed")
        if not isinstance(spec.get("choices", []), list):
            raise RecipeError(f"{at}: choices must be a list")
        param = Parameter(
            name, kind, None, str(spec.get("help", "")), tuple(spec.get("choices", ()))
        )
        default = param.convert(spec["default"], f"{at} default")
        params[name] = Parameter(name, kind, default, param.help, param.choices)
    return params


def _outputs(items: Any, where: str) -> tuple[Output, ...]:
    if not isinstance(items, list):
        raise RecipeError(f"{where}: [[outputs]] must be an array of tables")
    outs = []
    for i, item in enumerate(items):
        at = f"{where} [[outputs]] #{i + 1}"
        if not isinstance(item, dict):
            raise RecipeError(f"{at}: must be a table")
        unknown_keys(item, OUTPUT_KEYS, at)
        if "glob" not in item or "resource" not in item:
            raise RecipeError(f"{at}: glob and resource are needed")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", str(item["resource"])):
            raise RecipeError(
                f"{at}: resource {item['resource']!r} must be letters, digits, '_' or '-'"
            )
        outs.append(Output(**{key: str(value) for key, value in item.items()}))
    return tuple(outs)


def _command(run: dict[str, Any], path: Path, where: str) -> tuple[str, str]:
    """The command template and how errors name it."""
    if "command" in run and "command_file" in run:
        raise RecipeError(f"{where} [run]: give command or command_file, not both")
    if "command_file" in run:
        file = path.parent / str(run["command_file"])
        problem = _file_problem(file)
        if problem:
            raise RecipeError(f"{where} [run] command_file: {problem}")
        try:
            return file.read_text(), f"[run] command_file {run['command_file']}"
        except OSError as exc:
            raise RecipeError(
                f"{where} [run] command_file: cannot read {file}: {exc.strerror}"
            ) from None
        except ValueError as exc:  # not UTF-8, or a NUL in the name
            raise RecipeError(
                f"{where} [run] command_file: cannot read {str(file)!r}: {one_line(str(exc))}"
            ) from None
    command = run.get("command")
    if not isinstance(command, str) or not command.strip():
        raise RecipeError(f"{where}: [run] command is missing")
    return command, "[run] command"


def _open_to_all(path: Path, *, sticky_ok: bool = False) -> int | None:
    """The mode of ``path`` when every user may write it (else None); ``sticky_ok`` spares a
    sticky folder such as /tmp, where nobody may rename or delete another user's entries."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except (OSError, ValueError):  # ValueError: a NUL in a command_file name
        return None
    if mode & stat.S_IWOTH and not (sticky_ok and mode & stat.S_ISVTX):
        return mode
    return None


def _real(path: Path) -> Path:
    """``path`` with its links resolved, as far as they resolve."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a link loop, before Python 3.13
        return Path(os.path.abspath(path))


def _folder_problem(folder: Path) -> str | None:
    """Why the recipes of ``folder`` cannot be trusted, as OpenSSH's StrictModes would say it:
    any user who may write the folder, or replace it through a parent, writes the recipes."""
    if not folder.name:  # "." (a recipe named by a bare file name) says nothing in a message
        folder = Path(os.path.abspath(folder))
    mode = _open_to_all(folder)
    if mode is not None:
        return (
            f"{folder} is writable by every user (mode {mode:04o}); refusing its recipes "
            f"(run `chmod o-w {shlex.quote(str(folder))}`)"
        )
    absolute = Path(os.path.abspath(folder))
    parents = dict.fromkeys([*absolute.parents, *_real(absolute).parents])
    for parent in parents:
        mode = _open_to_all(parent, sticky_ok=True)
        if mode is not None:
            return (
                f"{parent} is writable by every user (mode {mode:04o}), so anyone may replace "
                f"{folder}; refusing its recipes (run `chmod o-w {shlex.quote(str(parent))}`)"
            )
    return None


def _file_problem(file: Path) -> str | None:
    """Why a recipe's file (the TOML or its command_file) cannot be trusted, or None."""
    mode = _open_to_all(file)
    if mode is not None:
        return (
            f"{file} is writable by every user (mode {mode:04o}); refusing it "
            f"(run `chmod o-w {shlex.quote(str(file))}`)"
        )
    problem = _folder_problem(file.parent)
    if problem is None and file.is_symlink():
        problem = _folder_problem(_real(file).parent)
    return problem


def _name_of(file: Path, readable: bool) -> str:
    """The name a recipe file claims: its ``name`` key where it can be read, else its path's."""
    if readable:
        try:
            name = tomllib.loads(file.read_text()).get("name")
        except (OSError, ValueError, RecursionError):  # ValueError: TOML and UTF-8 errors
            name = None
        if isinstance(name, str) and NAME.match(name):
            return name
    return file.parent.name if file.name == "recipe.toml" else file.stem


def search_path(
    extra: list[Path] | None = None, home: Path | None = None
) -> list[tuple[Path, str]]:
    """(folder, origin) in the order they are searched: ``--recipes`` folders, then
    ``$HPCBRIDGE_RECIPES`` (``:``-separated), ``$HPCBRIDGE_HOME/recipes``, the built-ins."""
    out: list[tuple[Path, str]] = [(Path(p), str(p)) for p in extra or []]
    env = os.environ.get("HPCBRIDGE_RECIPES", "")
    out += [(Path(p), p) for p in env.split(os.pathsep) if p]
    if home is not None:
        out.append((Path(home) / "recipes", str(Path(home) / "recipes")))
    out.append((builtin_dir(), "built-in"))
    return out


def _files_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(folder.glob("*.toml")) + sorted(folder.glob("*/recipe.toml"))


@dataclass(frozen=True)
class BrokenRecipe:
    """A recipe file, or a whole folder, that could not be used, and why (one line)."""

    path: Path
    origin: str
    error: str
    name: str = ""  # the recipe name it holds; "" for a refused folder


class Catalog(dict[str, Recipe]):
    """The usable recipes by name, plus what could not be used (``broken``).

    A broken file still holds its name: a lab's broken ``dcm2niix.toml`` makes ``dcm2niix``
    an error (``blocked``), never a silent fall-back to the built-in the lab meant to replace.
    """

    def __init__(self) -> None:
        super().__init__()
        self.broken: list[BrokenRecipe] = []
        self.blocked: dict[str, BrokenRecipe] = {}

    def _claim(self, name: str, item: Recipe | BrokenRecipe) -> None:
        if name in self or name in self.blocked:
            return
        if isinstance(item, Recipe):
            self[name] = item
        else:
            self.blocked[name] = item


def discover(extra: list[Path] | None = None, home: Path | None = None) -> Catalog:
    """Every recipe by name; the first found of a name wins (labs override built-ins).

    Never raises for a bad recipe or folder: it goes to ``broken`` (and holds its name in
    ``blocked``) and the others stay usable. Templates are parsed here, never rendered.
    """
    catalog = Catalog()
    for folder, origin in search_path(extra, home):
        files = _files_in(folder)
        refused = _folder_problem(folder) if files else None
        if refused:
            whole = BrokenRecipe(folder, origin, refused)
            catalog.broken.append(whole)
            for file in files:  # names from paths only: nothing in the folder is read
                catalog._claim(_name_of(file, readable=False), whole)
            continue
        for file in files:
            try:
                recipe = load_recipe(file, origin)
            except Exception as exc:  # one lab's file must never stop every lookup
                error = (
                    str(exc)
                    if isinstance(exc, RecipeError)
                    else f"{file}: cannot be loaded: {type(exc).__name__}: {one_line(str(exc))}"
                )
                trusted = _file_problem(file) is None
                broken = BrokenRecipe(file, origin, error, _name_of(file, trusted))
                catalog.broken.append(broken)
                catalog._claim(broken.name, broken)
            else:
                catalog._claim(recipe.name, recipe)
    return catalog


# Broken recipes already reported by this process: `run` looks its recipe up more than once.
_reported: set[tuple[str, str]] = set()


def _report_broken(broken: list[BrokenRecipe]) -> None:
    """One warning line (through logging: the CLI shows it on stderr) for new broken recipes."""
    new = [b for b in broken if (str(b.path), b.error) not in _reported]
    _reported.update((str(b.path), b.error) for b in new)
    if len(new) == 1:
        log.warning("skipped a broken recipe: %s", new[0].error)
    elif new:
        paths = ", ".join(str(b.path) for b in new)
        # The command line adds the step's words (cli/output.py).
        log.warning(
            "skipped %d broken recipes (%s)", len(new), paths, extra={"step": Step.RECIPES_WHY}
        )


def find(name: str, extra: list[Path] | None = None, home: Path | None = None) -> Recipe:
    """One recipe by name, or by path to its file, checked by a (sandboxed) sample render.

    Only this recipe is rendered. A broken recipe of this name is the error; once this one is
    found good, broken recipes of other names are logged as one warning (a failed lookup says
    only why it failed, in one line).
    """
    if name.endswith(".toml") or "/" in name:
        recipe = load_recipe(Path(name), str(Path(name).parent))
        check_render(recipe)
        return recipe
    recipes = discover(extra, home)
    if name in recipes.blocked:
        raise RecipeError(recipes.blocked[name].error)
    if name not in recipes:
        raise RecipeError(
            f"no recipe named {name!r}",
            hint=f"known: {', '.join(sorted(recipes)) or 'none'}",
            step=Step.LIST_RECIPES,
        )
    recipe = recipes[name]
    check_render(recipe)
    _report_broken(recipes.broken)
    return recipe
