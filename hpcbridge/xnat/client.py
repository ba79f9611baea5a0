"""The XNAT client: one HTTP session and one server session per run.

It authenticates once (``POST /data/JSESSION`` with Basic credentials), then sends only the
JSESSIONID cookie, re-authenticates once when the server says the session is gone (401, or an
HTML login page with status 200), and ends the server session on close. A loop over a thousand
experiments therefore opens one Tomcat session, not a thousand.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import requests

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


@dataclass(frozen=True)
class Credentials:
    """Who to log in as. ``secret`` is a password or an alias-token secret; never logged."""

    user: str
    secret: str

    def __repr__(self) -> str:
        return f"Credentials(user={self.user!r}, secret='***')"


def _looks_like_login_page(resp: requests.Response) -> bool:
    if "html" not in resp.headers.get("Content-Type", "").lower():
        return False
    head = resp.text[:2000].lower()
    return "login" in head and ("<form" in head or "password" in head)


def _excerpt(resp: requests.Response, limit: int = 200) -> str:
    text = resp.text or ""
    # Restlet status pages carry the reason in <h3>; Tomcat pages in <b>Message</b>.
    for start, end in (("<h3>", "</h3>"), ("<b>Message</b>", "</p>")):
        i = text.find(start)
        if i >= 0:
            j = text.find(end, i + len(start))
            if j > i:
                return text[i + len(start) : j].strip()[:limit]
    return " ".join(text.split())[:limit]


def raise_for_response(resp: requests.Response, what: str) -> None:
    """Map an unsuccessful answer to a typed error naming ``what`` was asked for."""
    status = resp.status_code
    if status < 300 and not _looks_like_login_page(resp):
        return
    url = resp.url.split("?")[0]
    if status in (401,) or (status < 300 and _looks_like_login_page(resp)):
        raise XnatAuthError(
            f"XNAT refused the credentials or the session expired ({what})",
            hint="run `hpcbridge login`",
            status=status,
            url=url,
        )
    if status == 403:
        raise XnatPermissionError(f"not allowed: {what}: {_excerpt(resp)}", status=status, url=url)
    if status == 404:
        raise XnatNotFoundError(f"not found: {what}", status=status, url=url)
    if status == 409:
        raise XnatConflictError(f"conflict: {what}: {_excerpt(resp)}", status=status, url=url)
    raise XnatServerError(
        f"XNAT answered {status} for {what}: {_excerpt(resp)}", status=status, url=url
    )


class XnatClient:
    """A context manager holding one requests session and one XNAT server session."""

    def __init__(
        self,
        url: str,
        credentials: Credentials | None,
        *,
        timeout: float = 60.0,
        verify: bool = True,
        retries: int = 3,
        backoff: float = 0.5,
    ) -> None:
        self.base = url.rstrip("/")
        self.credentials = credentials
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.http = requests.Session()
        self.http.verify = verify
        self.http.headers["User-Agent"] = USER_AGENT
        self._logged_in = False

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
    def login(self) -> None:
        """Open the one server session of this client."""
        if self.credentials is None:
            raise XnatAuthError(
                "no XNAT credentials configured",
                hint="run `hpcbridge login` or set HPCBRIDGE_USER and HPCBRIDGE_PASSWORD",
            )
        resp = self._send(
            "POST", "/data/JSESSION", auth=(self.credentials.user, self.credentials.secret)
        )
        raise_for_response(resp, f"login as {self.credentials.user} at {self.base}")
        self._logged_in = True

    def close(self) -> None:
        """End the server session (DELETE /data/JSESSION) and the HTTP session."""
        if self._logged_in:
            try:
                self._send("DELETE", "/data/JSESSION")
            except XnatError as exc:
                log.debug("ending the XNAT session failed: %s", exc)
            self._logged_in = False
        self.http.close()

    # -- requests ------------------------------------------------------------------------
    def _send(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """One request, retried with backoff only when it is safe (GET/HEAD)."""
        attempts = self.retries + 1 if method in ("GET", "HEAD") else 1
        url = self.base + path
        for attempt in range(attempts):
            try:
                resp = self.http.request(method, url, timeout=self.timeout, **kwargs)
            except requests.ConnectionError as exc:
                if attempt + 1 < attempts:
                    time.sleep(self.backoff * 2**attempt)
                    continue
                raise XnatConnectionError(
                    f"cannot reach XNAT at {self.base}: {_reason(exc)}", url=self.base
                ) from None
            except requests.Timeout:
                raise XnatConnectionError(
                    f"XNAT at {self.base} did not answer within {self.timeout:g} s", url=self.base
                ) from None
            if resp.status_code in RETRY_STATUSES and attempt + 1 < attempts:
                time.sleep(self.backoff * 2**attempt)
                continue
            return resp
        raise AssertionError("unreachable")

    def request(self, method: str, path: str, what: str, **kwargs: Any) -> requests.Response:
        """An authenticated request; re-login once if the session has gone."""
        if not self._logged_in:
            self.login()
        resp = self._send(method, path, **kwargs)
        if resp.status_code == 401 or _looks_like_login_page(resp):
            log.info("XNAT session expired; logging in again")
            self.login()
            resp = self._send(method, path, **kwargs)
        raise_for_response(resp, what)
        return resp

    def get_json(self, path: str, what: str, params: Mapping[str, str] | None = None) -> Any:
        query = {"format": "json", **(params or {})}
        resp = self.request("GET", path, what, params=query)
        try:
            return resp.json()
        except json.JSONDecodeError:
            raise XnatServerError(
                f"XNAT sent something that is not JSON for {what}",
                status=resp.status_code,
                url=resp.url,
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
    ):
        if marker in text:
            return marker.lower()
    return text.split(":")[-1].strip()[:120] or type(exc).__name__


def iter_rows(rows: Iterable[dict[str, Any]], keys: Iterable[str]) -> list[dict[str, Any]]:
    """Keep only ``keys`` of each row, in that order."""
    wanted = list(keys)
    return [{k: row.get(k, "") for k in wanted} for row in rows]
