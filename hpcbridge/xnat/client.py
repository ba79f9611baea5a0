"""The XNAT client: one HTTP session and one server session per run.

Scripting XNAT the naive way (Basic credentials on every request) opens a new Tomcat session per
request, and about a thousand live sessions lock a user out (see docs/authentication.md). This
client authenticates once (``POST /data/JSESSION`` with Basic credentials), then sends only the
JSESSIONID cookie. When the server says the session is gone (401, or an HTML login page with
status 200) it logs in again once and repeats the request. With a session cache the JSESSIONID
outlives the process, so a shell loop of many ``hpcbridge`` calls shares one server session too;
without one the session is ended (``DELETE /data/JSESSION``) on close.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from types import TracebackType
from typing import Any

import requests

from ..credentials import Secret, SessionCache
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
    if status in RETRY_STATUSES:
        raise XnatServerError(
            f"XNAT is unavailable ({status} for {what}){detail}",
            hint="try again later",
            status=status,
            url=url,
        )
    raise XnatServerError(f"XNAT answered {status} for {what}{detail}", status=status, url=url)


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
        verify: bool = True,
        retries: int = 3,
        backoff: float = 0.5,
        session_cache: SessionCache | None = None,
    ) -> None:
        self.base = url.rstrip("/")
        self.credentials = credentials
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.session_cache = session_cache
        self.http = requests.Session()
        self.http.verify = verify
        self.http.headers["User-Agent"] = USER_AGENT
        self.session_id: str | None = None
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

    def _resume_or_login(self) -> None:
        if self.session_id is not None:
            return
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
            self.login()

    def login(self) -> None:
        """Open a server session with the credentials (the only request that sends them)."""
        creds = self.credentials
        if creds is None:
            raise XnatAuthError(f"no credentials for {self.base}", hint=LOGIN_HINT)
        self.http.cookies.clear()
        resp = self._send("POST", "/data/JSESSION", auth=(creds.user, creds.secret))
        if resp.status_code == 401 or looks_like_login_page(resp):
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
        self.logins += 1
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
                resp = self.http.request(method, url, timeout=self.timeout, **kwargs)
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
            self._rewind(kwargs.get("data"))
            self.login()
            resp = self._send(method, path, **kwargs)
        raise_for_response(resp, what)
        return resp

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
        data = self.get_json(path, what, params)
        try:
            rows = data["ResultSet"]["Result"]
        except (KeyError, TypeError):
            raise XnatServerError(f"XNAT's answer for {what} has no ResultSet") from None
        return [{k: _number(k, v) for k, v in row.items()} for row in rows]

    # -- who and tokens ------------------------------------------------------------------
    def whoami(self) -> str:
        """The XNAT user name of this session (``GET /data/auth``)."""
        text = self.request("GET", "/data/auth", "who is logged in").text.strip()
        if text.startswith("User '") and "'" in text[6:]:
            return text[6 : text.index("'", 6)]
        raise XnatServerError(f"unexpected answer from /data/auth: {text[:80]}")

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
        with requests.Session() as http:
            http.verify = self.http.verify
            http.headers["User-Agent"] = USER_AGENT
            http.cookies.set("JSESSIONID", session_id)
            try:
                http.delete(self.base + "/data/JSESSION", timeout=self.timeout)
            except requests.RequestException as exc:
                raise XnatError(f"could not end a session at {self.base}: {_reason(exc)}") from None

    def invalidate_token(self, alias: str) -> None:
        # The alias alone identifies the token (XNAT looks it up without checking the secret),
        # so the secret never travels in a URL, where access logs would keep it.
        self.request("GET", f"/data/services/tokens/invalidate/{alias}", "invalidating the token")


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
    return text.split(":")[-1].strip()[:120] or type(exc).__name__
