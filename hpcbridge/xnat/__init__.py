"""Talking to XNAT: the client (one server session per run), addresses, models and browsing."""

from __future__ import annotations

from ..config import Settings, check_xnat_url
from ..credentials import LoginRefusals, Secret, SessionCache, TokenStore, resolve
from ..errors import ConfigError, CredentialError, Step
from .address import Address  # noqa: F401
from .client import XnatClient, raise_for_response  # noqa: F401


def server_url(settings: Settings) -> str:
    """The XNAT the settings point at: the profile's, else the server of the last login."""
    if settings.xnat:
        return settings.xnat  # checked when the settings were read
    store = TokenStore.under(settings.home)
    url = store.default_server()
    if not url:
        raise ConfigError("no XNAT server configured", step=Step.CHOOSE_SERVER)
    # A login by an older hpcbridge may have stored a URL today's rules refuse.
    return check_xnat_url(
        url,
        allow_insecure_http=settings.allow_insecure_http,
        origin=f"{store.path} (the server of the last login)",
    )


def connect(
    settings: Settings, *, cache_session: bool = True, secret: Secret | None = None
) -> XnatClient:
    """A client for the settings' XNAT, with ``secret`` or else the credentials found for it
    (see credentials.py).

    With ``cache_session`` the server session is kept for the next run instead of ended.
    """
    url = server_url(settings)
    if url == "sandbox":
        # The sandbox profile names a server that only the command line starts and finds.
        raise ConfigError(
            "the XNAT URL 'sandbox' names the sandbox server, not an address",
            hint="connect to the sandbox's URL with its user and password",
        )
    if secret is None:
        secret = resolve(url, user=settings.user, home=settings.home)
    if secret is None:
        raise CredentialError(f"no credentials for {url}", step=Step.LOGIN_AT, url=url)
    cache = SessionCache.under(settings.home) if cache_session else None
    return XnatClient(
        url,
        secret,
        timeout=settings.timeout,
        verify=settings.tls_verify,
        session_cache=cache,
        allow_insecure_http=settings.allow_insecure_http,
        refusals=LoginRefusals.under(settings.home),
    )
