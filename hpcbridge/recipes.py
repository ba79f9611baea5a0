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
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from importlib import resources as importlib_resources
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

from .errors import RecipeError
from .xnat.model import ScanRef

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


class Raw(str):
    """A string that the command template inserts as it is (the recipe vouches for it)."""


def shell_quote(value: Any) -> str:
    """The one quoting rule for everything rendered into a script body."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, bool):
        value = "true" if value else "false"
    return shlex.quote(str(value))


def parse_memory(text: str | int, where: str) -> int:
    """Memory in MB from ``'2GB'``, ``'512mb'``, ``'1.5g'`` or a number of MB."""
    if isinstance(text, int) and not isinstance(text, bool) and text > 0:
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)b?\s*", str(text), re.IGNORECASE)
    if not match:
        raise RecipeError(f"{where}: memory {text!r} is not a size like '2GB' or '512MB'")
    number, unit = float(match.group(1)), match.group(2).lower()
    mb = number * {"k": 1 / 1024, "": 1, "m": 1, "g": 1024, "t": 1024 * 1024}[unit]
    if mb < 1:
        raise RecipeError(f"{where}: memory {text!r} is less than 1 MB")
    return int(round(mb))


def parse_walltime(text: str, where: str) -> int:
    """Seconds from ``'HH:MM:SS'`` (hours may exceed 24) or ``'MM:SS'``."""
    match = re.fullmatch(r"(?:(\d+):)?([0-5]?\d):([0-5]\d)", str(text).strip())
    if not match:
        raise RecipeError(f"{where}: walltime {text!r} is not HH:MM:SS")
    hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise RecipeError(f"{where}: walltime {text!r} must be longer than zero")
    return total


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
        except ValueError:
            raise RecipeError(f"{where}: {value!r} is not a {self.type}") from None
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
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{where}: not valid TOML: {exc}") from None
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
    command = _command(run, path, where)
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
    )
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
        param = Parameter(
            name, kind, None, str(spec.get("help", "")), tuple(spec.get("choices", ()))
        )
        default = param.convert(spec["default"], f"{at} default")
        params[name] = Parameter(name, kind, default, param.help, param.choices)
    return params


def _resources(table: dict[str, Any], where: str) -> Resources:
    at = f"{where} [resources]"
    _unknown(table, RESOURCE_KEYS, at)
    for key in ("cpus", "gpus"):
        value = table.get(key, 1 if key == "cpus" else 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < (key == "cpus"):
            raise RecipeError(
                f"{at}: {key} must be a whole number" + (" of at least 1" if key == "cpus" else "")
            )
    for key in ("queue", "account"):
        value = table.get(key, "")
        if value and not (isinstance(value, str) and SAFE_DIRECTIVE.match(value)):
            raise RecipeError(f"{at}: {key} {value!r} may only hold letters, digits and '_.@+-'")
    return Resources(
        cpus=table.get("cpus", 1),
        memory_mb=parse_memory(table.get("memory", "2GB"), at),
        walltime=parse_walltime(table.get("walltime", "01:00:00"), at),
        queue=table.get("queue", ""),
        account=table.get("account", ""),
        gpus=table.get("gpus", 0),
    )


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


def _command(run: dict[str, Any], path: Path, where: str) -> str:
    if "command" in run and "command_file" in run:
        raise RecipeError(f"{where} [run]: give command or command_file, not both")
    if "command_file" in run:
        file = path.parent / str(run["command_file"])
        try:
            return file.read_text()
        except OSError as exc:
            raise RecipeError(
                f"{where} [run] command_file: cannot read {file}: {exc.strerror}"
            ) from None
    command = run.get("command")
    if not isinstance(command, str) or not command.strip():
        raise RecipeError(f"{where}: [run] command is missing")
    return command


def _check_template(recipe: Recipe, where: str) -> None:
    """Catch unknown variables now, not on the cluster at 3 a.m."""
    env = command_environment()
    try:
        ast = env.parse(recipe.command)
    except jinja2.TemplateSyntaxError as exc:
        raise RecipeError(
            f"{where} [run] command: template error on line {exc.lineno}: {exc.message}"
        ) from None
    unknown = sorted(jinja2.meta.find_undeclared_variables(ast) - COMMAND_VARS)
    if unknown:
        raise RecipeError(
            f"{where} [run] command: unknown variable {unknown[0]!r} (known: "
            f"{', '.join(sorted(COMMAND_VARS))}, and params.NAME)"
        )
    # Check every params.NAME / params['NAME'] in the template, not only those the sample render
    # reaches: a typo inside {% if params.robust %} (false by default) would otherwise pass here
    # and fail at render time with `--set robust=true`, as jinja's "'dict object' has no attribute".
    for node in ast.find_all((jinja2.nodes.Getattr, jinja2.nodes.Getitem)):
        target = getattr(node, "node", None)
        if not (isinstance(target, jinja2.nodes.Name) and target.name == "params"):
            continue
        if isinstance(node, jinja2.nodes.Getattr):
            if hasattr(dict, node.attr):  # params.items() and friends are the dict's own
                continue
            key: Any = node.attr
        elif isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Const):
            key = node.arg.value
        else:
            continue
        if key not in recipe.parameters:
            raise RecipeError(
                f"{where} [run] command: unknown parameter params.{key} "
                f"(parameters: {', '.join(recipe.parameters) or 'none'})"
            )
    try:
        render_command(recipe, recipe.values(), sample_context())
    except jinja2.UndefinedError as exc:
        raise RecipeError(f"{where} [run] command: {exc.message}") from None


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


def discover(extra: list[Path] | None = None, home: Path | None = None) -> dict[str, Recipe]:
    """Every recipe by name; the first found of a name wins (labs override built-ins)."""
    recipes: dict[str, Recipe] = {}
    for folder, origin in search_path(extra, home):
        for file in _files_in(folder):
            recipe = load_recipe(file, origin)
            recipes.setdefault(recipe.name, recipe)
    return recipes


def find(name: str, extra: list[Path] | None = None, home: Path | None = None) -> Recipe:
    """One recipe by name, or by path to its file."""
    if name.endswith(".toml") or "/" in name:
        return load_recipe(Path(name), str(Path(name).parent))
    recipes = discover(extra, home)
    if name not in recipes:
        raise RecipeError(
            f"no recipe named {name!r}",
            hint=f"known: {', '.join(sorted(recipes)) or 'none'}; see `hpcbridge recipes list`",
        )
    return recipes[name]


# -- rendering -------------------------------------------------------------------------------
def command_environment() -> jinja2.Environment:
    env = jinja2.Environment(
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


def render_command(recipe: Recipe, values: dict[str, Any], context: dict[str, Any]) -> str:
    env = command_environment()
    res = recipe.resources
    variables = dict(
        context,
        params=values,
        cpus=res.cpus,
        memory_mb=res.memory_mb,
        walltime=format_walltime(res.walltime),
        gpus=res.gpus,
    )
    return env.from_string(recipe.command).render(**variables)


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
    setup = jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(recipe.setup)
    raw_job = {k: Raw(str(v)) if isinstance(v, str) else v for k, v in job.__dict__.items()}
    template = scheduler_environment().get_template(f"{scheduler}.sh.j2")
    return template.render(
        job=raw_job,
        command=Raw(command),
        setup=Raw(setup.render()),
        modules=recipe.modules,
        recipe_name=recipe.name,
        **context,
    )
