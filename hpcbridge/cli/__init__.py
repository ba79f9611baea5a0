"""The ``hpcbridge`` command line. ``app`` holds the group and the one place errors are turned
into a line and an exit code; each other module adds the commands of one area."""

from . import auth, browse, config, data, demo, jobs, recipes, runs, sandbox, status, sync  # noqa: F401 - importing registers the commands
from .app import main

# The command list of `hpcbridge --help` fits each summary on one 80-column line; click would
# cut the docstrings' first sentences short with "...".
SHORT_HELP = {
    "cancel": "Cancel jobs, or a whole run (--run).",
    "config": "Write and inspect profiles.",
    "demo": "Convert the sandbox's T1 scans and show where they landed.",
    "jobs": "States and exit codes of submitted jobs.",
    "login": "Swap your password for a stored XNAT alias token.",
    "logout": "Invalidate the stored token and forget it.",
    "ls": "Browse projects, subjects, sessions, scans and files.",
    "run": "Convert every matching scan: stage in, submit, stage out.",
    "runs": "The runs, newest first, with their states.",
    "sandbox": "The XNAT-compatible sandbox server, for demos and tests.",
    "stage-in": "Download scans, verify and unpack them, with a manifest.",
    "stage-out": "Upload files into a scan's resource, verified.",
    "status": "A run's scans, their states and a summary.",
    "submit": "Submit a job script; print its job id.",
    "sync": "Move a run on: poll, stage out, submit more (cron).",
    "whoami": "Server, XNAT user and token expiry.",
}
for _name, _text in SHORT_HELP.items():
    main.commands[_name].short_help = _text

__all__ = ["main"]
