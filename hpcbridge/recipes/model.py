"""What a recipe is: its keys, its dataclasses, and the units of its resource requests."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import RecipeError

PARAM_TYPES = {"str": str, "int": int, "float": float, "bool": bool}
RESOURCE_KEYS = {"cpus", "memory", "walltime", "queue", "account", "gpus"}
SAFE_DIRECTIVE = re.compile(r"^[A-Za-z0-9_.@+-]+$")

# Bounds on what a recipe may ask of a scheduler (docs/recipes.md). Generous, since one node of
# the largest machines has a few hundred cores and tens of TB; a value beyond them is a typo or
# an attack, and would only come back as a scheduler's rejection long after the recipe loaded.
MAX_CPUS = 4096
MAX_GPUS = 64
MAX_MEMORY_MB = 64 * 1024 * 1024  # 64 TB
MAX_WALLTIME = 365 * 24 * 3600  # one year, in seconds
_MEMORY_UNITS = {"k": 1 / 1024, "": 1, "m": 1, "g": 1024, "t": 1024 * 1024}


def whole(value: Any) -> bool:
    """Whether ``value`` is an int and not a bool (which Python counts as one)."""
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
    if not (whole(res.cpus) and 1 <= res.cpus <= MAX_CPUS):
        raise RecipeError(f"{where}: cpus {res.cpus!r} must be a whole number from 1 to {MAX_CPUS}")
    if not (whole(res.gpus) and 0 <= res.gpus <= MAX_GPUS):
        raise RecipeError(f"{where}: gpus {res.gpus!r} must be a whole number from 0 to {MAX_GPUS}")
    if not (whole(res.memory_mb) and 1 <= res.memory_mb <= MAX_MEMORY_MB):
        raise RecipeError(
            f"{where}: memory_mb {res.memory_mb!r} must be a whole number of MB from 1 to "
            f"{MAX_MEMORY_MB} (64TB)"
        )
    if not (whole(res.walltime) and 1 <= res.walltime <= MAX_WALLTIME):
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


def one_line(text: str) -> str:
    """``text`` with its runs of whitespace (newlines too) as single spaces, for messages."""
    return " ".join(str(text).split())


def directive(value: Any, what: str) -> Any:
    """``value``, checked for a scheduler directive line (where it goes unquoted)."""
    if value and not (isinstance(value, str) and SAFE_DIRECTIVE.match(value)):
        raise RecipeError(f"{what} {value!r} may only hold letters, digits and '_.@+-'")
    return value


def unknown_keys(table: dict[str, Any], known: set[str], where: str) -> None:
    """Refuse a key the table may not hold, naming the keys it may."""
    extra = sorted(set(table) - known)
    if extra:
        raise RecipeError(f"{where}: unknown key {extra[0]!r} (known: {', '.join(sorted(known))})")


def read_resources(table: dict[str, Any], where: str) -> Resources:
    """The ``[resources]`` table of a recipe, validated."""
    at = f"{where} [resources]"
    unknown_keys(table, RESOURCE_KEYS, at)
    for key in ("queue", "account"):
        directive(table.get(key, ""), f"{at}: {key}")
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
