"""An XNAT-compatible server for tests, demos and dry runs (``hpcbridge sandbox serve``).

It speaks the subset of XNAT 1.8's REST API that hpcbridge and xnatpy use, over real HTTP on
loopback, with XNAT's authentication, session limits and response shapes. docs/sandbox.md says
what it implements and where it knowingly differs from a real XNAT.
"""

from .auth import AuthSettings
from .http import Faults
from .server import SandboxServer

__all__ = ["AuthSettings", "Faults", "SandboxServer"]
