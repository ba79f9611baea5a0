"""The checks every scheduler applies to what it puts on a command line: job ids, option values
and array ranges. Argv elements need no quoting, but a value starting with "-" would be read as
another option, and odd characters mean a caller bug, so values are kept conservative.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from hpcbridge.errors import SchedulerError

__all__ = ["check_array", "check_ids", "check_value"]

_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@+-]*$")
# 1-10, 1-10:2, 1,3,5, 1-100%4 (a throttle): the forms qsub -J/-t and sbatch --array share.
_ARRAY_SPEC = re.compile(r"^\d[\d,:%-]*$")


def check_value(command: str, what: str, value: str) -> str:
    """``value``, or a SchedulerError: "invalid queue for qsub: '-x'"."""
    if not _SAFE_VALUE.match(value):
        raise SchedulerError(f"invalid {what} for {command}: {value!r}")
    return value


def check_array(command: str, spec: str) -> str:
    """An array range ``command`` understands, or a SchedulerError."""
    if not _ARRAY_SPEC.match(spec):
        raise SchedulerError(f"invalid array range for {command}: {spec!r}")
    return spec


def check_ids(scheduler: str, pattern: re.Pattern[str], ids: Sequence[str]) -> list[str]:
    """The ids, or a SchedulerError naming those that ``scheduler`` could never have issued."""
    bad = [i for i in ids if not pattern.match(i)]
    if bad:
        raise SchedulerError(f"not {scheduler} job ids: {', '.join(map(repr, bad))}")
    return list(ids)
