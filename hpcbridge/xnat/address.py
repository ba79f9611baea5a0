"""XNAT addresses as users type them: ``PROJECT[/SUBJECT[/EXPERIMENT[/SCAN]]]``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import AddressError

# XNAT's own ID rule (XftStringUtils.REGEX_VALID_ID); scan IDs may also hold dots ("4.1").
_LABEL = re.compile(r"^[A-Za-z0-9_-]+$")
_SCAN = re.compile(r"^[A-Za-z0-9_.-]+$")
_LEVELS = ("project", "subject", "experiment", "scan")


@dataclass(frozen=True)
class Address:
    project: str | None = None
    subject: str | None = None
    experiment: str | None = None
    scan: str | None = None

    @property
    def depth(self) -> int:
        return sum(1 for part in (self.project, self.subject, self.experiment, self.scan) if part)

    def __str__(self) -> str:
        return "/".join(p for p in (self.project, self.subject, self.experiment, self.scan) if p)

    @classmethod
    def parse(cls, text: str | None) -> Address:
        """Parse an address; an empty one means the whole server."""
        if text is None or not text.strip("/"):
            return cls()
        parts = text.strip().strip("/").split("/")
        if len(parts) > len(_LEVELS):
            raise AddressError(
                f"address {text!r} has {len(parts)} parts; expected at most "
                "PROJECT/SUBJECT/EXPERIMENT/SCAN"
            )
        for level, part in zip(_LEVELS[: len(parts)], parts, strict=True):
            pattern = _SCAN if level == "scan" else _LABEL
            if not part:
                raise AddressError(f"address {text!r} has an empty {level} part")
            if not pattern.match(part):
                raise AddressError(
                    f"address {text!r}: {level} {part!r} may only hold letters, digits, '_' and '-'"
                )
        return cls(*parts)  # type: ignore[arg-type]
