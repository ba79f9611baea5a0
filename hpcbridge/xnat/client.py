"""The XNAT client: one HTTP session and one server session per run.

Scripting XNAT the naive way (Basic credentials on every request) opens a new Tomcat session per
request, and about a thousand live sessions lock a user out (see docs/authentication.md). This
client authenticates once (``POST /data/JSESSION`` with Basic credentials), then sends only the
JSESSIONID cookie. When the server says the session is gone (401, or an HTML login page with
status 200) it logs in again once and repeats the request. With a session cache the JSESSIONID
outlives the process, so a shell loop of many ``hpcbridge`` calls shares one server session too;
without one the session is ended (``DELETE /data/JSESSION``) on close.

An XNAT that allows guests never answers 401 for a dead session: it serves the request as its
guest user, who sees no private project (404) and may change nothing (403). So a 403 or 404 on a
session not proven ours in the last minute (by its login or by this check) costs one
``GET /data/auth``, and if that names the guest, a new login and the request again, once.

Logins that XNAT refuses are recorded (``LoginRefusals``), and the same secret is not sent again
until ``hpcbridge login`` succeeds: XNAT locks an account after some failed logins in a row, and
an unattended job retrying a wrong password would keep its user locked out.
"""

from __future__ import annotations

import json
import logging
import re
import ssl
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests

from ..config import check_xnat_url, display_url, insecure_http
from ..credentials import LoginRefusals, Secret, SessionCache
from ..errors import (
    XnatAuthError,
    XnatConflictError,
    XnatConnectionError,
    XnatError,
    XnatNotFoundError,
    XnatPermissionError,
    XnatServerError,
)

log = logging.getLogger(__name__)

RETRY_STATUSES = (502, 503, 504)
USER_AGENT = "hpcbridge"
LOGIN_HINT = "run `hpcbridge login`"
#: Same-origin redirects followed per request (XNAT's trailing-slash and context-path ones).
MAX_REDIRECTS = 5
TLS_HELP = "see docs/troubleshooting.md#tls"
#: The user XNAT serves requests without a live session as, where the site allows guests.
GUEST_USER = "guest"
#: How long a session proven ours (by a login, or by a look at /data/auth) is trusted to still be
#: ours when XNAT answers 403 or 404; at most half the server's idle timeout where XNAT says it.
#: Without it, every expected 404 (a resource that stage-out is about to create, the walk up an
#: address that names something missing) would cost one more request.
TRUST_SECONDS = 60.0

Origin = tuple[str, str, int | None]
_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_of(url: str) -> Origin:
    """(scheme, host, port) with the scheme's default port filled in; what cookies and
    credentials are bound to here. A port that is not a number gives an origin no URL has."""
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        return scheme, (parts.hostname or "").lower(), parts.port or _DEFAULT_PORTS.get(scheme)
    except ValueError:  # "http://[bad", "https://host:99999"
        return "", "", -1


class _NoAuth(requests.auth.AuthBase):
    """Session-wide "no Authorization header". Without an auth of its own, a requests session
    adds ~/.netrc's password for the host to every request (and to every redirect target), and
    this client sends credentials on exactly one request: the login."""

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        return r


def looks_like_login_page(resp: requests.Response) -> bool:
    """XNAT answers browser-like clients with its HTML login page and status 200."""
    if "html" not in resp.headers.get("Content-Type", "").lower():
        return False
    head = resp.text[:4000].lower()
    return "login" in head and ("<form" in head or "password" in head)


def _excerpt(resp: requests.Response, limit: int = 200) -> str:
    text = resp.text or ""
    # Tomcat pages carry the reason after <b>Message</b> (their <h3> is the server name);
    # Restlet status pages carry it in <h3>.
    for start, end in (("<b>Message</b>", "</p>"), ("<h3>", "</h3>")):
        i = text.find(start)
        if i >= 0:
            j = text.find(end, i + len(start))
            if j > i:
                return text[i + len(start) : j].strip()[:limit]
    return " ".join(text.split())[:limit]


