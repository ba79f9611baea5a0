"""Talking to XNAT: the client (one server session per run), addresses and browsing."""

from __future__ import annotations

import os

from ..config import Settings
from ..errors import ConfigError
from .address import Address
from .client import Credentials, XnatClient, raise_for_response

__all__ = ["Address", "Credentials", "XnatClient", "connect", "raise_for_response"]


def connect(settings: Settings) -> XnatClient:
    """A client for the profile's XNAT (the running sandbox for ``xnat = "sandbox"``)."""
    if not settings.xnat:
        raise ConfigError(
            "no XNAT server configured",
            hint="use `--profile sandbox` after `hpcbridge sandbox start`, or set HPCBRIDGE_XNAT",
        )
    if settings.xnat == "sandbox":
        from ..sandbox.control import SandboxPaths, read_ready

        info = read_ready(SandboxPaths.under(settings.home).ready)
        return XnatClient(
            info["url"], Credentials(info["user"], info["password"]), timeout=settings.timeout
        )
    secret = os.environ.get("HPCBRIDGE_PASSWORD") or os.environ.get("XNAT_PASS")
    user = settings.user or os.environ.get("XNAT_USER")
    creds = Credentials(user, secret) if user and secret else None
    return XnatClient(settings.xnat, creds, timeout=settings.timeout, verify=settings.verify_tls)
