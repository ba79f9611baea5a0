"""The pure scheduler layer: argv lists to run and parsers for what the schedulers print.

No function here runs a command or touches a file; a transport (local or SSH) runs the argv.
Per-scheduler functions live in :mod:`.pbs` and :mod:`.slurm`.
"""

from hpcbridge.errors import SchedulerError
from hpcbridge.schedulers import pbs, slurm
from hpcbridge.schedulers.base import JobStatus, State, chunk_ids

__all__ = ["JobStatus", "SchedulerError", "State", "chunk_ids", "pbs", "slurm"]
