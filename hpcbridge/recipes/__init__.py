"""Recipes: a lab's conversion steps as small TOML files, validated and rendered into job scripts.

A recipe is ``NAME.toml`` or a folder ``NAME/recipe.toml`` (with the command beside it in
``command.sh.j2`` if the lab prefers); docs/recipes.md describes every key. A recipe is data from
a shared folder, not code: templates render only in Jinja's immutable sandbox, a recipe file or
folder that every user may write is refused, and resources are bounded. ``model`` says what a
recipe is, ``loading`` reads and finds recipe files, ``render`` turns one into a job script.
"""

# The names used outside the package (and `_reported`, which tests clear).
from ..errors import RecipeError as RecipeError
from .loading import (  # noqa: F401
    ENV_KEYS,
    INPUT_KEYS,
    NAME,
    OUTPUT_KEYS,
    PARAM_KEYS,
    RUN_KEYS,
    TOP_KEYS,
    _reported,
    discover,
    find,
    load_recipe,
    search_path,
)
from .model import (  # noqa: F401
    RESOURCE_KEYS,
    Output,
    Recipe,
    Resources,
    format_walltime,
    parse_memory,
    parse_walltime,
)
from .render import (  # noqa: F401
    COMMAND_VARS,
    SCHEDULERS,
    job_name,
    render_script,
    scan_variables,
    scheduler_environment,
    setup_environment,
    uses_scan_variables,
)
