"""Recipes: a lab's conversion steps as small TOML files, validated and rendered into job scripts.

A recipe is ``NAME.toml`` or a folder ``NAME/recipe.toml`` (with the command beside it in
``command.sh.j2`` if the lab prefers). docs/recipes.md describes every key. Recipes are found in
``--recipes`` folders, then ``$HPCBRIDGE_RECIPES`` (``:``-separated), then
``$HPCBRIDGE_HOME/recipes``, then the built-ins shipped in ``hpcbridge.templates/recipes``; the
first of a name wins, so a lab may override a built-in.

Rendering is Jinja with ``StrictUndefined``. Every ``{{ value }}`` in a command is shell-quoted
on the way out (one ``finalize`` hook, so no template can forget it); ``{{ x | raw }}`` opts out
for values the recipe itself controls. Values that go into scheduler directive lines are
validated instead of quoted: a label with a space, a quote, ``$(...)``, a backtick or a newline
can never change what the script does.

A recipe is data from a shared folder, not code: every template renders in Jinja's immutable
sandbox (no attribute walks into Python's internals), discovery only parses templates (it never
renders one), a recipe folder or file that every user may write is refused, and resources are
bounded. One broken recipe is reported (``Catalog.broken``) and never hides the others.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shlex
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources as importlib_resources
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
import jinja2.nodes
import jinja2.sandbox
from jinja2.exceptions import SecurityError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

from .errors import RecipeError
from .xnat.model import ScanRef

log = logging.getLogger(__name__)

SCHEDULERS = ("pbs", "torque", "slurm", "local")
PARAM_TYPES = {"str": str, "int": int, "float": float, "bool": bool}
TOP_KEYS = {
    "name",
    "description",
    "version",
    "parameters",
    "resources",
    "environment",
    "inputs",
    "outputs",
    "run",
}
RESOURCE_KEYS = {"cpus", "memory", "walltime", "queue", "account", "gpus"}
PARAM_KEYS = {"type", "default", "help", "choices"}
ENV_KEYS = {"modules", "setup"}
INPUT_KEYS = {"resource", "scan_types"}
OUTPUT_KEYS = {"glob", "resource", "format", "content"}
RUN_KEYS = {"command", "command_file"}
# What a command template may use, besides the recipe's own parameters under ``params``.
COMMAND_VARS = {
    "params",
    "input_dir",
    "output_dir",
    "work_dir",
    "scan",
    "cpus",
    "memory_mb",
    "walltime",
    "gpus",
}
SAFE_DIRECTIVE = re.compile(r"^[A-Za-z0-9_.@+-]+$")
SAFE_PATH = re.compile(r"^/[A-Za-z0-9_./+@-]*$")
NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
SCAN_KEYS = ("project", "subject", "experiment", "id", "type", "series_description")

# Bounds on what a recipe may ask of a scheduler (docs/recipes.md). Generous, since one node of
# the largest machines has a few hundred cores and tens of TB; a value beyond them is a typo or
# an attack, and would only come back as a scheduler's rejection long after the recipe loaded.
MAX_CPUS = 4096
MAX_GPUS = 64
MAX_MEMORY_MB = 64 * 1024 * 1024  # 64 TB
MAX_WALLTIME = 365 * 24 * 3600  # one year, in seconds
_MEMORY_UNITS = {"k": 1 / 1024, "": 1, "m": 1, "g": 1024, "t": 1024 * 1024}


class Raw(str):
    """A string that the command template inserts as it is (the recipe vouches for it)."""


def shell_quote(value: Any) -> str:
    """The one quoting rule for everything rendered into a script body."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, bool):
        value = "true" if value else "false"
    return shlex.quote(str(value))


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_memory(text: str | int, where: str) -> int:
    """Memory in MB from ``'2GB'``, ``'512mb'``, ``'1.5g'`` or a number of MB."""
    limit = f"{where}: memory {text!r} is more than any node has (at most 64TB)"
    if isinstance(text, int) and not isinstance(text, bool) and text > 0:
        if text > MAX_MEMORY_MB:
            raise RecipeError(limit)
        return text
    # ASCII digits only: ``\d`` would also take other scripts' digits, which float() accepts.
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)b?\s*", str(text), re.IGNORECASE)
    if not match:
        raise RecipeError(f"{where}: memory {text!r} is not a size like '2GB' or '512MB'")
    if len(match.group(1).split(".")[0].lstrip("0")) > 12:  # float() of more digits may be inf
        raise RecipeError(limit)
    number, unit = float(match.group(1)), match.group(2).lower()
    mb = number * _MEMORY_UNITS[unit]
    if not math.isfinite(mb) or mb > MAX_MEMORY_MB:
        raise RecipeError(limit)
    if mb < 1:
        raise RecipeError(f"{where}: memory {text!r} is less than 1 MB")
    return int(round(mb))


