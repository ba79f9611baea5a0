"""Users, server sessions, alias tokens and the failed-login lockout, as XNAT 1.8 behaves.

- Each successful Basic or form login opens a new server session (Tomcat's JSESSIONID); a user
  with ``max_sessions`` live sessions cannot log in again (401), as Spring's
  ``maxSessionsPreventsLogin`` does. Sessions die after ``session_timeout`` seconds idle or on
  ``DELETE /data/JSESSION``.
- ``max_failed_logins`` failures in a row lock the account for ``lockout_seconds``; a locked
  account answers 401 like any failed login.
- With ``guest_access`` (a site that lets guests browse public data), a request without a live
  session or credentials is served as the user ``guest`` instead of answering 401, so an expired
  session cookie quietly becomes the guest, who sees no private project (404, 403 for writes).
- Alias tokens are stored in the archive (they survive a restart) and expire after
  ``token_lifetime`` seconds. Unlike a real XNAT, whose hourly clean-up lets a token work up to an
  hour past its estimated expiry, the sandbox refuses a token the moment it expires.
"""

from __future__ import annotations

import secrets
import string
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .store import Store

_SECRET_ALPHABET = string.ascii_letters + string.digits


@dataclass
class User:
    login: str
    password: str
    admin: bool = False


@dataclass
class Session:
    id: str
    login: str
    created: float
    last_access: float


@dataclass
class _Failures:
    count: int = 0
    locked_until: float = 0.0


@dataclass
class AuthSettings:
    max_sessions: int = 1000
    session_timeout: float = 900.0
    token_lifetime: float = 2 * 24 * 3600.0
    max_failed_logins: int = 20
    lockout_seconds: float = 3600.0
    guest_access: bool = False


GUEST = "guest"


@dataclass
class Authority:
    """All authentication state of one sandbox server."""

    store: Store
    settings: AuthSettings = field(default_factory=AuthSettings)
    users: dict[str, User] = field(default_factory=dict)
    sessions: dict[str, Session] = field(default_factory=dict)
    failures: dict[str, _Failures] = field(default_factory=dict)
    sessions_created: int = 0
    tokens_issued: int = 0
    _lock: threading.RLock = field(default_factory=threading.RLock)

    def add_user(self, login: str, password: str, *, admin: bool = False) -> User:
        user = User(login, password, admin)
        with self._lock:
            self.users[login] = user
        return user

    def is_admin(self, login: str | None) -> bool:
        user = self.users.get(login or "")
        return bool(user and user.admin)

    # -- sessions --------------------------------------------------------------------------
    def _expire(self, now: float) -> None:
        dead = [
            sid
            for sid, s in self.sessions.items()
            if now - s.last_access > self.settings.session_timeout
        ]
        for sid in dead:
            del self.sessions[sid]

    def live_sessions(self, login: str | None = None) -> int:
        with self._lock:
            self._expire(time.time())
            return sum(1 for s in self.sessions.values() if login is None or s.login == login)

    def session(self, sid: str | None) -> Session | None:
        """The live session with this id (touching it), or None."""
        if not sid:
            return None
        with self._lock:
            now = time.time()
            self._expire(now)
            found = self.sessions.get(sid)
            if found:
                found.last_access = now
            return found

    def open_session(self, login: str) -> Session | None:
        """A new session, or None when the user already holds ``max_sessions``."""
        with self._lock:
            now = time.time()
            self._expire(now)
            held = sum(1 for s in self.sessions.values() if s.login == login)
            if held >= self.settings.max_sessions:
                return None
            sid = secrets.token_hex(16).upper()
            self.sessions[sid] = Session(sid, login, now, now)
            self.sessions_created += 1
            return self.sessions[sid]

    def close_session(self, sid: str) -> None:
        with self._lock:
            self.sessions.pop(sid, None)

    # -- credentials -----------------------------------------------------------------------
    def check_credentials(self, name: str, password: str) -> str | None:
        """The login that ``name``/``password`` authenticate (user or alias token), else None.

        Failures count towards the lockout of a real user; a provider prefix (``ldap1/alice``)
        is accepted and ignored, as the sandbox has one provider.
        """
        if "/" in name:
            name = name.split("/", 1)[1]
        with self._lock:
            now = time.time()
            token = self.store.token(name) if _looks_like_uuid(name) else None
            if token is not None:
                if (
                    secrets.compare_digest(token["secret"], password)
                    and token["expires"] > now * 1000
                ):
                    return str(token["login"])
                return None
            user = self.users.get(name)
            if user is None:
                return None
            fail = self.failures.setdefault(name, _Failures())
            if fail.locked_until > now:
                return None
            if secrets.compare_digest(user.password, password):
                fail.count = 0
                return name
            fail.count += 1
            if fail.count >= self.settings.max_failed_logins:
                fail.locked_until = now + self.settings.lockout_seconds
                fail.count = 0
            return None

    def is_locked(self, login: str) -> bool:
        with self._lock:
            return self.failures.get(login, _Failures()).locked_until > time.time()

    def failed_logins(self, login: str) -> int:
        """Failed logins in a row not yet forgiven (a lockout starts the count again)."""
        with self._lock:
            return self.failures.get(login, _Failures()).count

    # -- alias tokens ----------------------------------------------------------------------
    def issue_token(self, login: str) -> dict[str, Any]:
        created = int(time.time() * 1000)
        expires = created + int(self.settings.token_lifetime * 1000)
        secret = "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(64))
        row = self.store.add_token(str(uuid.uuid4()), secret, login, created, expires)
        with self._lock:
            self.tokens_issued += 1
        return token_json(row)


def token_json(row: dict[str, Any]) -> dict[str, Any]:
    """A token as XNAT serialises it: epoch-millisecond numbers, nulls omitted."""
    return {
        "alias": row["alias"],
        "secret": row["secret"],
        "xdatUserId": row["login"],
        "singleUse": False,
        "estimatedExpirationTime": row["expires"],
        "enabled": True,
        "created": row["created"],
        "timestamp": row["created"],
        "id": row["id"],
        "disabled": 0,
        "validIPAddresses": [],
    }


def _looks_like_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True