def raise_for_response(resp: requests.Response, what: str) -> None:
    """Map an unsuccessful answer to a typed error naming ``what`` was asked for.

    ``what`` must not contain secrets; the URL kept on the error has its query removed.
    """
    status = resp.status_code
    login_page = looks_like_login_page(resp)
    if status < 300 and not login_page:
        return
    url = resp.url.split("?")[0]
    if status == 401 or (status < 300 and login_page):
        raise XnatAuthError(
            f"XNAT refused the session or credentials ({what})",
            hint=LOGIN_HINT,
            status=status,
            url=url,
        )
    excerpt = _excerpt(resp)
    detail = f": {excerpt}" if excerpt else ""
    if status == 403:
        raise XnatPermissionError(
            f"not allowed: {what}{detail}",
            hint="`hpcbridge whoami` shows who you are logged in as; ask the project's owner "
            "for access",
            status=status,
            url=url,
        )
    if status == 404:
        raise XnatNotFoundError(f"not found: {what}", status=status, url=url)
    if status == 409:
        raise XnatConflictError(f"conflict: {what}{detail}", status=status, url=url)
    if status in RETRY_STATUSES or status == 429:
        raise XnatServerError(
            f"XNAT is unavailable ({status} for {what}){detail}",
            hint="try again later",
            status=status,
            url=url,
            retry_after=retry_after(resp),
        )
    raise XnatServerError(f"XNAT answered {status} for {what}{detail}", status=status, url=url)


def retry_after(resp: requests.Response) -> float | None:
    """The seconds a Retry-After header asks for (a number or an HTTP date), if it is valid."""
    value = resp.headers.get("Retry-After", "").strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - time.time())


def expiry_text(ms: int | float, now: float | None = None) -> str:
    """'on 2026-11-27 21:00 UTC (in 1 day 23 h)' for an epoch-ms time."""
    when = datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    left = ms / 1000 - (time.time() if now is None else now)
    if left <= 0:
        return f"on {when} (expired)"
    days, rest = divmod(int(left), 86400)
    hours, rest = divmod(rest, 3600)
    span = (
        f"{days} day{'s' if days != 1 else ''} {hours} h"
        if days
        else (f"{hours} h {rest // 60} min" if hours else f"{rest // 60} min")
    )
    return f"on {when} (in {span})"


