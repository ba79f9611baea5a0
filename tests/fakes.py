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

:class:`LoginNode` is the same server behind a login node that shares this machine's disk (a
:class:`~hpcbridge.transport.LocalTransport`): job files are real files, other commands run
here, and :meth:`LoginNode.finish` does what a job's script would (its status file, outputs).
:class:`Bridge` is hpcbridge's side of a run over one: a profile, the real ledger and job
records, and a :class:`~hpcbridge.runs.RunSession` whose passes tests run one at a time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcbridge import __version__
from hpcbridge.config import Settings
from hpcbridge.credentials import Secret
from hpcbridge.jobs import JobStore, open_scheduler
from hpcbridge.ledger import JobRow, Ledger, Run
from hpcbridge.runs import RunRequest, RunSession, SyncReport, start_run
from hpcbridge.runs.sync import one_pass
from hpcbridge.schedulers.script import parse_script
from hpcbridge.transport import LocalTransport, Result, Transport
from hpcbridge.xnat import connect

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
# The state a job that ended is in, as each server shows it until it forgets the job.
ENDED = {"pbs": "finished", "slurm": "completed"}
COMMANDS = ("qsub", "qstat", "qdel", "qselect", "sbatch", "squeue", "scancel")


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


# eq=False: a server is itself, and hashable (hpcbridge caches answers per transport)
@dataclass(eq=False)
class BatchServer(Transport):
    """One PBS or Slurm server, as far as hpcbridge's commands can see it."""

    kind: str = "pbs"  # or "slurm" (whose PBS wrappers answer qsub and qstat --version)
    stop_at_unknown: bool = False
    jobs: dict[str, str] = field(default_factory=dict)  # native id -> state
    tasks: dict[str, dict[int, str]] = field(default_factory=dict)  # Slurm array -> task states
    calls: list[list[str]] = field(default_factory=list)
    # command -> its next answer instead of the server's; an exception is raised (a transport
    # that lost its connection)
    fail_next: dict[str, Result | Exception] = field(default_factory=dict)
    submitted: dict[str, list[str]] = field(default_factory=dict)  # native id -> submit argv
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
            forced = self.fail_next.pop(argv[0])
            if isinstance(forced, Exception):
                raise forced
            return forced
        answer = getattr(self, "_" + argv[0])(argv[1:])
        return Result(tuple(argv), *answer)

    # --- PBS ---------------------------------------------------------------------------------

    def _qsub(self, args: list[str]) -> tuple[int, str, str]:
        if self.kind == "slurm":  # Slurm's qsub wrapper: an sbatch
            return self._sbatch(args)
        native_id = self.add("held" if "-W" in args else "running")
        self.submitted[native_id] = ["qsub", *args]
        return 0, native_id + "\n", ""

    def _qstat(self, args: list[str]) -> tuple[int, str, str]:
        if args == ["--version"]:  # Slurm's wrappers reject the option
            if self.kind == "pbs":
                return 0, (PBS / "30_qstat_version.stdout").read_text(), ""
            return 2, "", "Unknown option: version\nUsage: qstat [-f] [-a|-i|-r] ...\n"
        ids = [a for a in args if not a.startswith("-") and a != "json"]
        out: list[str | tuple[str, dict[str, object]]] = []
        err: list[str] = []
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

    def _named(self, name: str) -> str:
        """The ids of the jobs the server knows by the name in their script, one per line."""
        scripts = {i: Path(argv[-1]) for i, argv in self.submitted.items() if i in self.jobs}
        return "".join(
            i + "\n" for i, p in scripts.items() if parse_script(p.read_text()).name == name
        )

    def _qselect(self, args: list[str]) -> tuple[int, str, str]:
        return 0, self._named(args[args.index("-N") + 1]), ""

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
        after = [a.split(":")[1:] for a in args if a.startswith("--dependency=afterok:")]
        if any(i not in self.jobs for i in (after[0] if after else [])):
            # what sbatch says of a dependency on a job that slurmctld has purged (MinJobAge)
            return 1, "", "sbatch: error: Batch job submission failed: Job dependency problem\n"
        native_id = self.add("pending")
        self.submitted[native_id] = ["sbatch", *args]
        return 0, native_id + "\n", ""

    def _squeue(self, args: list[str]) -> tuple[int, str, str]:
        if "-n" in args:  # looked up by name
            return 0, self._named(args[args.index("-n") + 1]), ""
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


@dataclass(eq=False)
class FakeCluster(BatchServer):
    """The server alone: hpcbridge's scheduler layer moves no file."""

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


