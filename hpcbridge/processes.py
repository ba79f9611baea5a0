"""Whether a process id still names a live process: for the sandbox and the local scheduler."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def pid_alive(pid: int | None) -> bool:
    """True while ``pid`` runs; an exited process is dead even before anyone reaps it.

    Our own exited child is reaped here (a CLI run in-process, as in tests); another process's
    exited child stays a zombie until its parent reaps it, which may be never in a container
    whose PID 1 does not, so a zombie counts as dead too.
    """
    if not pid:
        return False
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, and someone else's
    with contextlib.suppress(OSError, IndexError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "Z":
            return False
    return True