class XnatClient:
    """A context manager holding one requests session and one XNAT server session."""

    def __init__(
        self,
        url: str,
        credentials: Secret | None,
        *,
        timeout: float = 60.0,
        verify: bool | str = True,
        retries: int = 3,
        backoff: float = 0.5,
        session_cache: SessionCache | None = None,
        allow_insecure_http: bool = False,
        refusals: LoginRefusals | None = None,
    ) -> None:
        self.base = check_xnat_url(url, allow_insecure_http=allow_insecure_http).rstrip("/")
        self.origin = origin_of(self.base)
        self.credentials = credentials
        self.timeout = timeout
        #: requests' ``verify`` (False, a CA bundle, or True), given on every request: set on
        #: the session instead, REQUESTS_CA_BUNDLE would override a False or a CA bundle.
        self.verify = verify
        self.retries = retries
        self.backoff = backoff
        self.session_cache = session_cache
        self.refusals = refusals
        self.http = requests.Session()
        self.http.verify = verify
        self.http.auth = _NoAuth()
        self.http.headers["User-Agent"] = USER_AGENT
        self._warned_clear_text = False
        self.session_id: str | None = None
        self._proven_at: float | None = None  # time.monotonic() of the last proof
        self.logins = 0  # server sessions this client opened
        #: Answers that cannot change while this client lives (an experiment's ID for its
        #: label), kept so that a run asks once per session, not once per scan and step.
        self.memo: dict[str, Any] = {}

    def __enter__(self) -> XnatClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- session -------------------------------------------------------------------------
    def _use_session(self, session_id: str) -> None:
        self.http.cookies.clear()
        self.http.cookies.set("JSESSIONID", session_id)
        self.session_id = session_id
        self._proven_at = None

    def _warn_clear_text(self) -> None:
        if insecure_http(self.base) and not self._warned_clear_text:
            self._warned_clear_text = True
            log.warning(
                "%s sends your password, token and XNAT session in clear text: anyone on the "
                "network path can read and reuse them (allow_insecure_http is set; use https "
                "if the server offers it)",
                self.base,
            )

    def _resume_or_login(self) -> None:
        if self.session_id is not None:
            return
        self._warn_clear_text()
        creds = self.credentials
        cached = (
            self.session_cache.get(self.base, creds.user)
            if self.session_cache is not None and creds is not None
            else None
        )
        if cached:
            log.debug("reusing the cached XNAT session")
            self._use_session(cached)
        else:
            self._renew(adopt=True)

    def _renew(self, *, adopt: bool) -> bool:
        """A new session for a missing or dead one: with ``adopt``, the one a sibling sharing
        the session cache has just opened, if it has (True); else a login (False). See
        SessionCache.renewal: a chain's jobs that find the session dead together open one."""
        creds = self.credentials
        if self.session_cache is None or creds is None:
            self.login()
            return False
        with self.session_cache.renewal(self.base, creds.user, self.session_id) as newer:
            if adopt and newer:
                log.debug("using the XNAT session another process has just opened")
                self._use_session(newer)
                return True
            self.login()
            return False

    def login(self, *, retry_refused: bool = False) -> None:
        """Open a server session with the credentials (the only request that sends them).

        A secret that XNAT refused before is not sent again (see :class:`LoginRefusals`)
        unless ``retry_refused`` (``hpcbridge login``, where someone types it).
        """
        creds = self.credentials
        if creds is None:
            raise XnatAuthError(f"no credentials for {self.base}", hint=LOGIN_HINT)
        if self.refusals is not None and not retry_refused:
            refused = self.refusals.get(self.base, creds.user, creds.secret)
            if refused is not None:
                raise XnatAuthError(
                    f"XNAT refused the {_credential_kind(creds)} for {_who(creds)} at "
                    f"{self.base} {_when(refused.refused_at)}; not trying again, to keep XNAT "
                    "from locking the account",
                    hint=LOGIN_HINT,
                    url=self.base,
                )
        self._warn_clear_text()
        self.http.cookies.clear()
        resp = self._send("POST", "/data/JSESSION", auth=(creds.user, creds.secret))
        if resp.status_code == 401 or looks_like_login_page(resp):
            if self.refusals is not None:
                self.refusals.put(self.base, creds.user, creds.secret, source=creds.source)
            raise self._refused(creds, resp.status_code)
        raise_for_response(resp, f"login at {self.base}")
        session_id = resp.cookies.get("JSESSIONID") or resp.text.strip()
        if not session_id or len(session_id) > 200 or " " in session_id:
            raise XnatServerError(
                f"XNAT at {self.base} did not open a session",
                status=resp.status_code,
                url=self.base,
            )
        self._use_session(session_id)
        self._proven_at = time.monotonic()
        self.logins += 1
        if self.refusals is not None:
            self.refusals.clear(self.base, creds.user)
        if self.session_cache is not None:
            self.session_cache.put(self.base, creds.user, session_id)

    def _refused(self, creds: Secret, status: int) -> XnatAuthError:
        if creds.is_token and creds.expired():
            return XnatAuthError(
                f"the alias token stored for {self.base} expired "
                f"{expiry_text(creds.expires_ms or 0)}",
                hint=LOGIN_HINT,
                status=status,
                url=self.base,
            )
        if creds.is_token:
            return XnatAuthError(
                f"XNAT at {self.base} refused the stored alias token "
                "(invalidated or expired on the server)",
                hint=LOGIN_HINT,
                status=status,
                url=self.base,
            )
        return XnatAuthError(
            f"XNAT at {self.base} refused the credentials of {creds.user} (from {creds.source}); "
            "wrong password, locked account, or too many open sessions",
            hint=LOGIN_HINT,
            status=status,
            url=self.base,
        )

    def logout(self) -> None:
        """End the server session now, cached or not, and forget it."""
        if self.session_id is not None:
            try:
                self._send("DELETE", "/data/JSESSION")
            except XnatError as exc:
                log.debug("ending the XNAT session failed: %s", exc)
        if self.session_cache is not None and self.credentials is not None:
            self.session_cache.delete(self.base, self.credentials.user)
        self.session_id = None

    def close(self) -> None:
        """End the server session unless it is cached for the next run; close HTTP."""
        if self.session_id is not None and self.session_cache is None:
            self.logout()
        self.http.close()

    # -- requests ------------------------------------------------------------------------
    def _send(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """One request, retried with backoff only when that is safe (GET/HEAD)."""
        attempts = self.retries + 1 if method in ("GET", "HEAD") else 1
        url = self.base + path
        for attempt in range(attempts):
            try:
                resp = self._follow(method, url, kwargs)
            except requests.exceptions.SSLError as exc:
                # Before ConnectionError, its base class: a certificate does not get better
                # by asking again, and its reason must be told whole.
                raise _tls_error(exc, self.base) from None
            except requests.ConnectionError as exc:
                if attempt + 1 < attempts:
                    self._pause(attempt, f"connection failed ({_reason(exc)})")
                    continue
                raise XnatConnectionError(
                    f"cannot reach XNAT at {self.base}: {_reason(exc)}",
                    hint="check the URL with `hpcbridge config show`, and that this machine "
                    "can reach the server",
                    url=self.base,
                ) from None
            except requests.Timeout:
                raise XnatConnectionError(
                    f"XNAT at {self.base} did not answer within {self.timeout:g} s", url=self.base
                ) from None
            if resp.status_code in RETRY_STATUSES and attempt + 1 < attempts:
                self._pause(attempt, f"XNAT answered {resp.status_code}")
                continue
            return resp
        raise AssertionError("unreachable")

    def _follow(self, method: str, url: str, kwargs: dict[str, Any]) -> requests.Response:
        """Send, following redirects within the XNAT origin only.

        requests would follow any redirect, and its session's cookie jar sends a cookie set
        without a domain (the JSESSIONID) to every host, and a host's cookie to any port and to
        plain http. So redirects are followed here, and every request this client sends goes
        through this one check of its origin (scheme, host and port): the session cookie and
        the login's Authorization header reach the configured XNAT and nothing else.
        """
        first = urlsplit(url).path
        for _ in range(MAX_REDIRECTS + 1):
            # Checked on the URL as requests will send it too: its parser and urlsplit may
            # read an odd URL's host differently.
            if {origin_of(url), origin_of(_as_sent(url))} != {self.origin}:
                # A path from a listing ("@evil.example/...", ".evil.example/...") can move
                # the host when appended to the base URL.
                raise XnatServerError(
                    f"refusing to send {method} {display_url(url)}: it is not on XNAT at "
                    f"{self.base}",
                    url=self.base,
                )
            resp = self.http.request(
                method,
                url,
                timeout=self.timeout,
                verify=self.verify,
                allow_redirects=False,
                **kwargs,
            )
            if not resp.is_redirect:
                return resp
            target = urljoin(resp.url, resp.headers["Location"])
            resp.close()
            if origin_of(target) != self.origin:
                raise self._refused_redirect(method, first, target, resp.status_code)
            method, kwargs = _redirected(method, resp.status_code, kwargs)
            url = target
        raise XnatServerError(
            f"XNAT at {self.base} redirected {method} {first} more than {MAX_REDIRECTS} times",
            status=resp.status_code,
            url=self.base,
        )

    def _refused_redirect(self, method: str, path: str, target: str, status: int) -> XnatError:
        scheme = origin_of(target)[0]
        if scheme == "http" and self.origin[0] == "https":
            why = "from https to plain http"
            hint = (
                "a server or proxy that sends https requests to plain http is misconfigured: "
                "tell the XNAT administrators"
            )
        else:
            why = "another origin"
            hint = (
                "if the XNAT administrators say the server has moved there, set "
                f"xnat = {json.dumps(_root(target))} in the profile"
                if scheme == "https"
                else "tell the XNAT administrators"
            )
        return XnatError(
            f"XNAT at {self.base} redirected {method} {path} to {display_url(target)}: {why}; "
            "refusing to follow it with your credentials",
            hint=hint,
            status=status,
            url=self.base,
        )

    def _pause(self, attempt: int, why: str) -> None:
        delay = self.backoff * 2**attempt
        log.info("%s; retrying in %.1f s", why, delay)
        time.sleep(delay)

    def request(self, method: str, path: str, what: str, **kwargs: Any) -> requests.Response:
        """An authenticated request; logs in again once if the session has gone."""
        self._resume_or_login()
        resp = self._send(method, path, **kwargs)
        if resp.status_code == 401 or looks_like_login_page(resp):
            log.info("XNAT session expired; logging in again")
            resp = self._again(resp, method, path, kwargs)
        elif (
            resp.status_code in (403, 404)
            and self.credentials is not None
            and not self._trusted()
            and self._session_lost()
        ):
            log.info("XNAT took the session for its guest user (it expired); logging in again")
            resp = self._again(resp, method, path, kwargs)
        raise_for_response(resp, what)
        return resp

    def _again(
        self, resp: requests.Response, method: str, path: str, kwargs: dict[str, Any]
    ) -> requests.Response:
        """The request once more, on a new session."""
        resp.close()
        self._rewind(kwargs.get("data"))
        if self._renew(adopt=True):
            resp = self._send(method, path, **kwargs)
            if not (
                resp.status_code == 401
                or looks_like_login_page(resp)
                or (resp.status_code in (403, 404) and self._session_lost())
            ):
                return resp
            # the sibling's session is gone too: a login of this process's own
            resp.close()
            self._rewind(kwargs.get("data"))
            self._renew(adopt=False)
        return self._send(method, path, **kwargs)

    def _trusted(self) -> bool:
        """Whether the session was proven ours so recently that it cannot have expired."""
        if self._proven_at is None:
            return False
        window = TRUST_SECONDS
        # "<now ms>,<idle timeout ms>", quoted by the container because of the comma.
        stamps = [c.value for c in self.http.cookies if c.name == "SESSION_EXPIRATION_TIME"]
        stamp = (stamps[-1] or "").strip('"') if stamps else ""
        idle_ms = stamp.partition(",")[2]
        if idle_ms.isdigit():
            window = min(window, int(idle_ms) / 2000)
        return time.monotonic() - self._proven_at < window

    def _session_lost(self) -> bool:
        """Whether XNAT now serves this session as someone else than us: its guest user, or
        nobody (401). Anything else, or no answer, leaves the first answer standing."""
        try:
            resp = self._send("GET", "/data/auth")
        except XnatError as exc:
            log.debug("could not ask XNAT who is logged in: %s", exc)
            return False
        with resp:
            if resp.status_code == 401 or looks_like_login_page(resp):
                return True
            name = _user_of(resp.text) if resp.status_code == 200 else None
        if name is None:
            return False
        if name.lower() == GUEST_USER:
            return True
        self._proven_at = time.monotonic()
        return False

    @staticmethod
    def _rewind(body: Any) -> None:
        """A body sent once must be sent again whole after re-login, or not at all."""
        if body is None or isinstance(body, (bytes, str, dict)):
            return
        if hasattr(body, "seek"):
            body.seek(0)
            return
        raise XnatAuthError("the XNAT session expired during a streamed upload", hint="retry")

    def ensure_session(self) -> None:
        """Have a server session (cached or new) before work that shares it across threads."""
        self._resume_or_login()

    @contextmanager
    def stream(
        self, method: str, path: str, what: str, **kwargs: Any
    ) -> Iterator[requests.Response]:
        """A request whose body is read in chunks by the caller (downloads)."""
        resp = self.request(method, path, what, stream=True, **kwargs)
        try:
            yield resp
        finally:
            resp.close()

    def get_json(self, path: str, what: str, params: Mapping[str, str] | None = None) -> Any:
        query = {"format": "json", **(params or {})}
        resp = self.request("GET", path, what, params=query)
        try:
            return resp.json()
        except json.JSONDecodeError:
            raise XnatServerError(
                f"XNAT sent something that is not JSON for {what}",
                status=resp.status_code,
                url=resp.url.split("?")[0],
            ) from None

    def listing(
        self, path: str, what: str, params: Mapping[str, str] | None = None
    ) -> list[dict[str, Any]]:
        """The rows of a ResultSet listing, with XNAT's string numbers turned into ints."""
        rows = self._rows(self.get_json(path, what, params), what)
        if not rows and self.credentials is not None and not self._trusted():
            # The guest sees empty listings (no projects, no experiments of a private one)
            # where others see a 404, so an empty answer is checked like a 404.
            if self._session_lost():
                log.info("XNAT took the session for its guest user (it expired); logging in again")
                self.login()
                rows = self._rows(self.get_json(path, what, params), what)
        return [{k: _number(k, v) for k, v in row.items()} for row in rows]

    @staticmethod
    def _rows(data: Any, what: str) -> list[dict[str, Any]]:
        try:
            rows = data["ResultSet"]["Result"]
        except (KeyError, TypeError):
            raise XnatServerError(f"XNAT's answer for {what} has no ResultSet") from None
        return list(rows)

    # -- who and tokens ------------------------------------------------------------------
    def whoami(self) -> str:
        """The XNAT user name of this session (``GET /data/auth``)."""
        for attempt in range(2):
            text = self.request("GET", "/data/auth", "who is logged in").text
            name = _user_of(text)
            if name is None:
                raise XnatServerError(f"unexpected answer from /data/auth: {text.strip()[:80]}")
            if name.lower() != GUEST_USER or self.credentials is None or attempt:
                return name
            # A site with guest access serves a dead session as its guest: log in once.
            log.info("XNAT took the session for its guest user (it expired); logging in again")
            self.login()
        raise AssertionError("unreachable")

    def issue_token(self) -> dict[str, Any]:
        """A new alias token for the logged-in user (alias, secret, estimatedExpirationTime)."""
        data = self.get_json("/data/services/tokens/issue", "issuing an alias token")
        if not isinstance(data, dict) or not data.get("alias") or not data.get("secret"):
            raise XnatServerError("XNAT did not issue an alias token")
        return data

    def token_expiry(self, alias: str) -> int | None:
        """When the token expires (epoch ms), from the user's token list, if XNAT says."""
        try:
            tokens = self.get_json("/data/services/tokens/show", "listing alias tokens")
        except XnatError:
            return None
        for token in tokens if isinstance(tokens, list) else []:
            if isinstance(token, dict) and token.get("alias") == alias:
                expiry = token.get("estimatedExpirationTime")
                return int(expiry) if isinstance(expiry, (int, float)) else None
        return None

    def end_session(self, session_id: str) -> None:
        """End a server session this client does not hold (one a job cached), on its cookie."""
        # A client of its own, so that this cookie too goes only where _follow lets it.
        with XnatClient(
            self.base, None, timeout=self.timeout, verify=self.verify, retries=0,
            allow_insecure_http=True,  # this client's own URL, already allowed
        ) as other:  # fmt: skip
            other._use_session(session_id)
            try:
                other._send("DELETE", "/data/JSESSION")
            except XnatError as exc:
                raise XnatError(f"could not end a session at {self.base}: {exc.message}") from None
            finally:
                other.session_id = None  # ended (or not ours to end again) either way

    def invalidate_token(self, alias: str) -> None:
        # The alias alone identifies the token (XNAT looks it up without checking the secret),
        # so the secret never travels in a URL, where access logs would keep it.
        self.request("GET", f"/data/services/tokens/invalidate/{alias}", "invalidating the token")


def _user_of(text: str) -> str | None:
    """The user of ``GET /data/auth``'s "User 'alice' is logged in", or None."""
    text = text.strip()
    if text.startswith("User '") and "'" in text[6:]:
        return text[6 : text.index("'", 6)]
    return None


def _who(creds: Secret) -> str:
    return (creds.owner or creds.user) if creds.is_token else creds.user


def _credential_kind(creds: Secret) -> str:
    return "alias token" if creds.is_token else "credentials"


def _when(epoch: float, now: float | None = None) -> str:
    """'at 10:02 UTC' today, 'on 2026-12-06 at 10:02 UTC' before."""
    moment = datetime.fromtimestamp(epoch, tz=timezone.utc)
    today = datetime.fromtimestamp(time.time() if now is None else now, tz=timezone.utc)
    clock = moment.strftime("%H:%M UTC")
    return f"at {clock}" if moment.date() == today.date() else f"on {moment:%Y-%m-%d} at {clock}"


_NUMERIC_KEYS = {
    "Size",
    "file_count",
    "file_size",
    "xnat_abstractresource_id",
    "cat_ID",
    "xnat_imagescandata_id",
    "frames",
    "totalRecords",
}


def _number(key: str, value: Any) -> Any:
    if key in _NUMERIC_KEYS and isinstance(value, str) and value.isdigit():
        return int(value)
    return value


def _redirected(method: str, status: int, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The method and arguments of the request a redirect asks for, as browsers (and requests)
    make it: 303, and 301/302 after a POST, become a GET without a body; 307 and 308 repeat the
    request, body and all. The Location already holds the query, so ``params`` is dropped."""
    kwargs = {k: v for k, v in kwargs.items() if k != "params"}
    if method != "HEAD" and (status == 303 or (status in (301, 302) and method == "POST")):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("data", "json", "files")}
        return "GET", kwargs
    body = kwargs.get("data")
    if body is not None and not isinstance(body, (bytes, str, dict)):
        if not hasattr(body, "seek"):
            raise XnatError(f"XNAT redirected a streamed {method}, which cannot be sent again")
        body.seek(0)
    return method, kwargs


def _as_sent(url: str) -> str:
    """``url`` as requests will send it (or "" if it will not)."""
    prepared = requests.PreparedRequest()
    try:
        prepared.prepare_url(url, None)
    except (requests.RequestException, ValueError):
        return ""
    return prepared.url or ""


def _root(url: str) -> str:
    parts = urlsplit(display_url(url))
    return f"{parts.scheme}://{parts.netloc}"


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception inside it: requests wraps urllib3's, which wraps ssl's, in
    ``args``, ``reason``, ``__cause__`` and ``__context__`` by turns."""
    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        item = todo.pop(0)
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        todo += [*item.args, getattr(item, "reason", None), item.__cause__, item.__context__]


# OpenSSL's X509_V_ERR_* codes, grouped by what the user can do about them.
_UNTRUSTED = {2, 18, 19, 20, 21}  # no issuer known, self-signed (leaf or in the chain)
_EXPIRED = {9, 10}  # not yet valid, expired
_MISMATCH = {62, 64}  # host name, IP address


def _tls_error(exc: BaseException, base: str) -> XnatConnectionError:
    """The TLS failure in plain words, whole, with what to do about it."""
    host = urlsplit(base).netloc
    for cause in _causes(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            code = cause.verify_code
            detail = cause.verify_message or _ssl_text(cause)
            if code in _MISMATCH:
                detail = f"the certificate is not for that name ({detail.rstrip('.')})"
                hint = (
                    "use the host name the certificate names in the XNAT URL; "
                    "see docs/troubleshooting.md#tls"
                )
            elif code in _EXPIRED:
                hint = (
                    "the XNAT administrators must renew it, or this machine's clock is wrong; "
                    "see docs/troubleshooting.md#tls"
                )
            elif code in _UNTRUSTED:
                hint = (
                    "set ca_bundle in the profile to your site's CA file; "
                    "see docs/troubleshooting.md#tls"
                )
            else:
                hint = TLS_HELP
            return XnatConnectionError(
                f"cannot verify the TLS certificate of {host}: {detail}", hint=hint, url=base
            )
    for cause in _causes(exc):
        if isinstance(cause, ssl.SSLError):
            return XnatConnectionError(
                f"the TLS handshake with {host} failed: {_ssl_text(cause)}",
                hint="check that the server speaks https at that port; "
                "see docs/troubleshooting.md#tls",
                url=base,
            )
    return XnatConnectionError(
        f"the TLS connection to {host} failed: {_reason(exc)}", hint=TLS_HELP, url=base
    )


def _ssl_text(exc: ssl.SSLError) -> str:
    """'[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)': the words only."""
    text = exc.strerror or str(exc)
    text = re.sub(r"^\[[A-Z_: ]+\]\s*", "", text)
    return re.sub(r"\s*\(_ssl\.c:\d+\)$", "", text).strip() or type(exc).__name__


def _reason(exc: BaseException) -> str:
    text = str(exc)
    for marker in (
        "Connection refused",
        "Name or service not known",
        "timed out",
        "Connection reset",
        "Remote end closed",
        "Connection aborted",
    ):
        if marker in text:
            return marker.lower()
    # The innermost error says what happened; requests' and urllib3's wrappers around it add
    # pool names and "Max retries exceeded", and cutting their text at a colon left half words.
    innermost = exc
    for cause in _causes(exc):
        innermost = cause
    text = re.sub(r"^<[^>]*>:\s*", "", str(innermost))
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", text).strip()
    return text[:200] or type(innermost).__name__