@dataclass(eq=False)
class LoginNode(BatchServer, LocalTransport):
    """The server behind a login node on this machine's disk: the scheduler's commands are the
    fake's, ``hpcbridge --version`` answers as this hpcbridge (a chain's transfer command, set
    as ``bridge_command = "hpcbridge"``), and any other command (``sh``, ``rm``, ``tail``)
    runs here. No job runs: a test says how each ended with :meth:`finish`."""

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 60.0,
        stdin: str | None = None,
        retry: bool = True,
    ) -> Result:
        if argv[0] in COMMANDS:
            return super().run(argv, timeout=timeout, stdin=stdin, retry=retry)
        if list(argv) == ["hpcbridge", "--version"]:
            return Result(tuple(argv), 0, f"hpcbridge, version {__version__}\n", "")
        return LocalTransport.run(self, argv, timeout=timeout, stdin=stdin, retry=retry)

    def work_dir(self, native_id: str) -> Path:
        """The work folder of a submitted job, as its script names it."""
        script = Path(self.submitted[native_id][-1])
        work = parse_script(script.read_text()).work_dir
        assert work is not None, f"job {native_id}'s script names no work folder"
        return Path(work)

    def start(self, native_id: str) -> None:
        """The job's script begins: it is running, and says so in its folder."""
        state = self.work_dir(native_id) / ".hpcbridge"
        state.mkdir(parents=True, exist_ok=True)
        (state / "started.json").write_text('{"start": "2026-12-08T00:00:00Z", "host": "n1"}\n')
        self.set_state(native_id, "running")

    def finish(
        self,
        native_id: str,
        exit_code: int = 0,
        files: dict[str, str] | None = None,
        *,
        forgotten: bool = False,
    ) -> None:
        """The job's script ran: it wrote ``files`` (paths relative to its work folder) and
        its status file with ``exit_code``; the server shows it ended (``forgotten``: it
        forgot it already)."""
        self.start(native_id)
        work = self.work_dir(native_id)
        for name, text in (files or {}).items():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            (work / name).write_text(text)
        status = {"exit_code": exit_code, "end": "2026-12-08T00:01:00Z", "job_id": native_id}
        (work / ".hpcbridge" / "status.json").write_text(json.dumps(status) + "\n")
        self.set_state(native_id, None if forgotten else ENDED[self.kind])


COUNTING_RECIPE = """name = "count"
version = "7"
[inputs]
resource = "DICOM"
[[outputs]]
glob = "*.txt"
resource = "RESULT"
[run]
command = 'ls {{ input_dir }} | wc -l > {{ output_dir }}/count.txt'
"""


class Bridge:
    """hpcbridge's side of runs over a :class:`LoginNode`: a PBS Pro (or Slurm) profile with the
    counting recipe, pointed at an XNAT, with the real ledger and job records in ``home``.
    :meth:`restart` opens them again as a new process would; the cluster stays as it is."""

    def __init__(self, home: Path, xnat: str, user: str, password: str, **profile: Any) -> None:
        kind = profile.setdefault("scheduler", "pbs")
        self.cluster = LoginNode(kind=kind)
        self.recipes = home.parent / "recipes"
        self.recipes.mkdir(parents=True, exist_ok=True)
        (self.recipes / "count.toml").write_text(COUNTING_RECIPE)
        defaults = dict(
            pbs_flavour="pbspro",
            work_root=str(home.parent / "cluster"),
            allow_insecure_http=True,  # the sandbox listens on loopback
            bridge_command="hpcbridge",
            transfer_queue="dtq",
        )
        self.settings = Settings(
            home=home,
            config_path=home / "config.toml",
            profile="default",
            xnat=xnat,
            user=user,
            **{**defaults, **profile},
        )
        self.client = connect(self.settings, secret=Secret(user, password, "environment"))
        self.events: list[str] = []
        self.ledger = Ledger.for_settings(self.settings)
        self.session = self._session()

    def _session(self) -> RunSession:
        scheduler = open_scheduler(self.settings, self.cluster)
        store = JobStore(self.settings.home, self.settings.profile)
        return RunSession.of(self.settings, self.client, self.ledger, scheduler, store)

    def restart(self) -> None:
        """A new ledger handle, job store and scheduler over the same files and cluster, as the
        next process has (the XNAT client is kept: XNAT is not what is tested)."""
        self.ledger.close()
        self.ledger = Ledger.for_settings(self.settings)
        self.session = self._session()

    def start(self, address: str, *scan_ids: str, **request: Any) -> Run:
        """``hpcbridge run count ADDRESS``: the run planned, nothing submitted."""
        wanted = RunRequest("count", address, scan_ids, recipe_dirs=(self.recipes,), **request)
        plan = start_run(self.settings, self.client, self.ledger, wanted)
        assert plan.run is not None
        return plan.run

    def sync(self, run: Run) -> SyncReport:
        """One pass over the run, as it is in the ledger now."""
        return one_pass(self.session, self.ledger.run(run.id), on_event=self.events.append)

    def rows(self, run: Run) -> list[JobRow]:
        return self.ledger.jobs(run.id)

    def time_passes(self, run: Run) -> None:
        """Every wait the run's scans record is over (its next try is due)."""
        for row in self.rows(run):
            record = row.extra.get("waiting")
            if isinstance(record, dict):
                due = dict(record, next="2000-01-01T00:00:00Z")
                self.ledger.update(row.job_id, extra=dict(row.extra, waiting=due))

    def close(self) -> None:
        self.ledger.close()
        self.client.close()