def parse_walltime(text: str, where: str) -> int:
    """Seconds from ``'HH:MM:SS'`` (hours may exceed 24) or ``'MM:SS'``."""
    match = re.fullmatch(r"(?:([0-9]+):)?([0-5]?[0-9]):([0-5][0-9])", str(text).strip())
    if not match:
        raise RecipeError(f"{where}: walltime {text!r} is not HH:MM:SS")
    limit = f"{where}: walltime {text!r} is longer than a year (at most 8760:00:00)"
    if match.group(1) and len(match.group(1).lstrip("0")) > 6:  # int() of it could be huge
        raise RecipeError(limit)
    hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise RecipeError(f"{where}: walltime {text!r} must be longer than zero")
    if total > MAX_WALLTIME:
        raise RecipeError(limit)
    return total


def check_resources(res: Resources, where: str) -> None:
    """Refuse requests no scheduler could accept, whoever built ``res`` (a file, an override)."""
    if not (_whole(res.cpus) and 1 <= res.cpus <= MAX_CPUS):
        raise RecipeError(f"{where}: cpus {res.cpus!r} must be a whole number from 1 to {MAX_CPUS}")
    if not (_whole(res.gpus) and 0 <= res.gpus <= MAX_GPUS):
        raise RecipeError(f"{where}: gpus {res.gpus!r} must be a whole number from 0 to {MAX_GPUS}")
    if not (_whole(res.memory_mb) and 1 <= res.memory_mb <= MAX_MEMORY_MB):
        raise RecipeError(
            f"{where}: memory_mb {res.memory_mb!r} must be a whole number of MB from 1 to "
            f"{MAX_MEMORY_MB} (64TB)"
        )
    if not (_whole(res.walltime) and 1 <= res.walltime <= MAX_WALLTIME):
        raise RecipeError(
            f"{where}: walltime {res.walltime!r} must be a whole number of seconds from 1 to "
            f"{MAX_WALLTIME} (a year)"
        )


def format_walltime(seconds: int) -> str:
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


@dataclass(frozen=True)
class Parameter:
    name: str
    type: str
    default: Any
    help: str = ""
    choices: tuple[Any, ...] = ()

    def convert(self, value: Any, where: str) -> Any:
        """A value of this parameter's type, from TOML or from ``--set k=v`` text."""
        kind = PARAM_TYPES[self.type]
        try:
            if isinstance(value, str) and kind is bool:
                if value.lower() not in ("true", "false", "yes", "no", "1", "0"):
                    raise ValueError(value)
                out: Any = value.lower() in ("true", "yes", "1")
            elif isinstance(value, str) and kind is not str:
                out = kind(value)
            elif kind is float and isinstance(value, int) and not isinstance(value, bool):
                out = float(value)
            elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ValueError(value)
            else:
                out = value
        except (ValueError, OverflowError):
            raise RecipeError(f"{where}: {value!r} is not a {self.type}") from None
        if kind is float and not math.isfinite(out):
            # nan and inf parse as floats (TOML has them too) but no tool means them
            raise RecipeError(f"{where}: {value!r} is not a finite number")
        if self.choices and out not in self.choices:
            raise RecipeError(
                f"{where}: {value!r} is not one of {', '.join(map(str, self.choices))}"
            )
        return out


