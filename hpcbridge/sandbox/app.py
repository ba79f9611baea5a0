"""The sandbox's application: authentication before routing, the way XNAT's Spring filter chain
runs before its Restlet routes, then the routes outside the archive (sessions, login, search
elements, schemas, the sandbox's own statistics and faults); ``archive`` answers the rest.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections import deque
from importlib import resources
from urllib.parse import parse_qsl

from . import archive, tokens, workflows
from .auth import GUEST, Authority
from .http import Faults, HttpError, Reply, Request, Stats, cookie
from .listing import render_table
from .store import Store
from .views import NO_MATCH, Site

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
        self.site = Site(store, authority)
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
            raise HttpError(404, NO_MATCH)
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
            return tokens.route(self.site, req, segs[2:])
        if head == "workflows":
            return workflows.route(self.site, req, segs[1:])
        if head == "search" and len(segs) > 1 and segs[1] == "elements":
            return self.search_elements(req, segs[2:])
        if head in ("projects", "subjects", "experiments"):
            return archive.handle(self.site, req, segs)
        raise HttpError(404, NO_MATCH)

    def guest_route(self, req: Request, segs: list[str]) -> Reply:
        """What XNAT's guest user sees of the sandbox, whose projects are all private: none of
        them (404, as XNAT hides a private project), and no right to change anything (403)."""
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
        raise HttpError(404, NO_MATCH)

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
        reply.headers["Set-Cookie"] = cookie("JSESSIONID", opened.id)
        return reply

    # -- model discovery for xnatpy ------------------------------------------------------
    def search_elements(self, req: Request, segs: list[str]) -> Reply:
        if not segs:
            store = self.store
            counts = [len(store.projects()), len(store.subjects()), len(store.experiments())]
            rows = [
                {"ELEMENT_NAME": n, "SINGULAR": s, "PLURAL": p, "SECURED": "true", "COUNT": c}
                for (n, s, p), c in zip(SEARCH_ELEMENTS, counts, strict=True)
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


def _csrf(session_id: str) -> str:
    return hashlib.sha256(("csrf:" + session_id).encode()).hexdigest()[:32]
