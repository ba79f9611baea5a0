"""What a job script says about itself: its work folder, log files, name, project and walltime.

The submit layer needs these to place the script, to repeat on the command line the options that
some PBS flavours ignore inside scripts, and later to find the job's status file and log. Scripts
rendered by hpcbridge carry all of them; a hand-written script may carry none, and every field is
then None.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

__all__ = ["ScriptInfo", "parse_script", "walltime_seconds"]

_WORK = re.compile(r"^HPCBRIDGE_WORK=(.+)$", re.MULTILINE)
_PBS = re.compile(r"^#PBS\s+(-\w)\s*(.*?)\s*$", re.MULTILINE)
_SBATCH = re.compile(r"^#SBATCH\s+--([\w-]+)(?:[= ](.*?))?\s*$", re.MULTILINE)
_LOCAL_WALLTIME = re.compile(r"^#.*\bwalltime (\d+:\d{2}:\d{2})\b", re.MULTILINE)
_PBS_WALLTIME = re.compile(r"\bwalltime=(\d+:\d{2}:\d{2})\b")


@dataclass(frozen=True)
class ScriptInfo:
    """Facts read from a job script; None where the script does not say."""

    work_dir: str | None = None
    stdout: str | None = None
    stderr: str | None = None
    name: str | None = None
    project: str | None = None
    queue: str | None = None
    walltime: str | None = None

    @property
    def state_dir(self) -> str | None:
        """Where the script writes started.json and status.json."""
        return f"{self.work_dir}/.hpcbridge" if self.work_dir else None


def walltime_seconds(text: str) -> int:
    """``HH:MM:SS`` (hours may exceed 24) in seconds."""
    hours, minutes, seconds = (int(part) for part in text.split(":"))
    return hours * 3600 + minutes * 60 + seconds


def _work_dir(text: str) -> str | None:
    match = _WORK.search(text)
    if not match:
        return None
    # The renderer shell-quotes the value; undo exactly that quoting.
    try:
        parts = shlex.split(match.group(1))
    except ValueError:
        return None
    return parts[0] if len(parts) == 1 else None


def parse_script(text: str) -> ScriptInfo:
    """Read the hpcbridge work folder and the scheduler directives of a job script."""
    work = _work_dir(text)
    pbs: dict[str, str] = {}
    for flag, value in _PBS.findall(text):
        if flag == "-l":
            pbs["-l"] = pbs.get("-l", "") + "," + value
        else:
            pbs.setdefault(flag, value)
    slurm: dict[str, str] = {}
    for key, value in _SBATCH.findall(text):
        slurm.setdefault(key, value)
    walltime = None
    if match := _PBS_WALLTIME.search(pbs.get("-l", "")):
        walltime = match.group(1)
    elif slurm.get("time") and re.fullmatch(r"\d+:\d{2}:\d{2}", slurm["time"]):
        walltime = slurm["time"]
    elif match := _LOCAL_WALLTIME.search(text):
        walltime = match.group(1)
    default_out = f"{work}/.hpcbridge/job.out" if work else None
    default_err = f"{work}/.hpcbridge/job.err" if work else None
    return ScriptInfo(
        work_dir=work,
        stdout=pbs.get("-o") or slurm.get("output") or default_out,
        stderr=pbs.get("-e") or slurm.get("error") or default_err,
        name=pbs.get("-N") or slurm.get("job-name"),
        project=pbs.get("-P") or slurm.get("account"),
        queue=pbs.get("-q") or slurm.get("partition"),
        walltime=walltime,
    )


def without_pbs_project(text: str) -> str:
    """The script with its ``#PBS -P`` line neutralised (the Slurm wrappers fail on it)."""
    return re.sub(
        r"^#PBS\s+-P\b(.*)$",
        r"# hpcbridge: -P\1 is passed on the qsub command line",
        text,
        flags=re.MULTILINE,
    )
