"""The XNAT client: one HTTP session and one server session per run.

Three layers: ``http.HttpBase`` sends requests to XNAT's origin only (``failures`` says what a
failed one means), ``session.SessionBase`` logs in and keeps the session alive, and
``XnatClient`` here is the API the rest of hpcbridge calls.

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
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import requests

from ..closing import Closing
from ..errors import XnatError, XnatServerError
from .failures import raise_for_response, retry_after  # noqa: F401
from .session import GUEST_USER, SessionBase, _user_of, expiry_text  # noqa: F401

log = logging.getLogger(__name__)


class XnatClient(SessionBase, Closing):
    """A context manager holding one requests session and one XNAT server session."""

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
