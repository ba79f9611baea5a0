"""The sandbox XNAT server: a threaded HTTP/1.1 server on loopback that answers like XNAT 1.8.

``SandboxServer`` runs it in a background thread (tests, the demo); ``serve`` runs it in the
foreground (``hpcbridge sandbox serve``). Authentication happens here, before routing, the way
XNAT's Spring filter chain runs before its Restlet routes.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import socket
import tempfile
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import IO, Any, cast
from urllib.parse import parse_qsl

from .archive import Archive
from .auth import GUEST, Authority, AuthSettings, token_json
from .http import Faults, HttpError, Reply, Request, Stats, restlet_page, tomcat_page
from .store import Store
from .streams import CHUNK, BodyReader, ChunkedWriter

log = logging.getLogger(__name__)

XNAT_VERSION = "1.8.10"
# XnatAuthenticationEntryPoint: full-match patterns of "interactive" (browser) user agents.
INTERACTIVE_AGENTS = ("MSIE", "Mozilla", "AppleWebKit", "Opera")
PROTECTED_PREFIXES = ("/data", "/REST", "/xapi", "/fs", "/sandbox")
SEARCH_ELEMENTS = [
    ("xnat:projectData", "Project", "Projects"),
    ("xnat:subjectData", "Subject", "Subjects"),
    ("xnat:mrSessionData", "MR Session", "MR Sessions"),
]
#: Requests kept in ``SandboxApp.request_log`` (the oldest go first).
REQUEST_LOG_SIZE = 10000


class SandboxApp:
    """Authenticates, routes and answers one request at a time (called from handler threads)."""

    def __init__(self, store: Store, authority: Authority, faults: Faults, stats: Stats) -> None:
        self.store = store
        self.auth = authority
        self.faults = faults
        self.stats = stats
        self.archive = Archive(store, authority, faults.cut_point)
        #: (method, path, user, status) of the latest requests, for tests that count what a
        #: client asked; bounded, so a long-running sandbox does not grow without end.
        self.request_log: deque[tuple[str, str, str | None, int]] = deque(maxlen=REQUEST_LOG_SIZE)

    # -- authentication gate -------------------------------------------------------------
    def authenticate(self, req: Request) -> dict[str, str]:
        """Set req.user from the session cookie or Basic credentials; return cookies to set."""
        session = self.auth.session(req.cookies.get("JSESSIONID"))
        if session is not None:
            req.user, req.session_id = session.login, session.id
            return {}
        header = req.headers.get("Authorization", "")
        if not header.lower().startswith("basic "):
            if self.auth.settings.guest_access:
                # No 401 on such a site: a dead session cookie silently becomes the guest.
                req.user = GUEST
            return {}
        try:
            name, _, password = base64.b64decode(header[6:].strip()).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            raise HttpError(401, "Bad Basic authentication header", page="tomcat") from None
        login = self.auth.check_credentials(name, password)
        opened = self.auth.open_session(login) if login else None
        if opened is None:
            raise HttpError(401, LOGIN_FAILED % self.auth.settings.max_failed_logins, page="tomcat")
        req.user, req.session_id = opened.login, opened.id
        return {"JSESSIONID": opened.id}

    def challenge(self, req: Request) -> HttpError:
        agent = req.headers.get("User-Agent", "")
        if any(a in agent for a in INTERACTIVE_AGENTS) and "XNATDesktopClient" not in agent:
            return HttpError(
                302, "Found", page="tomcat", headers={"Location": "/app/template/Login.vm"}
            )
        return HttpError(
            401,
            "Full authentication is required to access this resource",
            page="tomcat",
            headers={"WWW-Authenticate": 'Basic realm="XNAT"'},
        )

    # -- routing -------------------------------------------------------------------------
    def route(self, req: Request) -> Reply:
        segs = req.segments()
        if not segs:
            return Reply(200, INDEX_PAGE.encode(), "text/html")
        if segs[:3] == ["app", "template", "Login.vm"]:
            return Reply(200, LOGIN_PAGE.encode(), "text/html")
        if segs[0] in ("data", "REST"):
            segs = segs[1:]
            if segs[:2] == ["services", "auth"]:
                return self.form_login(req)
        if segs == ["xapi", "siteConfig", "buildInfo"]:
            return Reply.json(BUILD_INFO)
        if req.user is None:
            if f"/{segs[0] if segs else ''}".startswith(PROTECTED_PREFIXES) or req.path.startswith(
                PROTECTED_PREFIXES
            ):
                raise self.challenge(req)
            raise HttpError(404, "The requested resource is not available.", page="tomcat")
        if not req.path.startswith(("/data", "/REST")):
            return self.other_route(req, segs)
        if not segs:
            raise HttpError(404, "The server has not found anything matching the request URI")
        if segs[0] == "archive" and len(segs) > 1:
            segs = segs[1:]
        return self.data_route(req, segs)

    def data_route(self, req: Request, segs: list[str]) -> Reply:
        if req.user == GUEST:
            return self.guest_route(req, segs)
        head = segs[0]
        if head == "JSESSION" and len(segs) == 1:
            return self.jsession(req)
        if head == "auth" and len(segs) == 1:
            return Reply.text(f"User '{req.user}' is logged in")
        if head == "services" and len(segs) > 1 and segs[1] == "tokens":
            return self.tokens(req, segs[2:])
        if head == "workflows":
            return self.workflows(req, segs[1:])
        if head == "search" and len(segs) > 1 and segs[1] == "elements":
            return self.search_elements(req, segs[2:])
        if head in ("projects", "subjects", "experiments"):
            return self.archive.handle(req, segs)
        raise HttpError(404, "The server has not found anything matching the request URI")

    def guest_route(self, req: Request, segs: list[str]) -> Reply:
        """What XNAT's guest user sees of the sandbox, whose projects are all private: none of
        them (404, as XNAT hides a private project), and no right to change anything (403)."""
        from .listing import render_table

        head = segs[0]
        if head == "auth" and len(segs) == 1:
            return Reply.text(f"User '{GUEST}' is logged in")
        if head == "JSESSION" and len(segs) == 1:
            return self.jsession(req)
        if head == "services" and segs[1:2] == ["tokens"]:
            raise HttpError(403, "The guest user can't request alias tokens")
        if req.method not in ("GET", "HEAD"):
            raise HttpError(403, "The guest user has insufficient privileges for this operation.")
        if head in ("projects", "subjects", "experiments") and len(segs) == 1:
            body, ctype = render_table([], defaults=["ID", "URI"], query=req.query)
            return Reply(200, body, ctype)
        if head == "projects":
            raise HttpError(404, f"Unable to identify project {segs[1]}")
        if head == "subjects":
            raise HttpError(404, f"Unable to find the specified subject: {segs[1]}")
        if head == "experiments":
            raise HttpError(404, "Unable to find the specified experiment.")
        raise HttpError(404, "The server has not found anything matching the request URI")

    def other_route(self, req: Request, segs: list[str]) -> Reply:
        if segs[:2] == ["xapi", "schemas"]:
            return self.schemas(segs[2:])
        if segs[:1] == ["sandbox"]:
            return self.sandbox_admin(req, segs[1:])
        raise HttpError(404, "The requested resource is not available.", page="tomcat")

    # -- sessions and login --------------------------------------------------------------
    def jsession(self, req: Request) -> Reply:
        if req.method == "DELETE":
            if req.session_id:
                self.auth.close_session(req.session_id)
            return Reply()
        if req.method not in ("GET", "POST"):
            raise HttpError(405, "Method Not Allowed")
        body = req.session_id or ""
        if req.query.get("CSRF", "").lower() == "true":
            body += f"; XNAT_CSRF={_csrf(body)}"
        return Reply.text(body)

    def form_login(self, req: Request) -> Reply:
        if req.method not in ("PUT", "POST"):
            raise HttpError(405, "Method Not Allowed")
        raw = b"".join(req.body.chunks()) if not req.body.eof else b""
        form = dict(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))
        form.update({k: v for k, v in req.query.items() if k not in form})
        name = form.get("username") or form.get("j_username") or ""
        password = form.get("password") or form.get("j_password") or ""
        login = self.auth.check_credentials(name, password) if name else None
        opened = self.auth.open_session(login) if login else None
        if opened is None:
            raise HttpError(401, "Authentication failed.")
        req.user, req.session_id = opened.login, opened.id
        reply = Reply.text(opened.id)
        reply.headers["Set-Cookie"] = _cookie("JSESSIONID", opened.id)
        return reply

    # -- alias tokens --------------------------------------------------------------------
    def tokens(self, req: Request, segs: list[str]) -> Reply:
        if not segs:
            raise HttpError(404, "The server has not found anything matching the request URI")
        op, rest = segs[0], segs[1:]
        admin = self.auth.is_admin(req.user)
        if op == "issue":
            login = req.user or ""
            if rest[:1] == ["user"] and len(rest) == 2:
                if not admin:
                    raise HttpError(
                        403, "Only site admins can request alias tokens for other users"
                    )
                login = rest[1]
                if login not in self.auth.users:
                    raise HttpError(404, f"Couldn't find a user with the login {login}")
            elif rest:
                raise HttpError(404, "The server has not found anything matching the request URI")
            return Reply.json(self.auth.issue_token(login))
        if op == "show":
            login = rest[1] if rest[:1] == ["user"] and len(rest) == 2 else req.user or ""
            if login != req.user and not admin:
                raise HttpError(403, NON_ADMIN_TOKENS)
            return Reply.json([token_json(t) for t in self.store.tokens_of(login)])
        if op in ("validate", "invalidate") and len(rest) in (1, 2):
            token = self.store.token(rest[0])
            if token is None:
                raise HttpError(404, f"Can't find an alias token with the alias {rest[0]}")
            if token["login"] != req.user and not admin:
                raise HttpError(403, NON_ADMIN_TOKENS)
            if op == "invalidate":
                self.store.delete_token(rest[0])
                return Reply.json({"result": "OK"})
            secret = rest[1] if len(rest) == 2 else ""
            valid = secret == token["secret"] and token["expires"] > time.time() * 1000
            return Reply.json({"valid": token["login"]} if valid else {})
        raise HttpError(404, "The server has not found anything matching the request URI")

    # -- workflows -----------------------------------------------------------------------
    def workflows(self, req: Request, segs: list[str]) -> Reply:
        given = _workflow_fields(req.query)
        if segs:
            try:
                found = self.store.workflows(wrk_id=int(segs[0]))
            except ValueError:
                found = []
            if not found:
                raise HttpError(404, "Unable to find the specified workflow.")
            if req.method in ("PUT", "POST"):
                return self._save_workflow(req, found[0], given)
            return Reply.json({"items": [_workflow_item(found[0])]})
        if req.method in ("PUT", "POST"):
            key = {k: given.get(k, "") for k in ("id", "scan_id", "pipeline_name", "launch_time")}
            found = (
                self.store.workflows(**key)
                if all(key[k] for k in ("id", "pipeline_name", "launch_time"))
                else []
            )
            if not found and not all(
                given.get(k) for k in ("id", "launch_time", "data_type", "pipeline_name")
            ):
                raise HttpError(
                    400,
                    "Id, launch_time, data_type and pipeline_name are all required"
                    " to create a new workflow entry.",
                )
            return self._save_workflow(req, found[0] if found else None, given)
        if req.method != "GET":
            raise HttpError(405, "Method Not Allowed")
        match = {
            k: v
            for k, v in given.items()
            if k in ("id", "pipeline_name", "launch_time", "status", "scan_id", "data_type")
        }
        return Reply.json({"items": [_workflow_item(w) for w in self.store.workflows(**match)]})

    def _save_workflow(
        self, req: Request, row: dict[str, Any] | None, given: dict[str, str]
    ) -> Reply:
        if row is not None and row["create_user"] != req.user and not self.auth.is_admin(req.user):
            raise HttpError(403, "You are not allowed to make changes to this workflow.")
        merged: dict[str, Any] = dict(row or {"create_user": req.user, "scan_id": ""})
        extra = json.loads(merged.get("fields") or "{}")
        for key, value in given.items():
            if key in ("id", "data_type", "pipeline_name", "launch_time", "status", "scan_id"):
                merged[key] = value
            else:
                extra[key] = value
        merged["fields"] = json.dumps(extra)
        self.store.save_workflow(merged)
        return Reply()

    # -- model discovery for xnatpy ------------------------------------------------------
    def search_elements(self, req: Request, segs: list[str]) -> Reply:
        from .listing import render_table

        if not segs:
            counts = {
                "xnat:projectData": len(self.store.projects()),
                "xnat:subjectData": len(self.store.subjects()),
                "xnat:mrSessionData": len(self.store.experiments()),
            }
            rows = [
                {
                    "ELEMENT_NAME": n,
                    "SINGULAR": s,
                    "PLURAL": p,
                    "SECURED": "true",
                    "COUNT": counts[n],
                }
                for n, s, p in SEARCH_ELEMENTS
            ]
            body, ctype = render_table(rows, defaults=list(rows[0]), query=req.query)
            return Reply(200, body, ctype)
        element = segs[0]
        if element not in {n for n, _, _ in SEARCH_ELEMENTS}:
            raise HttpError(404, f"Unknown element {element}")
        rows = [
            {
                "FIELD_ID": fid,
                "HEADER": fid.title(),
                "SUMMARY": fid.title(),
                "TYPE": "string",
                "REQUIRES_VALUE": "false",
                "DESC": "",
                "ELEMENT_NAME": element,
                "SRC": "0",
            }
            for fid in ("ID", "LABEL", "PROJECT")
        ]
        body, ctype = render_table(rows, defaults=list(rows[0]), query=req.query)
        return Reply(200, body, ctype)

    def schemas(self, segs: list[str]) -> Reply:
        if not segs:
            return Reply.json(["xnat", "xdat"])
        name = "/".join(segs)
        if name not in ("xnat", "xdat"):
            raise HttpError(404, f"No schema named {name}", page="tomcat")
        xsd = resources.files("hpcbridge.sandbox").joinpath(f"schemas/{name}.xsd").read_bytes()
        return Reply(200, xsd, "application/xml")

    # -- sandbox administration ----------------------------------------------------------
    def sandbox_admin(self, req: Request, segs: list[str]) -> Reply:
        if not self.auth.is_admin(req.user):
            raise HttpError(403, "The sandbox statistics are for site admins only.", page="tomcat")
        if segs == ["stats"]:
            data = self.stats.snapshot()
            data.update(
                sessions_created=self.auth.sessions_created,
                sessions_live=self.auth.live_sessions(),
                tokens_issued=self.auth.tokens_issued,
            )
            return Reply.json(data)
        if segs == ["faults"]:
            if req.method in ("PUT", "POST"):
                try:
                    self.faults.update(json.loads(b"".join(req.body.chunks()) or b"{}"))
                except (ValueError, TypeError) as exc:
                    raise HttpError(400, f"Bad faults: {exc}", page="tomcat") from None
            return Reply.json(self.faults.as_dict())
        raise HttpError(404, "The requested resource is not available.", page="tomcat")


LOGIN_FAILED = (
    "Your login attempt failed because the username and password combination you provided was "
    "invalid or your user already has the maximum number of user sessions open. After %d failed "
    "login attempts, your user account will be locked."
)
NON_ADMIN_TOKENS = (
    "Non-admin users can only request operations on alias tokens for their own account"
)
BUILD_INFO = {
    "version": XNAT_VERSION,
    "buildNumber": "sandbox",
    "buildDate": "",
    "sha": "sandbox",
    "isDirty": "false",
    "commit": "0",
    "tag": XNAT_VERSION,
    "shaFull": "sandbox",
    "branch": "sandbox",
    "timestamp": "0",
}
INDEX_PAGE = (
    "<!DOCTYPE html><html><head><title>XNAT sandbox</title></head><body>"
    "<h1>hpcbridge sandbox XNAT</h1><p>An XNAT-compatible test server. The REST API "
    "is under <code>/data</code>.</p></body></html>"
)
LOGIN_PAGE = (
    "<!DOCTYPE html><html><head><title>XNAT Login</title></head><body>"
    '<form method="post" action="/login"><input name="username"/>'
    '<input name="password" type="password"/></form></body></html>'
)
_WORKFLOW_NAMES = {
    "id": "id",
    "data_type": "data_type",
    "pipeline_name": "pipeline_name",
    "launch_time": "launch_time",
    "status": "status",
    "scan_id": "scan_id",
}


def _workflow_fields(query: dict[str, str]) -> dict[str, str]:
    out = {}
    for key, value in query.items():
        if key.lower().startswith("wrk:workflowdata/"):
            name = key.split("/", 1)[1]
            out[_WORKFLOW_NAMES.get(name.lower(), name)] = value
    return out


def _workflow_item(row: dict[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "ID": row["id"],
        "data_type": row["data_type"],
        "pipeline_name": row["pipeline_name"],
        "launch_time": row["launch_time"],
        "status": row["status"],
        "wrk_workflowData_id": row["wrk_id"],
        "create_user": row["create_user"],
    }
    if row["scan_id"]:
        fields["scan_id"] = row["scan_id"]
    fields.update(json.loads(row["fields"] or "{}"))
    return {
        "meta": {"isHistory": False, "xsi:type": "wrk:workflowData"},
        "data_fields": fields,
        "children": [],
    }


def _csrf(session_id: str) -> str:
    import hashlib

    return hashlib.sha256(("csrf:" + session_id).encode()).hexdigest()[:32]


def _cookie(name: str, value: str) -> str:
    return f"{name}={value}; Path=/; HttpOnly"


_TOKEN_PATH = re.compile(r"(/services/tokens/\w+/[^/\s?]+/)[^\s?]+")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body leave in two writes; with Nagle on, the body waits for the client's
    # delayed ACK of the headers (about 40 ms on Linux) on every keep-alive request, which made
    # a client holding one session slower than curl opening a connection per request. Tomcat
    # (tcpNoDelay) sends at once too.
    disable_nagle_algorithm = True
    server: _Server

    def version_string(self) -> str:
        return "XNAT-sandbox"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        # Token secrets travel in some XNAT URLs (tokens/validate/{alias}/{secret}): keep them
        # out of the access log.
        line = _TOKEN_PATH.sub(r"\1***", format % args)
        log.debug("%s %s", self.address_string(), line)

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def _dispatch(self) -> None:
        app = self.server.app
        app.stats.request(self.command)
        faults = app.faults
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        cut = faults.cut_point() if (length or chunked) else None
        body = BodyReader(
            cast("IO[bytes]", self.rfile),
            length=length,
            chunked=chunked,
            counter=app.stats.add_in,
            cut_after=cut,
        )
        req = Request.parse(self.command, self.path, self.headers, body)
        if faults.latency:
            time.sleep(faults.latency)
        extra_cookies: dict[str, str] = {}
        try:
            if faults.fail_every and app.stats.total % faults.fail_every == 0:
                raise HttpError(
                    503,
                    "Service Unavailable (sandbox fault injection)",
                    page="tomcat",
                    headers=faults.failure_headers(),
                )
            extra_cookies = app.authenticate(req)
            reply = app.route(req)
        except HttpError as err:
            render = tomcat_page if err.page == "tomcat" else restlet_page
            # The pages are UTF-8 (Tomcat's has an en dash); say so, as Tomcat does.
            reply = Reply(
                err.status, render(err.status, err.reason), "text/html;charset=utf-8", err.headers
            )
        except ConnectionAbortedError:  # only the fault injection cuts a request body
            app.stats.cut()
            self.close_connection = True
            self._abort()
            return
        except Exception:  # a bug in the sandbox must not kill the connection silently
            log.exception("sandbox error on %s %s", self.command, self.path)
            reply = Reply(500, restlet_page(500, "Internal Server Error"), "text/html")
        if not body.eof and not body.drain():
            self.close_connection = True
        self._send(req, reply, extra_cookies)

    def _send(self, req: Request, reply: Reply, cookies: dict[str, str]) -> None:
        app = self.server.app
        app.stats.status(reply.status)
        app.request_log.append(
            (req.method, _TOKEN_PATH.sub(r"\1***", req.path), req.user, reply.status)
        )
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        for key, value in reply.headers.items():
            if key != "Set-Cookie":
                self.send_header(key, value)
        if "Set-Cookie" in reply.headers:
            self.send_header("Set-Cookie", reply.headers["Set-Cookie"])
        for name, value in cookies.items():
            self.send_header("Set-Cookie", _cookie(name, value))
        if req.user:
            timeout_ms = int(app.auth.settings.session_timeout * 1000)
            self.send_header(
                "Set-Cookie",
                f'SESSION_EXPIRATION_TIME="{int(time.time() * 1000)},{timeout_ms}"; Path=/',
            )
        if self.close_connection:
            self.send_header("Connection", "close")
        head = self.command == "HEAD"
        try:
            if reply.stream is not None:
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                if not head:
                    writer = ChunkedWriter(
                        cast("IO[bytes]", self.wfile), app.stats.add_out, app.faults.cut_point()
                    )
                    reply.stream(cast("IO[bytes]", writer))
                    writer.finish()
            elif reply.file is not None:
                self._send_file(reply.file, head)
            else:
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                if not head and reply.body:
                    self.wfile.write(reply.body)
                    app.stats.add_out(len(reply.body))
        except ConnectionAbortedError:  # the fault injection cut the answer's body
            app.stats.cut()
            self._abort()
        except (BrokenPipeError, ConnectionResetError):  # the client went away
            self._abort()

    def _send_file(self, path: Path, head: bool) -> None:
        app = self.server.app
        size = path.stat().st_size
        self.send_header("Content-Length", str(size))
        self.end_headers()
        if head:
            return
        cut = app.faults.cut_point()
        sent = 0
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                if cut is not None and sent + len(chunk) > cut:
                    self.wfile.write(chunk[: max(0, cut - sent)])
                    raise ConnectionAbortedError("sandbox fault: download cut")
                self.wfile.write(chunk)
                sent += len(chunk)
                app.stats.add_out(len(chunk))

    def _abort(self) -> None:
        """Drop the connection at once, as a crashed proxy or a network fault would."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    app: SandboxApp


