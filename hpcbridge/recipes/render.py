"""Rendering: Jinja's immutable sandbox, the checks a template gets before it is ever rendered,
and the command, setup and whole job script a recipe renders into.

Every ``{{ value }}`` in a command is shell-quoted on the way out (one ``finalize`` hook, so no
template can forget it); ``{{ x | raw }}`` opts out for values the recipe itself controls.
Values that go into scheduler directive lines are validated instead of quoted.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources as importlib_resources
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
import jinja2.nodes
import jinja2.sandbox
from jinja2.exceptions import SecurityError

from ..errors import RecipeError
from ..xnat.model import ScanRef
from .model import Recipe, check_resources, directive, format_walltime, one_line, whole

SCHEDULERS = ("pbs", "torque", "slurm", "local")
# What a command template may use, besides the recipe's own parameters under ``params``.
COMMAND_VARS = set("params input_dir output_dir work_dir scan cpus memory_mb walltime gpus".split())
SAFE_PATH = re.compile(r"^/[A-Za-z0-9_./+@-]*$")
SCAN_KEYS = ("project", "subject", "experiment", "id", "type", "series_description")


class Raw(str):
    """A string that the command template inserts as it is (the recipe vouches for it)."""


def shell_quote(value: Any) -> str:
    """The one quoting rule for everything rendered into a script body."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, bool):
        value = "true" if value else "false"
    return shlex.quote(str(value))


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


def _syntax_error(exc: jinja2.TemplateSyntaxError, where: str) -> RecipeError:
    return RecipeError(
        f"{where}: template error on line {exc.lineno}: {one_line(exc.message or '')}"
    )


def _parse(text: str, where: str) -> jinja2.nodes.Template:
    """The template's syntax tree, after the checks that need no rendering."""
    env = command_environment()
    try:
        ast = env.parse(text)
        # Compiling finds unknown filters and tests; it generates code but runs none of it.
        env.compile(ast)
        unsafe = _unsafe_reach(ast)
    except jinja2.TemplateSyntaxError as exc:
        raise _syntax_error(exc, where) from None
    except RecursionError:  # parsing, compiling and the walk above recurse into nesting
        raise RecipeError(f"{where}: template error: nested too deeply") from None
    if unsafe:
        raise RecipeError(
            f"{where}: template tries to reach an unsafe attribute {unsafe[0]!r} on line "
            f"{unsafe[1]} ({_NOT_CODE})"
        )
    return ast


def check_template(recipe: Recipe, where: str) -> None:
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
        _check_key(node, recipe, at)
    setup = f"{where} [environment] setup"
    unknown = sorted(jinja2.meta.find_undeclared_variables(_parse(recipe.setup, setup)))
    if unknown:
        raise RecipeError(
            f"{setup}: unknown variable {unknown[0]!r} (setup is the recipe's own shell text; "
            "it has no variables)"
        )


def _check_key(node: jinja2.nodes.Node, recipe: Recipe, at: str) -> None:
    """Refuse ``params.NAME`` that is not a parameter and ``scan.NAME`` that is not a scan key."""
    target = getattr(node, "node", None)
    if not (isinstance(target, jinja2.nodes.Name) and target.name in ("params", "scan")):
        return
    if isinstance(node, jinja2.nodes.Getattr):
        if hasattr(dict, node.attr):  # params.items() and friends are the dict's own
            return
        key: Any = node.attr
    elif isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Const):
        key = node.arg.value
    else:
        return
    if target.name == "scan" and key not in SCAN_KEYS:
        raise RecipeError(f"{at}: unknown variable scan.{key} (known: {', '.join(SCAN_KEYS)})")
    if target.name == "params" and key not in recipe.parameters:
        raise RecipeError(
            f"{at}: unknown parameter params.{key} "
            f"(parameters: {', '.join(recipe.parameters) or 'none'})"
        )


