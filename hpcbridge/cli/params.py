"""Option types shared by the commands."""

from __future__ import annotations

import math
from typing import Any

import click

#: Longer than any wait, interval or lifetime anyone means; small enough that time.sleep() and
#: datetime arithmetic never overflow on it.
MAX_SECONDS = 366 * 24 * 3600.0


class Number(click.FloatRange):
    """A float within a range that is also finite.

    click's FloatRange lets ``nan`` through every bound (nan compares false with everything) and
    ``inf`` through an open top: ``--interval nan`` would spin, ``--max-ratio nan`` would switch
    the zip-bomb check off, ``--timeout 1e300`` would overflow ``time.sleep``.
    """

    name = "number"

    def __init__(
        self, min: float | None = None, max: float | None = MAX_SECONDS, *, min_open: bool = False
    ) -> None:
        super().__init__(min=min, max=max, min_open=min_open)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not math.isfinite(_float_or_zero(value)):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(value, param, ctx)


def _float_or_zero(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.0  # not a number at all: FloatRange's own message says so


#: Seconds of waiting or polling: above zero, finite, at most a year.
SECONDS = Number(min=0, min_open=True)


def seconds_option(flag: str, help: str, **kwargs: Any) -> Any:
    """An option of :data:`SECONDS`, such as ``--interval``."""
    return click.option(flag, type=SECONDS, metavar="SECONDS", help=help, **kwargs)