class SandboxServer:
    """A sandbox XNAT on loopback, in a background thread; usable as a context manager.

    >>> with SandboxServer(seed="demo") as sb:   # doctest: +SKIP
    ...     requests.get(sb.url + "/data/projects", auth=(sb.user, sb.password))
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: str | None = None,
        admin_user: str = "admin",
        admin_password: str = "admin",
        auth: AuthSettings | None = None,
        faults: Faults | None = None,
    ) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="hpcbridge-sandbox-")
            data_dir = self._tmp.name
        self.data_dir = Path(data_dir)
        self.store = Store(self.data_dir)
        self.authority = Authority(self.store, auth or AuthSettings())
        self.authority.add_user(admin_user, admin_password, admin=True)
        self.user, self.password = admin_user, admin_password
        self.faults = faults or Faults()
        self.stats = Stats()
        self.app = SandboxApp(self.store, self.authority, self.faults, self.stats)
        if seed:
            from .seed import seed_archive

            seed_archive(self.store, seed, user=admin_user)
        self._httpd = _Server((host, port), _Handler)
        self._httpd.app = self.app
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return str(self._httpd.server_address[0])

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def add_user(self, login: str, password: str, *, admin: bool = False) -> None:
        self.authority.add_user(login, password, admin=admin)

    @property
    def request_log(self) -> list[tuple[str, str, str | None, int]]:
        """(method, path, user, status) of the latest requests, oldest first; token secrets
        in paths are masked."""
        return list(self.app.request_log)

    def ready_info(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "user": self.user,
            "password": self.password,
            "pid": os.getpid(),
            "data": str(self.data_dir),
        }

    def write_ready_file(self, path: str | os.PathLike[str]) -> None:
        """Write url/user/password/pid as JSON, 0600 (it holds a credential), atomically."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".part")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(self.ready_info(), fh)
        os.replace(tmp, target)

    def start(self) -> SandboxServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            name="sandbox",
            kwargs={"poll_interval": 0.2},
            daemon=True,
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._httpd.serve_forever(poll_interval=0.2)

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self._httpd.server_close()
        self.store.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
