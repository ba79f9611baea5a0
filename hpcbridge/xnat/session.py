"""The XNAT session under the client: one login, the JSESSIONID after it, and its renewal.

See client.py for why (a session per request locks users out; guests; refused logins).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import Any

import requests

from ..config import insecure_http
from ..credentials import LoginRefusals, Secret, SessionCache
from ..errors import Step, XnatAuthError, XnatError, XnatServerError
from .failures import looks_like_login_page, raise_for_response
from .http import HttpBase

log = logging.getLogger(__name__)

#: The user XNAT serves requests without a live session as, where the site allows guests.
GUEST_USER = "guest"
#: How long a session proven ours (by a login, or by a look at /data/auth) is trusted to still be
#: ours when XNAT answers 403 or 404; at most half the server's idle timeout where XNAT says it.
#: Without it, every expected 404 (a resource that stage-out is about to create, the walk up an
#: address that names something missing) would cost one more request.
TRUST_SECONDS = 60.0


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


class SessionBase(HttpBase):
    """The HTTP layer plus one XNAT server session: logged in once, renewed when it dies."""

    def __init__(
        self,
        url: str,
        credentials: Secret | None,
        *,
        timeout: float = 60.0,
        verify: bool | str = True,
        retries: int = 3,
        backoff: float = 0.5,
        session_cache: SessionCache | None = None,
        allow_insecure_http: bool = False,
        refusals: LoginRefusals | None = None,
    ) -> None:
        super().__init__(url, timeout, verify, retries, backoff, allow_insecure_http)
        self.credentials = credentials
        self.session_cache = session_cache
        self.refusals = refusals
        self._warned_clear_text = False
        self.session_id: str | None = None
        self._proven_at: float | None = None  # time.monotonic() of the last proof
        #: Answers that cannot change while this client lives (an experiment's ID for its
        #: label), kept so that a run asks once per session, not once per scan and step.
        self.memo: dict[str, Any] = {}

    def _use_session(self, session_id: str) -> None:
        self.http.cookies.clear()
        self.http.cookies.set("JSESSIONID", session_id)
        self.session_id = session_id
        self._proven_at = None

    def _warn_clear_text(self) -> None:
        if insecure_http(self.base) and not self._warned_clear_text:
            self._warned_clear_text = True
            log.warning(
                "%s sends your password, token and XNAT session in clear text: anyone on the "
                "network path can read and reuse them (allow_insecure_http is set; use https "
                "if the server offers it)",
                self.base,
            )

    def _resume_or_login(self) -> None:
        if self.session_id is not None:
            return
        self._warn_clear_text()
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
            self._renew(adopt=True)

    def _renew(self, *, adopt: bool) -> bool:
        """A new session for a missing or dead one: with ``adopt``, the one a sibling sharing
        the session cache has just opened, if it has (True); else a login (False). See
        SessionCache.renewal: a chain's jobs that find the session dead together open one."""
        creds = self.credentials
        if self.session_cache is None or creds is None:
            self.login()
            return False
        with self.session_cache.renewal(self.base, creds.user, self.session_id) as newer:
            if adopt and newer:
                log.debug("using the XNAT session another process has just opened")
                self._use_session(newer)
                return True
            self.login()
            return False

    def login(self, *, retry_refused: bool = False) -> None:
        """Open a server session with the credentials (the only request that sends them).

        A secret that XNAT refused before is not sent again (see :class:`LoginRefusals`)
        unless ``retry_refused`` (``hpcbridge login``, where someone types it).
        """
        creds = self.credentials
        if creds is None:
            raise XnatAuthError(f"no credentials for {self.base}", step=Step.LOGIN)
        if self.refusals is not None and not retry_refused:
            refused = self.refusals.get(self.base, creds.user, creds.secret)
            if refused is not None:
                raise XnatAuthError(
                    f"XNAT refused the {_credential_kind(creds)} for {_who(creds)} at "
                    f"{self.base} {_when(refused.refused_at)}; not trying again, to keep XNAT "
                    "from locking the account",
                    step=Step.LOGIN,
                    url=self.base,
                )
        self._warn_clear_text()
        self.http.cookies.clear()
        resp = self._send("POST", "/data/JSESSION", auth=(creds.user, creds.secret))
        if resp.status_code == 401 or looks_like_login_page(resp):
            if self.refusals is not None:
                self.refusals.put(self.base, creds.user, creds.secret, source=creds.source)
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
        self._proven_at = time.monotonic()
        if self.refusals is not None:
            self.refusals.clear(self.base, creds.user)
        if self.session_cache is not None:
            self.session_cache.put(self.base, creds.user, session_id)

    def _refused(self, creds: Secret, status: int) -> XnatAuthError:
        if creds.is_token and creds.expired():
            when = expiry_text(creds.expires_ms or 0)
            why = f"the alias token stored for {self.base} expired {when}"
        elif creds.is_token:
            why = (
                f"XNAT at {self.base} refused the stored alias token "
                "(invalidated or expired on the server)"
            )
        else:
            why = (
                f"XNAT at {self.base} refused the credentials of {creds.user} (from "
                f"{creds.source}); wrong password, locked account, or too many open sessions"
            )
        return XnatAuthError(why, step=Step.LOGIN, status=status, url=self.base)

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

    def request(self, method: str, path: str, what: str, **kwargs: Any) -> requests.Response:
        """An authenticated request; logs in again once if the session has gone."""
        self._resume_or_login()
        resp = self._send(method, path, **kwargs)
        if resp.status_code == 401 or looks_like_login_page(resp):
            log.info("XNAT session expired; logging in again")
            resp = self._again(resp, method, path, kwargs)
        elif (
            resp.status_code in (403, 404)
            and self.credentials is not None
            and not self._trusted()
            and self._session_lost()
        ):
            log.info("XNAT took the session for its guest user (it expired); logging in again")
            resp = self._again(resp, method, path, kwargs)
        raise_for_response(resp, what)
        return resp

    def _again(
        self, resp: requests.Response, method: str, path: str, kwargs: dict[str, Any]
    ) -> requests.Response:
        """The request once more, on a new session."""
        resp.close()
        self._rewind(kwargs.get("data"))
        if self._renew(adopt=True):
            resp = self._send(method, path, **kwargs)
            if not (
                resp.status_code == 401
                or looks_like_login_page(resp)
                or (resp.status_code in (403, 404) and self._session_lost())
            ):
                return resp
            # the sibling's session is gone too: a login of this process's own
            resp.close()
            self._rewind(kwargs.get("data"))
            self._renew(adopt=False)
        return self._send(method, path, **kwargs)

    def _trusted(self) -> bool:
        """Whether the session was proven ours so recently that it cannot have expired."""
        if self._proven_at is None:
            return False
        window = TRUST_SECONDS
        # "<now ms>,<idle timeout ms>", quoted by the container because of the comma.
        stamps = [c.value for c in self.http.cookies if c.name == "SESSION_EXPIRATION_TIME"]
        stamp = (stamps[-1] or "").strip('"') if stamps else ""
        idle_ms = stamp.partition(",")[2]
        if idle_ms.isdigit():
            window = min(window, int(idle_ms) / 2000)
        return time.monotonic() - self._proven_at < window

    def _session_lost(self) -> bool:
        """Whether XNAT now serves this session as someone else than us: its guest user, or
        nobody (401). Anything else, or no answer, leaves the first answer standing."""
        try:
            resp = self._send("GET", "/data/auth")
        except XnatError as exc:
            log.debug("could not ask XNAT who is logged in: %s", exc)
            return False
        with resp:
            if resp.status_code == 401 or looks_like_login_page(resp):
                return True
            name = _user_of(resp.text) if resp.status_code == 200 else None
        if name is None:
            return False
        if name.lower() == GUEST_USER:
            return True
        self._proven_at = time.monotonic()
        return False

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


def _user_of(text: str) -> str | None:
    """The user of ``GET /data/auth``'s "User 'alice' is logged in", or None."""
    text = text.strip()
    if text.startswith("User '") and "'" in text[6:]:
        return text[6 : text.index("'", 6)]
    return None


def _who(creds: Secret) -> str:
    return (creds.owner or creds.user) if creds.is_token else creds.user


def _credential_kind(creds: Secret) -> str:
    return "alias token" if creds.is_token else "credentials"


def _when(epoch: float, now: float | None = None) -> str:
    """'at 10:02 UTC' today, 'on 2026-12-06 at 10:02 UTC' before."""
    moment = datetime.fromtimestamp(epoch, tz=timezone.utc)
    today = datetime.fromtimestamp(time.time() if now is None else now, tz=timezone.utc)
    clock = moment.strftime("%H:%M UTC")
    return f"at {clock}" if moment.date() == today.date() else f"on {moment:%Y-%m-%d} at {clock}"