@dataclass(frozen=True)
class Resources:
    cpus: int = 1
    memory_mb: int = 2048
    walltime: int = 3600
    queue: str = ""
    account: str = ""
    gpus: int = 0


@dataclass(frozen=True)
class Output:
    glob: str
    resource: str
    format: str = ""
    content: str = ""


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    source: Path
    origin: str  # "built-in", or the folder it was found in
    command: str
    parameters: dict[str, Parameter] = field(default_factory=dict)
    resources: Resources = Resources()
    modules: tuple[str, ...] = ()
    setup: str = ""
    input_resource: str = "DICOM"
    scan_types: tuple[str, ...] = ("*",)
    outputs: tuple[Output, ...] = ()
    version: str = ""
    # How errors name the command: "[run] command", or "[run] command_file NAME" for a file.
    command_field: str = "[run] command"

    def values(self, overrides: dict[str, str] | None = None) -> dict[str, Any]:
        """Parameter values: defaults, then ``--set`` overrides (checked against their types)."""
        out = {name: p.default for name, p in self.parameters.items()}
        for key, text in (overrides or {}).items():
            if key not in self.parameters:
                known = ", ".join(self.parameters) or "none"
                raise RecipeError(
                    f"recipe {self.name} has no parameter {key!r} (parameters: {known})"
                )
            out[key] = self.parameters[key].convert(text, f"--set {key}")
        return out


# -- loading and validation ------------------------------------------------------------------
def _unknown(table: dict[str, Any], known: set[str], where: str) -> None:
    extra = sorted(set(table) - known)
    if extra:
        raise RecipeError(f"{where}: unknown key {extra[0]!r} (known: {', '.join(sorted(known))})")


def _table(data: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise RecipeError(f"{where}: [{key}] must be a table")
    return value


def load_recipe(path: Path, origin: str = "") -> Recipe:
    """Read and validate one recipe file; errors name the file and the field."""
    path = Path(path)
    where = str(path)
    problem = _file_problem(path)
    if problem:
        raise RecipeError(problem)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{where}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{where}: not valid TOML: not UTF-8 text") from None
    except RecursionError:  # tomllib recurses into nested arrays and tables
        raise RecipeError(f"{where}: not valid TOML: nested too deeply") from None
    except OSError as exc:
        raise RecipeError(f"{where}: cannot read: {exc.strerror}") from None
    _unknown(data, TOP_KEYS, where)
    name = data.get("name") or (path.parent.name if path.name == "recipe.toml" else path.stem)
    if not isinstance(name, str) or not NAME.match(name):
        raise RecipeError(
            f"{where}: name {name!r} must be a letter then letters, digits, '_' or '-'"
        )
    params = _parameters(_table(data, "parameters", where), where)
    run = _table(data, "run", where)
    _unknown(run, RUN_KEYS, f"{where} [run]")
    command, command_field = _command(run, path, where)
    env = _table(data, "environment", where)
    _unknown(env, ENV_KEYS, f"{where} [environment]")
    inputs = _table(data, "inputs", where)
    _unknown(inputs, INPUT_KEYS, f"{where} [inputs]")
    recipe = Recipe(
        name=name,
        description=str(data.get("description", "")),
        source=path,
        origin=origin or str(path.parent),
        command=command,
        parameters=params,
        resources=_resources(_table(data, "resources", where), where),
        modules=tuple(_strings(env.get("modules", []), f"{where} [environment] modules")),
        setup=str(env.get("setup", "")),
        input_resource=str(inputs.get("resource", "DICOM")),
        scan_types=tuple(_strings(inputs.get("scan_types", ["*"]), f"{where} [inputs] scan_types")),
        outputs=_outputs(data.get("outputs", []), where),
        version=str(data.get("version", "")),
        command_field=command_field,
    )
    # Only parsed, never rendered: loading (and so discovering) a recipe runs none of it.
    _check_template(recipe, where)
    return recipe


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
        _unknown(spec, PARAM_KEYS, at)
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


def _resources(table: dict[str, Any], where: str) -> Resources:
    at = f"{where} [resources]"
    _unknown(table, RESOURCE_KEYS, at)
    for key in ("queue", "account"):
        value = table.get(key, "")
        if value and not (isinstance(value, str) and SAFE_DIRECTIVE.match(value)):
            raise RecipeError(f"{at}: {key} {value!r} may only hold letters, digits and '_.@+-'")
    res = Resources(
        cpus=table.get("cpus", 1),
        memory_mb=parse_memory(table.get("memory", "2GB"), at),
        walltime=parse_walltime(table.get("walltime", "01:00:00"), at),
        queue=table.get("queue", ""),
        account=table.get("account", ""),
        gpus=table.get("gpus", 0),
    )
    check_resources(res, at)
    return res


def _outputs(items: Any, where: str) -> tuple[Output, ...]:
    if not isinstance(items, list):
        raise RecipeError(f"{where}: [[outputs]] must be an array of tables")
    outs = []
    for i, item in enumerate(items):
        at = f"{where} [[outputs]] #{i + 1}"
        if not isinstance(item, dict):
            raise RecipeError(f"{at}: must be a table")
        _unknown(item, OUTPUT_KEYS, at)
        if "glob" not in item or "resource" not in item:
            raise RecipeError(f"{at}: glob and resource are needed")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", str(item["resource"])):
            raise RecipeError(
                f"{at}: resource {item['resource']!r} must be letters, digits, '_' or '-'"
            )
        outs.append(
            Output(
                str(item["glob"]),
                str(item["resource"]),
                str(item.get("format", "")),
                str(item.get("content", "")),
            )
        )
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
                f"{where} [run] command_file: cannot read {str(file)!r}: {_one_line(str(exc))}"
            ) from None
    command = run.get("command")
    if not isinstance(command, str) or not command.strip():
        raise RecipeError(f"{where}: [run] command is missing")
    return command, "[run] command"


