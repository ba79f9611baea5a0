"""Fixtures of the unit tests that run the bridge over fakes (tests/fakes.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes import Bridge

from hpcbridge.sandbox import SandboxServer


@pytest.fixture()
def make_bridge(sandbox: SandboxServer, isolated_home: Path) -> Iterator[Callable[..., Bridge]]:
    """``make_bridge(**profile)``: a :class:`Bridge` over its own fake cluster and this test's
    sandbox XNAT; closed at teardown."""
    made: list[Bridge] = []

    def make(**profile: Any) -> Bridge:
        made.append(Bridge(isolated_home, sandbox.url, sandbox.user, sandbox.password, **profile))
        return made[-1]

    yield make
    for bridge in made:
        bridge.close()


@pytest.fixture()
def bridge(make_bridge: Callable[..., Bridge]) -> Bridge:
    """A bridge with the default profile: PBS Pro."""
    return make_bridge()