def check_render(recipe: Recipe) -> None:
    """Render the recipe (sandboxed) with its defaults and stand-in paths: the errors only a
    render finds (a type error, a value the sandbox refuses) show before a job is planned."""
    render_command(recipe, recipe.values(), sample_context())
    render_setup(recipe)


def builtin_dir() -> Path:
    """The built-in recipes shipped in the wheel (hpcbridge.templates/recipes)."""
    try:
        base = Path(str(importlib_resources.files("hpcbridge.templates")))
    except ModuleNotFoundError:  # a source checkout without an install
        base = Path(__file__).resolve().parents[2] / "templates"
    return base / "recipes"


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
                if isinstance(seq, (str, list, tuple)) and whole(times):
                    if len(seq) * times > _MAX_BUILT:
                        raise SecurityError(f"it builds a value of more than {_MAX_BUILT} items")
        elif whole(left) and whole(right) and abs(left) > 1:
            if right * max(left.bit_length(), 1) > _MAX_BUILT:
                raise SecurityError(f"it builds a number of more than {_MAX_BUILT} bits")
        return super().call_binop(context, operator, left, right)


def _render(env: jinja2.Environment, text: str, where: str, variables: dict[str, Any]) -> str:
    """``text`` rendered in ``env``; whatever goes wrong is one RecipeError naming ``where``."""
    try:
        return env.from_string(text).render(**variables)
    except SecurityError as exc:
        match = re.search(r"attribute '([^']*)'", str(exc))
        what = (
            f"tries to reach an unsafe attribute {match.group(1)!r} ({_NOT_CODE})"
            if match
            else f"refused: {one_line(str(exc))}"
        )
        raise RecipeError(f"{where}: template {what}; nothing was run") from None
    except jinja2.TemplateSyntaxError as exc:
        raise _syntax_error(exc, where) from None
    except jinja2.TemplateError as exc:
        raise RecipeError(f"{where}: {one_line(exc.message or str(exc))}") from None
    except Exception as exc:  # a template is the lab's code: its bug is its error, not ours
        raise RecipeError(
            f"{where}: template failed: {type(exc).__name__}: {one_line(str(exc))}"
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
        "scan": dict(zip(SCAN_KEYS, ("P", "S", "E", "1", "T1", "T1"), strict=True)),
    }


def scan_variables(ref: ScanRef) -> dict[str, str]:
    """The ``scan.*`` variables of a job's template (docs/recipes.md), for one scan."""
    values = (ref.project, ref.subject_label, ref.experiment_label, ref.scan_id, ref.type)
    return dict(zip(SCAN_KEYS, (*values, ref.series_description), strict=True))


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


def _absolute(path: str | Path, what: str) -> str:
    text = str(path)
    if not text.startswith("/") or "\n" in text or "\0" in text:
        raise RecipeError(f"{what} {text!r} must be an absolute path")
    return text


def _job_spec(
    recipe: Recipe,
    scheduler: str,
    work: str,
    *,
    name: str | None,
    queue: str | None,
    account: str | None,
    mail: str | None,
) -> JobSpec:
    """The directive values of the job, each validated (options win over the recipe's)."""
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
    return JobSpec(
        name=job_name(name or recipe.name),
        cpus=res.cpus,
        memory_mb=res.memory_mb,
        walltime=format_walltime(res.walltime),
        queue=directive(queue if queue is not None else res.queue, "queue"),
        account=directive(account if account is not None else res.account, "account"),
        gpus=res.gpus,
        stdout=f"{work}/.hpcbridge/job.out",
        stderr=f"{work}/.hpcbridge/job.err",
        mail=mail or "",
    )


def scheduler_environment() -> jinja2.Environment:
    env = command_environment()
    env.loader = jinja2.FileSystemLoader(str(builtin_dir().parent / "schedulers"))
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
    job = _job_spec(recipe, scheduler, work, name=name, queue=queue, account=account, mail=mail)
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
