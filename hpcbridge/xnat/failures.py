"""What a failed request means: XNAT's answers and connection failures as typed errors.

One place maps HTTP responses to errors (401 and HTML login pages to XnatAuthError, 403, 404,
409, the statuses worth retrying, the rest with status, URL and a body excerpt), and tells a
connection or TLS failure in plain words with what to do about it.
"""

from __future__ import annotations

import re
import ssl
import time
from collections.abc import Iterator
from datetime import timezone
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import requests

from ..errors import (
    Step,
    XnatAuthError,
    XnatConflictError,
    XnatConnectionError,
    XnatNotFoundError,
    XnatPermissionError,
    XnatServerError,
)

RETRY_STATUSES = (502, 503, 504)
TLS_HELP = "see docs/troubleshooting.md#tls"


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
            step=Step.LOGIN,
            status=status,
            url=url,
        )
    excerpt = _excerpt(resp)
    detail = f": {excerpt}" if excerpt else ""
    if status == 403:
        raise XnatPermissionError(
            f"not allowed: {what}{detail}", step=Step.WHOAMI, status=status, url=url
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
