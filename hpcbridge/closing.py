"""``Closing``: the handles a command holds (a transport, an XNAT client, the ledger) are
context managers whose exit closes them."""

from __future__ import annotations

from typing import TypeVar

_C = TypeVar("_C", bound="Closing")


class Closing:
    def close(self) -> None:
        """Release what the handle holds; the default holds nothing."""

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
