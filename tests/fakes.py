"""A stateful fake batch system for unit tests, after submitit's ``MockedSubprocess``.

:class:`FakeCluster` is a :class:`~hpcbridge.transport.Transport` that keeps a table of jobs and
answers PBS's ``qsub``/``qstat``/``qdel`` and Slurm's ``sbatch``/``squeue``/``scancel`` from it,
with job records cut from real output: OpenPBS's ``qstat -f`` (text and JSON) recorded in
``tests/unit/data/openpbs/`` and squeue lines in hpcbridge's format from
``tests/unit/data/sched/squeue.txt``. Tests move jobs along with :meth:`FakeCluster.set_state`
and read :attr:`FakeCluster.calls` to see what hpcbridge asked. (hpcbridge never runs sacct.)

Where real servers differ, the fake follows the one seen: OpenPBS 23.06 names each unknown id
("qstat: Unknown Job Id 9.vm", exit 153) and ``qdel`` deletes none of a list that holds an
unknown id; ``stop_at_unknown`` mimics a server whose qstat stops at the first unknown id.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hpcbridge.transport import Result, Transport

DATA = Path(__file__).parent / "unit" / "data"
PBS = DATA / "openpbs"
UNKNOWN_EXIT = 153  # PBSE_UNKJOBID, as the recorded server exits

# A PBS job's state -> the recorded (text, JSON) answers of a job in it, both about "0.vm"-like
# ids that the fake renames.
PBS_RECORDS = {
    "running": ("04_qstat_f_text_running", "03_qstat_f_json_running"),
    "finished": ("06_qstat_x_f_text_finished_ok", "05_qstat_x_f_json_finished_ok"),
    "walltime": ("15_qstat_x_f_text_walltime_killed", "14_qstat_x_f_json_walltime_killed"),
    "held": ("45_qstat_f_text_child_held", "44_qstat_f_json_child_held_waiting"),
}
# A Slurm job's state -> a line of squeue.txt, by its id there.
SQUEUE_LINES = {"pending": "4101", "running": "4103", "completed": "4105", "timeout": "4107"}


def _pbs_block(state: str, native_id: str) -> str:
    """The recorded ``qstat -f`` text of a job in ``state``, as job ``native_id``."""
    text = (PBS / f"{PBS_RECORDS[state][0]}.stdout").read_text()
    return re.sub(r"^Job Id: \S+", f"Job Id: {native_id}", text.strip(), flags=re.M) + "\n"


def _pbs_json(state: str, native_id: str) -> dict[str, object]:
    data = json.loads((PBS / f"{PBS_RECORDS[state][1]}.stdout").read_text())
    (fields,) = data["Jobs"].values()
    return fields


def _squeue_line(state: str, native_id: str) -> str:
    lines = (DATA / "sched" / "squeue.txt").read_text().splitlines()
    line = next(x for x in lines if x.startswith(SQUEUE_LINES[state] + "|"))
    return native_id + line[line.index("|") :]


@dataclass
class FakeCluster(Transport):
    """One PBS or Slurm server, as far as hpcbridge's commands can see it."""

    kind: str = "pbs"  # or "slurm" (whose PBS wrappers answer qsub and qstat --version)
    stop_at_unknown: bool = False
    jobs: dict[str, str] = field(default_factory=dict)  # native id -> state
    tasks: dict[str, dict[int, str]] = field(default_factory=dict)  # Slurm array -> task states
    calls: list[list[str]] = field(default_factory=list)
    fail_next: dict[str, Result] = field(default_factory=dict)  # command -> forced answer
    next_id: int = 1

    def add(self, state: str, native_id: str | None = None) -> str:
        """A job already in the scheduler, in ``state``; its id."""
        native_id = native_id or self._new_id()
        self.jobs[native_id] = state
        return native_id

    def set_state(self, native_id: str, state: str | None) -> None:
        """Move a job on; None: the server forgets it (PBS history or MinJobAge ran out)."""
        if state is None:
            del self.jobs[native_id]
        else:
            self.jobs[native_id] = state

    def _new_id(self) -> str:
        self.next_id += 1
        return f"{self.next_id - 1}.vm" if self.kind == "pbs" else str(self.next_id - 1)

    # --- Transport ---------------------------------------------------------------------------

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 60.0,
        stdin: str | None = None,
        retry: bool = True,
    ) -> Result:
        argv = list(argv)
        if argv[0] == "env":  # submissions run behind `env -u SECRET ...`
            argv = argv[next(i for i, a in enumerate(argv) if a in ("qsub", "sbatch")) :]
        self.calls.append(argv)
        if argv[0] in self.fail_next:
            return self.fail_next.pop(argv[0])
        answer = getattr(self, "_" + argv[0])(argv[1:])
        return Result(tuple(argv), *answer)

    def write_text(self, path: str, text: str, *, mode: int = 0o644) -> None:
        raise AssertionError("the scheduler writes no file")

    def read_text(self, path: str, *, limit: int = 0) -> str | None:
        raise AssertionError("the scheduler reads no file")

    def put(self, local: Path, path: str, *, mode: int | None = None) -> None:
        raise AssertionError("the scheduler copies no file")

    def get(self, path: str, local: Path) -> None:
        raise AssertionError("the scheduler copies no file")

    def makedirs(self, path: str) -> None:
        raise AssertionError("the scheduler makes no folder")

    def files_in(self, folder: str) -> list[str]:
        raise AssertionError("the scheduler lists no folder")

    def remove(self, path: str) -> None:
        raise AssertionError("the scheduler removes no file")

    # --- PBS ---------------------------------------------------------------------------------

    def _qsub(self, args: list[str]) -> tuple[int, str, str]:
        if self.kind == "slurm":  # Slurm's qsub wrapper: an sbatch
            return self._sbatch(args)
        return 0, self.add("held" if "-W" in args else "running") + "\n", ""

    def _qstat(self, args: list[str]) -> tuple[int, str, str]:
        if args == ["--version"]:  # Slurm's wrappers reject the option
            if self.kind == "pbs":
                return 0, (PBS / "30_qstat_version.stdout").read_text(), ""
            return 2, "", "Unknown option: version\nUsage: qstat [-f] [-a|-i|-r] ...\n"
        ids = [a for a in args if not a.startswith("-") and a != "json"]
        out, err = [], []
        for native_id in ids:
            if native_id not in self.jobs:
                err.append(f"qstat: Unknown Job Id {native_id}\n")
                if self.stop_at_unknown:
                    break
            elif "json" in args:
                out.append((native_id, _pbs_json(self.jobs[native_id], native_id)))
            else:
                out.append(_pbs_block(self.jobs[native_id], native_id))
        text = "\n".join(o for o in out if isinstance(o, str))
        if "json" in args:
            text = json.dumps({"Jobs": dict(o for o in out if isinstance(o, tuple))} if out else {})
        return (UNKNOWN_EXIT if err else 0), text, "".join(err)

    def _qdel(self, ids: list[str]) -> tuple[int, str, str]:
        unknown = [i for i in ids if i not in self.jobs]
        if unknown:  # OpenPBS deletes none of them, and names the unknown one
            return UNKNOWN_EXIT, "", f"qdel: Unknown Job Id {unknown[0]}\n"
        ended = [i for i in ids if self.jobs[i] in ("finished", "walltime")]
        if ended:
            return 35, "", f"qdel: Job has finished {ended[0]}\n"
        for native_id in ids:
            self.jobs[native_id] = "finished"
        return 0, "", ""

    # --- Slurm -------------------------------------------------------------------------------

    def _sbatch(self, args: list[str]) -> tuple[int, str, str]:
        return 0, self.add("pending") + "\n", ""

    def _squeue(self, args: list[str]) -> tuple[int, str, str]:
        ids = args[args.index("-j") + 1].split(",")
        if any(i not in self.jobs and i not in self.tasks for i in ids):
            return 1, "", "slurm_load_jobs error: Invalid job id specified\n"
        lines = [_squeue_line(self.jobs[i], i) for i in ids if i in self.jobs]
        for array in (i for i in ids if i in self.tasks):
            lines += [_squeue_line(s, f"{array}_{n}") for n, s in self.tasks[array].items()]
        return 0, "".join(line + "\n" for line in lines), ""

    def _scancel(self, ids: list[str]) -> tuple[int, str, str]:
        for native_id in ids:  # silent about ids it never knew (seen on 22.05)
            if native_id in self.jobs:
                self.jobs[native_id] = "completed"
        return 0, "", ""
