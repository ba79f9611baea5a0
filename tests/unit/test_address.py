from __future__ import annotations

import pytest

from hpcbridge.errors import AddressError
from hpcbridge.xnat import Address


@pytest.mark.parametrize(
    ("text", "parts", "depth"),
    [
        ("", (None, None, None, None), 0),
        ("PTV000", ("PTV000", None, None, None), 1),
        ("PTV000/Haofei01/", ("PTV000", "Haofei01", None, None), 2),
        ("PTV000/Haofei01/Haofei01_MR1/4", ("PTV000", "Haofei01", "Haofei01_MR1", "4"), 4),
        ("P/S/E/4.1", ("P", "S", "E", "4.1"), 4),
    ],
)
def test_parse(text: str, parts: tuple, depth: int) -> None:
    a = Address.parse(text)
    assert (a.project, a.subject, a.experiment, a.scan) == parts
    assert a.depth == depth
    assert str(a) == "/".join(p for p in parts if p)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("P/S/E/4/extra", "has 5 parts"),
        ("P//E", "empty subject part"),
        ("P/a b", "subject 'a b' may only hold"),
        ("P/S/E;rm -rf", "experiment 'E;rm -rf' may only hold"),
    ],
)
def test_bad_addresses(text: str, message: str) -> None:
    with pytest.raises(AddressError, match=message):
        Address.parse(text)
