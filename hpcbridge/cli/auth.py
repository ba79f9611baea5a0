"""``hpcbridge login``, ``logout`` and ``whoami``: alias tokens instead of passwords."""

from __future__ import annotations

import sys
import time

import click

from ..config import check_xnat_url
from ..credentials import LoginRefusals, Secret, SessionCache, TokenStore, resolve
from ..errors import CredentialError, PartialFailure, XnatError
from ..xnat import XnatClient
from ..xnat.client import expiry_text
from .app import main, settings_of
from .output import echo, emit_json, warn
from .server import connect, resolve_url

DAY_MS = 24 * 3600 * 1000


def _read_secret(from_stdin: bool, prompt: str) -> str:
    """A secret from stdin (first line) or a hidden prompt; never from argv."""
    if from_stdin:
        secret = sys.stdin.readline().rstrip("\r\n")
    else:
        secret = click.prompt(prompt, hide_input=True, default="", show_default=False)
    if not secret:
        raise CredentialError(f"no {prompt.lower()} given")
    return secret


def _resolve_url(ctx: click.Context, url: str | None) -> tuple[str, bool]:
    """The server to log in or out of, and whether plain http to it is allowed."""
    settings = settings_of(ctx)
    if url is not None:
        url = check_xnat_url(
            url, allow_insecure_http=settings.allow_insecure_http, origin="option --xnat"
        )
    return resolve_url(settings, url)


@main.command("login", short_help="Swap your password for a stored XNAT alias token.")
@click.option("--xnat", "url", metavar="URL", help="XNAT server [default: the profile's].")
@click.option("--user", metavar="NAME", help="XNAT user name [default: the profile's, or ask].")
@click.option(
    "--password-stdin", is_flag=True, help="Read the password (or token secret) from stdin."
)
@click.option(
    "--alias",
    metavar="ALIAS",
    help="Store an alias token made in XNAT's web UI (single sign-on users); its "
    "secret is read from a prompt or stdin.",
)
@click.pass_context
def login_command(
    ctx: click.Context, url: str | None, user: str | None, password_stdin: bool, alias: str | None
) -> None:
    """Log in once: swap your password for an XNAT alias token, stored 0600.

    The password is used for one request and never stored; later commands use the token
    (valid for the server's token lifetime, 2 days by default) and one cached server session.

    \b
    Examples:
      hpcbridge login --xnat https://xnat.example.org --user alice
      hpcbridge login --xnat URL --user alice --password-stdin < secret.txt
      hpcbridge login --xnat https://xnat.example.org --alias 61e4f5db-33e0-4f06-86e7-a59217d65f5c
    """
    settings = settings_of(ctx)
    url, insecure_ok = _resolve_url(ctx, url)
    if alias:
        secret = Secret(alias, _read_secret(password_stdin, "Token secret"), "token")
    else:
        name = user or settings.user or click.prompt("XNAT user")
        secret = Secret(name, _read_secret(password_stdin, "Password"), "password")
    refusals = LoginRefusals.under(settings.home)
    with XnatClient(
        url,
        secret,
        timeout=settings.timeout,
        verify=settings.tls_verify,
        allow_insecure_http=insecure_ok,
        refusals=refusals,
    ) as client:
        # Always tried, unlike other commands: this is how a refused password is replaced.
        client.login(retry_refused=True)
        if alias:
            owner, token_alias, token_secret = client.whoami(), alias, secret.secret
            expires = client.token_expiry(alias)
        else:
            token = client.issue_token()
            owner, token_alias, token_secret = secret.user, token["alias"], token["secret"]
            expires = token.get("estimatedExpirationTime")
    TokenStore.under(settings.home).put(
        url,
        user=owner,
        alias=token_alias,
        secret=token_secret,
        expires=int(expires) if isinstance(expires, (int, float)) else None,
    )
    # Whatever was refused at this server before (a cron job's old password, an old token)
    # gets its chance again.
    refusals.clear(url)
    if settings.json:
        emit_json({"server": url, "user": owner, "token_expires": expires})
        return
    until = f"expires {expiry_text(expires)}" if expires else "expiry unknown"
    echo(f"logged in to {url} as {owner}; alias token stored ({until})")


@main.command("logout", short_help="Invalidate the stored token and forget it.")
@click.pass_context
def logout_command(ctx: click.Context) -> None:
    """Invalidate the stored token on the server and delete it and the cached session.

    \b
    Example:
      hpcbridge logout
    """
    settings = settings_of(ctx)
    url, insecure_ok = _resolve_url(ctx, None)
    store = TokenStore.under(settings.home)
    creds = resolve(url, user=settings.user, home=settings.home)
    if creds is None:
        raise CredentialError(f"not logged in to {url}", hint=f"run `hpcbridge login --xnat {url}`")
    cache = SessionCache.under(settings.home)
    problem = None
    with XnatClient(
        url,
        creds,
        timeout=settings.timeout,
        verify=settings.tls_verify,
        session_cache=cache,
        allow_insecure_http=insecure_ok,
    ) as client:
        try:
            if creds.is_token:
                client.invalidate_token(creds.user)
            client.logout()
        except XnatError as exc:
            problem = exc.message
        finally:
            cache.delete(url, creds.user)
    removed = creds.is_token and store.delete(url)
    if problem:
        raise PartialFailure(
            f"local credentials deleted, but the server could not be told: {problem}"
        )
    what = "alias token invalidated and deleted" if removed else "server session ended"
    echo(f"logged out of {url}: {what}")


@main.command("whoami", short_help="Server, XNAT user and token expiry.")
@click.pass_context
def whoami_command(ctx: click.Context) -> None:
    """Show the server, the XNAT user, and when the stored token expires.

    \b
    Example:
      hpcbridge whoami
    """
    settings = settings_of(ctx)
    with connect(settings) as client:
        user, creds, server = client.whoami(), client.credentials, client.base
    expires = creds.expires_ms if creds is not None and creds.is_token else None
    source = creds.source if creds is not None else "none"
    auth = {
        "token": "alias token",
        "environment": "password from environment",
        "netrc": "password from ~/.netrc",
    }.get(source, source)
    if settings.json:
        emit_json({"server": server, "user": user, "auth": auth, "token_expires": expires})
    else:
        echo(f"server  {server}")
        echo(f"user    {user}")
        echo(f"auth    {auth}")
        if expires:
            echo(f"expires {expiry_text(expires)}")
    if expires and expires - time.time() * 1000 < DAY_MS:
        warn(f"the alias token expires {expiry_text(expires)}; run `hpcbridge login` to renew it")