# Attributes the sandbox refuses, named here too so that discovery reports a recipe that tries
# them as broken before anyone picks it. The sandbox stays the guard: a name known only at
# render time (``attr(params.name)``) is only caught there.
_UNSAFE_ATTRIBUTES = frozenset(
    {"mro"}
    | jinja2.sandbox.UNSAFE_FUNCTION_ATTRIBUTES
    | jinja2.sandbox.UNSAFE_METHOD_ATTRIBUTES
    | jinja2.sandbox.UNSAFE_GENERATOR_ATTRIBUTES
    | jinja2.sandbox.UNSAFE_COROUTINE_ATTRIBUTES
    | jinja2.sandbox.UNSAFE_ASYNC_GENERATOR_ATTRIBUTES
)
# A replacement field of str.format that walks into an attribute or item named with '_'.
_UNSAFE_FORMAT = re.compile(r"\{[^{}]*?[.\[]\s*(_\w*)")
_NOT_CODE = "a recipe may use its variables, filters and tests, not Python's internals"


def _unsafe_name(name: Any) -> bool:
    return isinstance(name, str) and (name.startswith("_") or name in _UNSAFE_ATTRIBUTES)


def _in_reading_order(node: jinja2.nodes.Node) -> Iterator[jinja2.nodes.Node]:
    """Children before their parent: ``a.b.c`` gives ``a.b`` before ``(a.b).c``."""
    for child in node.iter_child_nodes():
        yield from _in_reading_order(child)
    yield node


def _unsafe_reach(ast: jinja2.nodes.Template) -> tuple[str, int] | None:
    """The first attribute the template names that the sandbox would refuse, and its line."""
    for node in _in_reading_order(ast):
        name: Any = None
        if isinstance(node, jinja2.nodes.Getattr):
            name = node.attr
        elif isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Const):
            name = node.arg.value
        elif isinstance(node, jinja2.nodes.Filter) and node.name == "attr" and node.args:
            if isinstance(node.args[0], jinja2.nodes.Const):
                name = node.args[0].value
        elif (
            isinstance(node, jinja2.nodes.Call)
            and isinstance(node.node, jinja2.nodes.Getattr)
            and node.node.attr in ("format", "format_map")
            and isinstance(node.node.node, jinja2.nodes.Const)
            and isinstance(node.node.node.value, str)
        ):
            field = _UNSAFE_FORMAT.search(node.node.node.value)
            name = field.group(1) if field else None
        if _unsafe_name(name):
            return name, node.lineno
    return None


