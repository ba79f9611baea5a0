"""XNAT's alias tokens (``/data/services/tokens``): issue, show, validate and invalidate; users
manage their own, site admins anyone's.
"""

from __future__ import annotations

import time

from .auth import token_json
from .http import HttpError, Reply, Request
from .views import NO_MATCH, Site

NON_ADMIN_TOKENS = (
    "Non-admin users can only request operations on alias tokens for their own account"
)


def route(site: Site, req: Request, segs: list[str]) -> Reply:
    if not segs:
        raise HttpError(404, NO_MATCH)
    op, rest = segs[0], segs[1:]
    admin = site.auth.is_admin(req.user)
    if op == "issue":
        return _issue(site, req, rest, admin)
    if op == "show":
        login = rest[1] if rest[:1] == ["user"] and len(rest) == 2 else req.user or ""
        if login != req.user and not admin:
            raise HttpError(403, NON_ADMIN_TOKENS)
        return Reply.json([token_json(t) for t in site.store.tokens_of(login)])
    if op in ("validate", "invalidate") and len(rest) in (1, 2):
        token = site.store.token(rest[0])
        if token is None:
            raise HttpError(404, f"Can't find an alias token with the alias {rest[0]}")
        if token["login"] != req.user and not admin:
            raise HttpError(403, NON_ADMIN_TOKENS)
        if op == "invalidate":
            site.store.delete_token(rest[0])
            return Reply.json({"result": "OK"})
        secret = rest[1] if len(rest) == 2 else ""
        valid = secret == token["secret"] and token["expires"] > time.time() * 1000
        return Reply.json({"valid": token["login"]} if valid else {})
    raise HttpError(404, NO_MATCH)


def _issue(site: Site, req: Request, rest: list[str], admin: bool) -> Reply:
    login = req.user or ""
    if rest[:1] == ["user"] and len(rest) == 2:
        if not admin:
            raise HttpError(403, "Only site admins can request alias tokens for other users")
        login = rest[1]
        if login not in site.auth.users:
            raise HttpError(404, f"Couldn't find a user with the login {login}")
    elif rest:
        raise HttpError(404, NO_MATCH)
    return Reply.json(site.auth.issue_token(login))
