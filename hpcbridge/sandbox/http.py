"""HTTP plumbing of the sandbox: the request object, replies, XNAT-shaped error pages, counters
and fault injection. Routing lives in ``server`` and ``archive``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.message import Message
from http import HTTPStatus
from http.cookies import SimpleCookie
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qsl, unquote, urlsplit

from .streams import BodyReader


class HttpError(Exception):
    """Answer with an error page. ``page`` is 'restlet' (archive routes) or 'tomcat'."""

    def __init__(
        self,
        status: int,
        reason: str,
        *,
        page: str = "restlet",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.page = page
        self.headers = dict(headers or {})


@dataclass
class Reply:
    """What a route answers. Exactly one of ``body``, ``file`` or ``stream`` carries content."""

    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain"
    headers: dict[str, str] = field(default_factory=dict)
    file: Path | None = None
    # Writes the body to a file-like sink; sent with chunked transfer encoding (no length known).
    stream: Callable[[IO[bytes]], None] | None = None

    @classmethod
    def json(cls, data: Any, status: int = 200) -> Reply:
        return cls(status, json.dumps(data).encode(), "application/json")

    @classmethod
    def text(cls, text: str, status: int = 200, content_type: str = "text/plain") -> Reply:
        return cls(status, text.encode(), content_type)


@dataclass
class Request:
    method: str
    path: str  # decoded path without query
    raw_path: str
    query: dict[str, str]
    headers: Mapping[str, str] | Message
    body: BodyReader
    cookies: dict[str, str]
    user: str | None = None
    session_id: str | None = None

    @classmethod
    def parse(
        cls, method: str, target: str, headers: Mapping[str, str] | Message, body: BodyReader
    ) -> Request:
        parts = urlsplit(target)
        query: dict[str, str] = {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            query.setdefault(key, value)
        cookies: dict[str, str] = {}
        if headers.get("Cookie"):
            jar: SimpleCookie = SimpleCookie()
            try:
                jar.load(headers["Cookie"])
            except Exception:  # a malformed cookie header is simply no cookie
                pass
            cookies = {k: m.value for k, m in jar.items()}
        return cls(method, unquote(parts.path), parts.path, query, headers, body, cookies)

    def segments(self) -> list[str]:
        """Path segments, each percent-decoded on its own (so an encoded '/' stays in place)."""
        return [unquote(s) for s in self.raw_path.split("/") if s]

    def flag(self, name: str) -> bool:
        return self.query.get(name, "").lower() == "true"


def restlet_page(status: int, reason: str) -> bytes:
    """The Restlet 1.1 status page that XNAT's archive routes answer errors with."""
    return (
        "<html>\n<head>\n   <title>Status page</title>\n</head>\n<body>\n"
        f'<h3>{_esc(reason)}</h3><p>You can get technical details <a href="http://www.w3.org/'
        f'Protocols/rfc2616/rfc2616-sec10.html">here</a>.<br>\nPlease continue your visit at our '
        '<a href="/">home page</a>.\n</p>\n</body>\n</html>\n'
    ).encode()


def tomcat_page(status: int, reason: str) -> bytes:
    """Tomcat's error page, which Spring security filters (401, 403) and unknown paths give."""
    phrase = _phrase(status)
    return (
        f'<!doctype html><html lang="en"><head><title>HTTP Status {status} \u2013 {phrase}'
        "</title></head><body>"
        f'<h1>HTTP Status {status} \u2013 {phrase}</h1><hr class="line" />'
        f"<p><b>Type</b> Status Report</p><p><b>Message</b> {_esc(reason)}</p>"
        '<hr class="line" /><h3>Apache Tomcat</h3></body></html>'
    ).encode()


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class Stats:
    """The counters served at ``GET /sandbox/stats``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.statuses: dict[str, int] = {}
        self.bytes_in = 0
        self.bytes_out = 0
        self.total = 0
        self.cuts = 0  # bodies the fault injection cut (drop_every)

    def request(self, method: str) -> int:
        with self._lock:
            self.requests[method] = self.requests.get(method, 0) + 1
            self.total += 1
            return self.total

    def status(self, code: int) -> None:
        with self._lock:
            self.statuses[str(code)] = self.statuses.get(str(code), 0) + 1

    def add_in(self, n: int) -> None:
        with self._lock:
            self.bytes_in += n

    def add_out(self, n: int) -> None:
        with self._lock:
            self.bytes_out += n

    def cut(self) -> None:
        with self._lock:
            self.cuts += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": dict(self.requests),
                "statuses": dict(self.statuses),
                "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out,
                "cuts": self.cuts,
            }


@dataclass
class Faults:
    """Fault injection for tests: slow answers, 503s, and connections cut part-way through."""

    latency: float = 0.0  # seconds added before every answer
    fail_every: int = 0  # every Nth request answers 503 (0: never)
    retry_after: int = 0  # seconds those 503s ask for in Retry-After (0: no header)
    drop_every: int = 0  # every Nth body transfer (upload or download) is cut (0: never)
    drop_after: int = 64 * 1024  # bytes that pass before the cut
    _transfers: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "latency": self.latency,
            "fail_every": self.fail_every,
            "retry_after": self.retry_after,
            "drop_every": self.drop_every,
            "drop_after": self.drop_after,
        }

    def update(self, values: Mapping[str, Any]) -> None:
        """Set the given faults; all or nothing (a bad key or value changes none of them)."""
        if not isinstance(values, Mapping):
            raise TypeError("faults must be a JSON object")
        parsed: dict[str, Any] = {}
        for key, value in values.items():
            if key not in ("latency", "fail_every", "retry_after", "drop_every", "drop_after"):
                raise ValueError(f"unknown fault {key!r}")
            parsed[key] = float(value) if key == "latency" else int(value)
            if not parsed[key] >= 0:  # a negative fail_every would fail every request for good
                raise ValueError(f"{key} must not be negative")
        for key, value in parsed.items():
            setattr(self, key, value)

    def failure_headers(self) -> dict[str, str]:
        """The headers of an injected 503."""
        return {"Retry-After": str(self.retry_after)} if self.retry_after else {}

    def cut_point(self) -> int | None:
        """For a body about to flow: the byte count at which to drop it, or None."""
        if self.drop_every <= 0:
            return None
        with self._lock:
            self._transfers += 1
            hit = self._transfers % self.drop_every == 0
        return self.drop_after if hit else None


def cookie(name: str, value: str) -> str:
    """A Set-Cookie value as Tomcat sends its session cookie."""
    return f"{name}={value}; Path=/; HttpOnly"