def _parse(text: str, where: str) -> jinja2.nodes.Template:
    """The template's syntax tree, after the checks that need no rendering."""
    env = command_environment()
    try:
        ast = env.parse(text)
        # Compiling finds unknown filters and tests; it generates code but runs none of it.
        env.compile(ast)
        unsafe = _unsafe_reach(ast)
    except jinja2.TemplateSyntaxError as exc:
        raise RecipeError(
            f"{where}: template error on line {exc.lineno}: {_one_line(exc.message or '')}"
        ) from None
    except RecursionError:  # parsing, compiling and the walk above recurse into nesting
        raise RecipeError(f"{where}: template error: nested too deeply") from None
    if unsafe:
        raise RecipeError(
            f"{where}: template tries to reach an unsafe attribute {unsafe[0]!r} on line "
            f"{unsafe[1]} ({_NOT_CODE})"
        )
    return ast


def _check_template(recipe: Recipe, where: str) -> None:
    """Catch unknown variables now, not on the cluster at 3 a.m., without rendering anything."""
    at = f"{where} {recipe.command_field}"
    ast = _parse(recipe.command, at)
    unknown = sorted(jinja2.meta.find_undeclared_variables(ast) - COMMAND_VARS)
    if unknown:
        raise RecipeError(
            f"{at}: unknown variable {unknown[0]!r} (known: "
            f"{', '.join(sorted(COMMAND_VARS))}, and params.NAME)"
        )
    # Check every params.NAME / params['NAME'] in the template, not only those a sample render
    # would reach: a typo inside {% if params.robust %} (false by default) would otherwise pass
    # here and fail at render time with `--set robust=true`, as jinja's "'dict object' has no
    # attribute". The same for scan.NAME.
    for node in ast.find_all((jinja2.nodes.Getattr, jinja2.nodes.Getitem)):
        target = getattr(node, "node", None)
        if not (isinstance(target, jinja2.nodes.Name) and target.name in ("params", "scan")):
            continue
        if isinstance(node, jinja2.nodes.Getattr):
            if hasattr(dict, node.attr):  # params.items() and friends are the dict's own
                continue
            key: Any = node.attr
        elif isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Const):
            key = node.arg.value
        else:
            continue
        if target.name == "scan" and key not in SCAN_KEYS:
            raise RecipeError(f"{at}: unknown variable scan.{key} (known: {', '.join(SCAN_KEYS)})")
        if target.name == "params" and key not in recipe.parameters:
            raise RecipeError(
                f"{at}: unknown parameter params.{key} "
                f"(parameters: {', '.join(recipe.parameters) or 'none'})"
            )
    setup = f"{where} [environment] setup"
    unknown = sorted(jinja2.meta.find_undeclared_variables(_parse(recipe.setup, setup)))
    if unknown:
        raise RecipeError(
            f"{setup}: unknown variable {unknown[0]!r} (setup is the recipe's own shell text; "
            "it has no variables)"
        )


def check_render(recipe: Recipe) -> None:
    """Render the recipe (sandboxed) with its defaults and stand-in paths: the errors only a
    render finds (a type error, a value the sandbox refuses) show before a job is planned."""
    render_command(recipe, recipe.values(), sample_context())
    render_setup(recipe)


# -- discovery -------------------------------------------------------------------------------
def builtin_dir() -> Path:
    """The built-in recipes shipped in the wheel (hpcbridge.templates/recipes)."""
    try:
        base = Path(str(importlib_resources.files("hpcbridge.templates")))
    except ModuleNotFoundError:  # a source checkout without an install
        base = Path(__file__).resolve().parent.parent / "templates"
    return base / "recipes"


