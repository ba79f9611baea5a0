"""The ``hpcbridge`` command line. ``app`` holds the group and the one place errors are turned
into a line and an exit code; each other module adds the commands of one area."""

from . import auth, browse, config, data, demo, jobs, recipes, runs, sandbox  # noqa: F401 - importing registers the commands
from .app import main

__all__ = ["main"]
