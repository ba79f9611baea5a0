"""The scheduler layer: :mod:`.batch` owns submit, status and cancel for the batch systems,
whose argv lists and parsers live in :mod:`.pbs_commands` and :mod:`.slurm_commands` (no I/O);
:mod:`.local` is the embedded scheduler for machines without one.
"""

from hpcbridge.errors import SchedulerError
from hpcbridge.schedulers import pbs, slurm
from hpcbridge.schedulers.base import JobStatus, State, chunk_ids

__all__ = ["JobStatus", "SchedulerError", "State", "chunk_ids", "pbs", "slurm"]
