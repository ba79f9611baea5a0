"""The HTTP layer under the XNAT client: requests sent only to XNAT's origin, retried safely.

Redirects are followed here rather than by requests, so that the session cookie and the login's
credentials reach the configured XNAT and nothing else; GET and HEAD are retried with backoff
on a failed connection or a 502/503/504, nothing else is.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests

from ..config import check_xnat_url, display_url
from ..errors import Step, XnatConnectionError, XnatError, XnatServerError
from .failures import RETRY_STATUSES, _reason, _tls_error

log = logging.getLogger(__name__)

USER_AGENT = "hpcbridge"
#: Same-origin redirects followed per request (XNAT's trailing-slash and context-path ones).
MAX_REDIRECTS = 5

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


class HttpBase:
    """One requests session bound to one XNAT origin (the client's lowest layer)."""

    def __init__(
        self,
        url: str,
        timeout: float,
        verify: bool | str,
        retries: int,
        backoff: float,
        allow_insecure_http: bool,
    ) -> None:
        self.base = check_xnat_url(url, allow_insecure_http=allow_insecure_http).rstrip("/")
        self.origin = origin_of(self.base)
        self.timeout = timeout
        #: requests' ``verify`` (False, a CA bundle, or True), given on every request: set on
        #: the session instead, REQUESTS_CA_BUNDLE would override a False or a CA bundle.
        self.verify = verify
        self.retries = retries
        self.backoff = backoff
        self.http = requests.Session()
        self.http.verify = verify
        self.http.auth = _NoAuth()
        self.http.headers["User-Agent"] = USER_AGENT

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
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
                # A body cut off mid-read is a broken connection too, not a bug of ours.
                if attempt + 1 < attempts:
                    self._pause(attempt, f"connection failed ({_reason(exc)})")
                    continue
                raise XnatConnectionError(
                    f"cannot reach XNAT at {self.base}: {_reason(exc)}",
                    step=Step.CHECK_URL,
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
