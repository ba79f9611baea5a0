"""The XNAT a command talks to: the profile's server, or the sandbox that ``sandbox start`` runs.

The library knows servers by URL only; the built-in ``sandbox`` profile (``xnat = "sandbox"``)
is resolved here, from the sandbox's ready-file, so that nothing outside the command line and
the sandbox itself imports :mod:`hpcbridge.sandbox`.
"""

from __future__ import annotations

import dataclasses

from ..config import Settings
from ..credentials import Secret
from ..sandbox.control import SandboxPaths, read_ready
from ..xnat import XnatClient, server_url
from ..xnat import connect as connect_url


def sandbox_server(settings: Settings) -> tuple[str, Secret]:
    """The running sandbox's URL and its throwaway admin credentials."""
    info = read_ready(SandboxPaths.under(settings.home).ready)
    return str(info["url"]), Secret(info["user"], info["password"], "sandbox")


def resolve_url(settings: Settings, url: str | None = None) -> tuple[str, bool]:
    """The server a command means, and whether plain http to it is allowed."""
    url = url or server_url(settings)
    if url == "sandbox":
        # The sandbox speaks only http, with a throwaway password, also when `sandbox start
        # --host` made it listen beyond loopback (and warned then).
        return sandbox_server(settings)[0].rstrip("/"), True
    return url.rstrip("/"), settings.allow_insecure_http


def connect(settings: Settings, *, cache_session: bool = True) -> XnatClient:
    """:func:`hpcbridge.xnat.connect`, with the sandbox profile resolved to the sandbox."""
    if server_url(settings) != "sandbox":
        return connect_url(settings, cache_session=cache_session)
    url, secret = sandbox_server(settings)
    settings = dataclasses.replace(settings, xnat=url, allow_insecure_http=True)
    return connect_url(settings, cache_session=cache_session, secret=secret)