def search_path(
    extra: list[Path] | None = None, home: Path | None = None
) -> list[tuple[Path, str]]:
    """(folder, origin) in the order they are searched."""
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
    found = sorted(folder.glob("*.toml")) + sorted(folder.glob("*/recipe.toml"))
    return found


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
                    else f"{file}: cannot be loaded: {type(exc).__name__}: {_one_line(str(exc))}"
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
        log.warning(
            "skipped %d broken recipes (%s); `hpcbridge recipes list` shows why", len(new), paths
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
            hint=f"known: {', '.join(sorted(recipes)) or 'none'}; see `hpcbridge recipes list`",
        )
    recipe = recipes[name]
    check_render(recipe)
    _report_broken(recipes.broken)
    return recipe


# -- rendering -------------------------------------------------------------------------------
# Values a template may build with `*` and `**` (characters, items, bits): far beyond any job
# script, and far below what would exhaust the memory of a shared login node.
_MAX_BUILT = 1_000_000


class _Sandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox: no attribute walks into Python's internals, no calls that
    change a value; plus a bound on the size of what ``*`` and ``**`` build."""

    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        # Jinja returns an undefined that fails only when used; a chain such as
        # attr(a)|attr(b) then fails on b as "no attribute", hiding the refusal. Fail at once.
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and _whole(times):
                    if len(seq) * times > _MAX_BUILT:
                        raise SecurityError(f"it builds a value of more than {_MAX_BUILT} items")
        elif _whole(left) and _whole(right) and abs(left) > 1:
            if right * max(left.bit_length(), 1) > _MAX_BUILT:
                raise SecurityError(f"it builds a number of more than {_MAX_BUILT} bits")
        return super().call_binop(context, operator, left, right)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _render(env: jinja2.Environment, text: str, where: str, variables: dict[str, Any]) -> str:
    """``text`` rendered in ``env``; whatever goes wrong is one RecipeError naming ``where``."""
    try:
        return env.from_string(text).render(**variables)
    except SecurityError as exc:
        match = re.search(r"attribute '([^']*)'", str(exc))
        what = (
            f"tries to reach an unsafe attribute {match.group(1)!r} ({_NOT_CODE})"
            if match
            else f"refused: {_one_line(str(exc))}"
        )
        raise RecipeError(f"{where}: template {what}; nothing was run") from None
    except jinja2.TemplateSyntaxError as exc:
        raise RecipeError(
            f"{where}: template error on line {exc.lineno}: {_one_line(exc.message or '')}"
        ) from None
    except jinja2.TemplateError as exc:
        raise RecipeError(f"{where}: {_one_line(exc.message or str(exc))}") from None
    except Exception as exc:  # a template is the lab's code: its bug is its error, not ours
        raise RecipeError(
            f"{where}: template failed: {type(exc).__name__}: {_one_line(str(exc))}"
        ) from None


def command_environment() -> jinja2.Environment:
    env = _Sandbox(
        undefined=jinja2.StrictUndefined,
        finalize=shell_quote,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["raw"] = lambda value: Raw(value)
    env.filters["q"] = lambda value: Raw(shell_quote(value))
    return env


def setup_environment() -> jinja2.Environment:
    """``[environment] setup`` is the recipe's own shell text: Jinja's default options (no
    quoting), but sandboxed like every other template a recipe controls."""
    return _Sandbox(undefined=jinja2.StrictUndefined)


def sample_context() -> dict[str, Any]:
    """Stand-in values for validating a template without a real job."""
    return {
        "input_dir": "/work/input",
        "output_dir": "/work/output",
        "work_dir": "/work",
        "scan": {
            "project": "P",
            "subject": "S",
            "experiment": "E",
            "id": "1",
            "type": "T1",
            "series_description": "T1",
        },
    }


def scan_variables(ref: ScanRef) -> dict[str, str]:
    """The ``scan.*`` variables of a job's template (docs/recipes.md), for one scan."""
    return {
        "project": ref.project,
        "subject": ref.subject_label,
        "experiment": ref.experiment_label,
        "id": ref.scan_id,
        "type": ref.type,
        "series_description": ref.series_description,
    }


def uses_scan_variables(recipe: Recipe) -> bool:
    """Whether the recipe's command reads any ``scan.*`` variable."""
    parsed = command_environment().parse(recipe.command)
    return "scan" in jinja2.meta.find_undeclared_variables(parsed)


