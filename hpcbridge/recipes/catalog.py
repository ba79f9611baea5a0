"""Finding recipes: the search path of lab folders and built-ins, every recipe by name (the
first of a name wins, so a lab may override a built-in), and one recipe checked by a render.

One broken recipe is reported (``Catalog.broken``) and never hides the others.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import RecipeError
from .loading import file_problem, folder_problem, load_recipe, name_of
from .model import Recipe, one_line
from .render import builtin_dir, check_render

log = logging.getLogger(__name__)


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
        refused = folder_problem(folder) if files else None
        if refused:
            whole = BrokenRecipe(folder, origin, refused)
            catalog.broken.append(whole)
            for file in files:  # names from paths only: nothing in the folder is read
                catalog._claim(name_of(file, readable=False), whole)
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
                trusted = file_problem(file) is None
                broken = BrokenRecipe(file, origin, error, name_of(file, trusted))
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
