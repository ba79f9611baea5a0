"""PBS Pro, Torque and the Slurm PBS wrappers as a :class:`~.batch.BatchScheduler`: the hooks
that pick, per flavour, the argv lists and parsers of :mod:`.pbs_commands`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from hpcbridge.errors import SchedulerError
from hpcbridge.schedulers.base import JobStatus
from hpcbridge.schedulers.batch import BatchScheduler
from hpcbridge.schedulers.pbs_commands import (
    UNKNOWN_EXIT,
    cancel_argv,
    check_flavour,
    check_pbs_ids,
    detect_flavour,
    find_argv,
    parse_found,
    parse_qstat_full,
    parse_qstat_json,
    parse_submit,
    short_id,
    status_argv,
    submit_argv,
    unknown_job,
    unknown_job_ids,
)
from hpcbridge.schedulers.script import ScriptInfo, without_pbs_project
from hpcbridge.schedulers.slurm import SqueueHooks
from hpcbridge.transport import Result, Transport

__all__ = ["PbsScheduler", "SlurmPbsWrappers"]

log = logging.getLogger(__name__)


class PbsScheduler(BatchScheduler):
    """PBS Pro, Torque or the Slurm PBS wrappers, through ``qsub``/``qstat``/``qdel``.

    The flavour is asked of ``qstat --version`` once per scheduler object, unless the profile
    names it; everything that differs between flavours follows from it.
    """

    kind = "pbs"

    def __init__(
        self,
        transport: Transport,
        *,
        flavour: str | None = None,
        project: str | None = None,
        queue: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        super().__init__(transport, timeout=timeout)
        self._flavour = None if flavour is None else self._set_flavour(flavour)
        self.project = project
        self.queue = queue

    def _set_flavour(self, flavour: str) -> str:
        check_flavour(flavour)
        self._flavour = flavour
        if flavour == "wrapper":
            # Known only once qstat --version has answered, so the object becomes one then.
            self.__class__ = SlurmPbsWrappers
        return flavour

    @property
    def flavour(self) -> str:
        return self._flavour or self._detect()

    def _detect(self) -> str:
        result = self._run(["qstat", "--version"])
        if result.exit_code == 127:
            raise SchedulerError(
                "qstat is not installed where jobs are submitted",
                hint="is this a PBS login node? set `scheduler` in the profile "
                "(pbs, slurm or local)",
                result=result,
            )
        flavour = self._set_flavour(detect_flavour(result.stdout + result.stderr, result.exit_code))
        log.debug("PBS flavour: %s", flavour)
        return flavour

    def _ready(self) -> None:
        if self._flavour is None:
            self._detect()

    def prepare_script(self, text: str) -> str:
        return without_pbs_project(text) if self.flavour == "wrapper" else text

    @property
    def template(self) -> str:
        # Torque has its own skeleton (-l nodes=...:ppn=..., -A for the project).
        return "torque" if self.flavour == "torque" else "pbs"

    def check_ids(self, ids: Sequence[str]) -> list[str]:
        return check_pbs_ids(ids)

    def _log_paths(self, info: ScriptInfo) -> tuple[str | None, str | None]:
        return None, None

    def submit_command(
        self, script_path: str, after: list[str], array: str | None, info: ScriptInfo
    ) -> list[str]:
        stdout, stderr = self._log_paths(info)
        # The script's own -q wins; the profile's queue fills in when it has none.
        queue = None if info.queue else self.queue
        project = info.project or self.project
        return submit_argv(
            script_path,
            after=after,
            array=array,
            flavour=self.flavour,
            project=project,
            queue=queue,
            stdout=stdout,
            stderr=stderr,
        )

    def refused(self, result: Result) -> SchedulerError:
        return SchedulerError(
            f"qsub refused the job: {result.said()}",
            hint="check the resource requests (walltime, memory, queue, project) in the script",
            result=result,
        )

    job_id_from = staticmethod(parse_submit)

    def status_commands(self, ids: list[str]) -> list[list[str]]:
        text = status_argv(ids, flavour=self.flavour)
        # JSON only for one id: OpenPBS 23.06's `qstat -x -f -F json A B C` prints A alone and
        # exits 0 (seen on the real server), while the text form lists every job asked for.
        # Some PBS Pro releases print invalid JSON; the text form is asked then.
        if self.flavour == "pbspro" and len(ids) == 1:
            return [status_argv(ids, flavour="pbspro", json_output=True), text]
        return [text]

    def statuses_from(self, argv: list[str], stdout: str) -> dict[str, JobStatus]:
        return parse_qstat_json(stdout or "{}") if "json" in argv else parse_qstat_full(stdout)

    is_unknown = staticmethod(unknown_job)

    def named_unknown(self, result: Result, ids: list[str]) -> set[str]:
        # The server names an id as it knows it ("9.vm" when asked "9").
        named = {short_id(i) for i in unknown_job_ids(result.stderr)}
        return {i for i in ids if short_id(i) in named}

    def group_keys(self, native_id: str) -> list[str]:
        short = short_id(native_id)
        if "[" in short and "[]" not in short:
            # a subjob 123[4].server belongs to the array 123[].server
            return [short, short.split("[", 1)[0]]
        return [short.replace("[]", "")]

    cancel_command = staticmethod(cancel_argv)

    def cancel_failure(self, result: Result, ids: list[str]) -> list[str] | None:
        # PBS Pro's qdel deletes none of its ids when one fails, and names only that one
        # (seen: `qdel 290.vm 9999.vm 291.vm` exits 153 and both jobs run on): each alone.
        if len(ids) > 1:
            return None
        if "has finished" in (result.stderr + result.stdout).lower():
            return []  # PBS Pro refuses to delete an ended job; there is nothing to cancel
        if unknown_job_ids(result.stderr) or result.exit_code in (1, UNKNOWN_EXIT):
            return ids  # the wrappers say nothing of an unknown id, and exit 1
        return None

    def find_command(self, name: str) -> list[str]:
        return find_argv(name, flavour=self.flavour)

    found_from = staticmethod(parse_found)


class SlurmPbsWrappers(SqueueHooks, PbsScheduler):
    """Slurm's PBS wrappers: ``qsub`` and ``qdel`` are theirs, status and lookups Slurm's own.

    The wrappers' qstat shows no exit state, shows every ended job as C and splits arrays into
    unrelated ids, and their qselect is missing; squeue beneath them knows all of it. They fail
    on ``#PBS -P`` (see :meth:`PbsScheduler.prepare_script`) and ignore ``-o``/``-e`` inside
    scripts.
    """

    def _log_paths(self, info: ScriptInfo) -> tuple[str | None, str | None]:
        return info.stdout, info.stderr
