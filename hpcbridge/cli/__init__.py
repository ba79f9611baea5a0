"""The ``hpcbridge`` command line. ``app`` holds the group and the one place errors are turned
into a line and an exit code; each other module adds the commands of one area.

Each top-level command sets ``short_help`` so that ``hpcbridge --help`` fits its summary on one
80-column line; click would cut the docstring's first sentence short with "...".
"""

from . import auth, browse, config, data, demo, jobs, recipes, runs, sandbox, status, sync  # noqa: F401 - importing registers the commands
from .app import main

__all__ = ["main"]
