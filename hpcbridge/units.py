"""Sizes as people read them, and the one timestamp format every record uses."""

from __future__ import annotations

from datetime import datetime, timezone

#: UTC to the second, as in every JSON record and ledger row: ``2026-11-26T01:12:49Z``.
UTC_STAMP = "%Y-%m-%dT%H:%M:%SZ"


def utc_stamp() -> str:
    """Now, in :data:`UTC_STAMP` form."""
    return datetime.now(timezone.utc).strftime(UTC_STAMP)


def parse_utc_stamp(text: str) -> datetime:
    """A :data:`UTC_STAMP` back into an aware datetime; ValueError if it is not one."""
    return datetime.strptime(text, UTC_STAMP).replace(tzinfo=timezone.utc)


def human_size(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``; bytes stay whole."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