def render_setup(recipe: Recipe) -> str:
    return _render(setup_environment(), recipe.setup, f"{recipe.source} [environment] setup", {})


def render_command(recipe: Recipe, values: dict[str, Any], context: dict[str, Any]) -> str:
    res = recipe.resources
    variables = dict(
        context,
        params=values,
        cpus=res.cpus,
        memory_mb=res.memory_mb,
        walltime=format_walltime(res.walltime),
        gpus=res.gpus,
    )
    where = f"{recipe.source} {recipe.command_field}"
    return _render(command_environment(), recipe.command, where, variables)


@dataclass(frozen=True)
class JobSpec:
    """Validated values for scheduler directive lines (never quoted, so never trusted raw)."""

    name: str
    cpus: int
    memory_mb: int
    walltime: str
    queue: str
    account: str
    gpus: int
    stdout: str
    stderr: str
    mail: str


def job_name(text: str) -> str:
    """A scheduler-safe job name: letters first, ``[A-Za-z0-9_.-]``, at most 64 characters."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", text).strip("._-") or "job"
    return (name if name[0].isalpha() else "j" + name)[:64]


def _directive(value: str, what: str) -> str:
    if value and not SAFE_DIRECTIVE.match(value):
        raise RecipeError(f"{what} {value!r} may only hold letters, digits and '_.@+-'")
    return value


def _absolute(path: str | Path, what: str) -> str:
    text = str(path)
    if not text.startswith("/") or "\n" in text or "\0" in text:
        raise RecipeError(f"{what} {text!r} must be an absolute path")
    return text


def scheduler_environment() -> jinja2.Environment:
    base = builtin_dir().parent / "schedulers"
    env = command_environment()
    env.loader = jinja2.FileSystemLoader(str(base))
    return env


def render_script(
    recipe: Recipe,
    scheduler: str,
    *,
    values: dict[str, Any],
    input_dir: str,
    output_dir: str,
    work_dir: str,
    name: str | None = None,
    scan: dict[str, str] | None = None,
    queue: str | None = None,
    account: str | None = None,
    mail: str | None = None,
) -> str:
    """The whole job script for ``scheduler``: directives, outcome trap, environment, command."""
    if scheduler not in SCHEDULERS:
        raise RecipeError(f"unknown scheduler {scheduler!r} (one of {', '.join(SCHEDULERS)})")
    work = _absolute(work_dir, "work directory")
    context = {
        "input_dir": _absolute(input_dir, "input directory"),
        "output_dir": _absolute(output_dir, "output directory"),
        "work_dir": work,
        "scan": scan or sample_context()["scan"],
    }
    if scheduler != "local" and not SAFE_PATH.match(work):
        raise RecipeError(
            f"work directory {work!r} cannot appear in a scheduler directive "
            "(letters, digits and '_./+@-' only)"
        )
    if mail and not re.fullmatch(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+", mail):
        raise RecipeError(f"mail address {mail!r} is not valid")
    res = recipe.resources
    # Resources may not come from a file (a Recipe built in code, a replaced value): check them
    # here too, where they become directives.
    check_resources(res, f"recipe {recipe.name} [resources]")
    job = JobSpec(
        name=job_name(name or recipe.name),
        cpus=res.cpus,
        memory_mb=res.memory_mb,
        walltime=format_walltime(res.walltime),
        queue=_directive(queue if queue is not None else res.queue, "queue"),
        account=_directive(account if account is not None else res.account, "account"),
        gpus=res.gpus,
        stdout=f"{work}/.hpcbridge/job.out",
        stderr=f"{work}/.hpcbridge/job.err",
        mail=mail or "",
    )
    command = render_command(recipe, values, context)
    setup = render_setup(recipe)
    raw_job = {k: Raw(str(v)) if isinstance(v, str) else v for k, v in job.__dict__.items()}
    template = scheduler_environment().get_template(f"{scheduler}.sh.j2")
    return template.render(
        job=raw_job,
        command=Raw(command),
        setup=Raw(setup),
        modules=recipe.modules,
        recipe_name=recipe.name,
        **context,
    )
