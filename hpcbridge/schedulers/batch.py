"""The shared core of the batch schedulers (PBS, Slurm), after psij-python's batch executor.

This class runs every command and owns the workflow: submit, status and cancel. A scheduler
class only builds argv lists, parses what its commands print and answers a few questions (the
hooks below); it never touches the transport itself.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence

from hpcbridge.errors import SchedulerError
from hpcbridge.schedulers.base import JobStatus, Scheduler, chunk_ids, merge_array
from hpcbridge.schedulers.script import ScriptInfo
from hpcbridge.transport import Result, Transport

__all__ = ["BatchScheduler", "match_statuses"]

log = logging.getLogger(__name__)


def match_statuses(
    ids: Sequence[str], parsed: Mapping[str, JobStatus], keys: Callable[[str], list[str]]
) -> dict[str, JobStatus]:
    """The status of each of ``ids`` in ``parsed``: its own, or its array tasks' merged.

    ``keys(id)`` names the groups a reported id belongs to (a task to its array's); an id asked
    for is looked up by its first key when the scheduler did not report it as asked.
    """
    groups: dict[str, list[JobStatus]] = {}
    for native_id, status in parsed.items():
        for key in keys(native_id):
            groups.setdefault(key, []).append(status)
    found: dict[str, JobStatus] = {}
    for native_id in ids:
        if native_id in parsed:
            found[native_id] = parsed[native_id]
        elif members := groups.get(keys(native_id)[0]):
            found[native_id] = merge_array(native_id, members)
    return found


class BatchScheduler(Scheduler):
    """Jobs through a batch system's commands, run by the transport (here or on a login node).

    ``status`` asks for all ids in one call per chunk (:func:`chunk_ids`), merges an array's
    tasks into one status, and asks alone each id that a failed call left unexplained, so a live
    job is never taken for a vanished one. ``cancel`` cancels per chunk and, when a chunk's
    command fails in a way :meth:`cancel_failure` does not explain, id by id.
    """

    def __init__(self, transport: Transport, *, timeout: float = 60.0) -> None:
        super().__init__(transport)
        self.timeout = timeout

    # --- the hooks: argv lists and parsers, no I/O -------------------------------------------

    @abstractmethod
    def submit_command(
        self, script_path: str, after: list[str], array: str | None, info: ScriptInfo
    ) -> list[str]:
        """The argv submitting the script."""

    @abstractmethod
    def refused(self, result: Result) -> SchedulerError:
        """The error for a submission the scheduler refused, with what to check."""

    @abstractmethod
    def job_id_from(self, stdout: str) -> str:
        """The job id in what the submit command printed."""

    @abstractmethod
    def status_commands(self, ids: list[str]) -> list[list[str]]:
        """Ways to ask for the status of ``ids``, best first: the next is asked when the
        answer to one cannot be parsed."""

    @abstractmethod
    def statuses_from(self, argv: list[str], stdout: str) -> dict[str, JobStatus]:
        """Statuses keyed by the ids the scheduler printed, from the answer to ``argv``."""

    @abstractmethod
    def is_unknown(self, stderr: str, returncode: int) -> bool:
        """True when a status command failed only because the scheduler no longer knows an id."""

    def named_unknown(self, result: Result, ids: list[str]) -> set[str]:
        """Those of ``ids`` a failed status call says the scheduler does not know."""
        return set()

    def group_keys(self, native_id: str) -> list[str]:
        """See :func:`match_statuses`; a scheduler with arrays files tasks under their array."""
        return [native_id]

    @abstractmethod
    def cancel_command(self, ids: list[str]) -> list[str]:
        """The argv cancelling ``ids``."""

    def cancel_failure(self, result: Result, ids: list[str]) -> list[str] | None:
        """The ids a failed cancel did not know, or None when the failure says nothing of them
        (the base then cancels a group id by id, and raises for one id)."""
        return None

    def cancellable(self, ids: list[str]) -> list[str]:
        """The ids to cancel; the rest are reported unknown."""
        return ids

    @abstractmethod
    def find_command(self, name: str) -> list[str]:
        """The argv listing the jobs named ``name``."""

    @abstractmethod
    def found_from(self, stdout: str) -> list[str]:
        """Job ids from the find command's output, oldest first."""

    # --- the workflow ------------------------------------------------------------------------

    def _ready(self) -> None:
        """Called before any command is built: where a scheduler that learns its dialect from
        the system (PBS's flavour) asks it, so every hook after it is the right one."""

    def _run(self, argv: list[str]) -> Result:
        return self.transport.run(argv, timeout=self.timeout)

    def _submit(
        self, script_path: str, after: list[str], array: str | None, info: ScriptInfo
    ) -> str:
        self._ready()
        argv = self.submit_command(script_path, after, array, info)
        # Submission is not idempotent: never retried blindly. The job inherits the submitting
        # environment (sbatch --export=ALL, qsub's wrappers), so secrets are cleared from it.
        result = self.transport.run(
            self.transport.without_secrets(argv), timeout=self.timeout, retry=False
        )
        if not result.ok:
            raise self.refused(result)
        return self.job_id_from(result.stdout)

    def status(self, ids: Sequence[str]) -> dict[str, JobStatus]:
        self._ready()
        found: dict[str, JobStatus] = {}
        for group in chunk_ids(self.check_ids(ids)):
            found.update(self._status_group(group))
        return found

    def _status_group(self, ids: list[str]) -> dict[str, JobStatus]:
        result, parsed = self._ask_status(self.status_commands(ids))
        found = match_statuses(ids, parsed, self.group_keys)
        missing = [i for i in ids if i not in found]
        if not result.ok and len(ids) > 1 and missing:
            # A scheduler that stops at the first unknown id (or refuses the whole list) says
            # nothing of the rest: ask each one alone.
            named = self.named_unknown(result, missing)
            for native_id in missing:
                if native_id not in named:
                    found.update(self._status_group([native_id]))
        return found

    def _ask_status(self, commands: list[list[str]]) -> tuple[Result, dict[str, JobStatus]]:
        argv, *fallbacks = commands
        result = self._run(argv)
        self.status_calls += 1
        if not result.ok and not self.is_unknown(result.stderr, result.exit_code):
            raise SchedulerError.failed(result)
        try:
            return result, self.statuses_from(argv, result.stdout)
        except SchedulerError as exc:
            if not fallbacks:
                raise
            log.warning("%s; polling with plain %s", exc, " ".join(fallbacks[0][:2]))
            return self._ask_status(fallbacks)

    def cancel(self, ids: Sequence[str]) -> list[str]:
        self._ready()
        ids = self.check_ids(ids)
        live = self.cancellable(ids)
        unknown = [i for i in ids if i not in live]
        for group in chunk_ids(live):
            unknown += self._cancel_group(group)
        return unknown

    def _cancel_group(self, ids: list[str]) -> list[str]:
        argv = self.cancel_command(ids)
        result = self._run(argv)
        if result.ok:
            return []
        unknown = self.cancel_failure(result, ids)
        if unknown is not None:
            return unknown
        if len(ids) > 1:
            return [i for native_id in ids for i in self._cancel_group([native_id])]
        raise SchedulerError.failed(result)

    def find_jobs(self, *, name: str, work_dir: str | None = None) -> list[str]:
        self._ready()
        argv = self.find_command(name)
        result = self._run(argv)
        if not result.ok:
            raise SchedulerError.failed(result, f"could not look up jobs named {name}")
        return self.found_from(result.stdout)
