"""Slurm as a :class:`~.batch.BatchScheduler`: the hooks that pick the argv lists and parsers of
:mod:`.slurm_commands`.
"""

from __future__ import annotations

from collections.abc import Sequence

from hpcbridge.errors import SchedulerError
from hpcbridge.schedulers.base import JobStatus
from hpcbridge.schedulers.batch import BatchScheduler
from hpcbridge.schedulers.script import ScriptInfo
from hpcbridge.schedulers.slurm_commands import (
    array_keys,
    cancel_argv,
    check_slurm_ids,
    find_argv,
    parse_found,
    parse_squeue,
    parse_submit,
    status_argv,
    submit_argv,
    unknown_job,
)
from hpcbridge.transport import Result, Transport

__all__ = ["SlurmScheduler", "SqueueHooks"]


class SqueueHooks(BatchScheduler):
    """Status and lookups through ``squeue``: Slurm's own, and the PBS wrappers'."""

    def status_commands(self, ids: list[str]) -> list[list[str]]:
        return [status_argv(ids)]

    def statuses_from(self, argv: list[str], stdout: str) -> dict[str, JobStatus]:
        return parse_squeue(stdout)

    is_unknown = staticmethod(unknown_job)
    group_keys = staticmethod(array_keys)
    find_command = staticmethod(find_argv)
    found_from = staticmethod(parse_found)


class SlurmScheduler(SqueueHooks):
    """Slurm through ``sbatch``/``squeue``/``scancel``.

    ``squeue`` shows ended jobs only for ``MinJobAge`` seconds and never their exit codes; the
    job's own status file supplies both, so this class only reports what squeue shows.
    """

    kind = "slurm"

    def __init__(
        self,
        transport: Transport,
        *,
        partition: str | None = None,
        account: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        super().__init__(transport, timeout=timeout)
        self.partition = partition
        self.account = account

    def check_ids(self, ids: Sequence[str]) -> list[str]:
        return check_slurm_ids(ids)

    def submit_command(
        self, script_path: str, after: list[str], array: str | None, info: ScriptInfo
    ) -> list[str]:
        # The script's own directives win; the profile's fill in where it has none.
        partition = None if info.queue else self.partition
        account = None if info.project else self.account
        return submit_argv(
            script_path, after=after, array=array, partition=partition, account=account
        )

    def refused(self, result: Result) -> SchedulerError:
        if result.exit_code == 127:
            return SchedulerError(
                "sbatch is not installed where jobs are submitted",
                hint="is this a Slurm login node? set `scheduler` in the profile "
                "(pbs, slurm or local)",
                result=result,
            )
        return SchedulerError(
            f"sbatch refused the job: {result.said()}",
            hint="check the resource requests (time, memory, partition, account) in the script",
            result=result,
        )

    job_id_from = staticmethod(parse_submit)

    def cancellable(self, ids: list[str]) -> list[str]:
        # scancel exits 0 and prints nothing for an id it never knew (seen on 22.05), so ask
        # squeue first which ids exist, and cancel only those.
        known = self.status(ids)
        return [i for i in ids if i in known]

    cancel_command = staticmethod(cancel_argv)

    def cancel_failure(self, result: Result, ids: list[str]) -> list[str] | None:
        # scancel acts on each id of its list alone, so a failed call is not repeated per id.
        if unknown_job(result.stderr, result.exit_code):
            return []
        raise SchedulerError.failed(result)
