"""The one exception hierarchy of hpcbridge.

Library code raises these; only ``hpcbridge.cli`` turns them into a one-line message and an exit
code. Every error a user can cause says what went wrong and, where there is one, what to do next
(``hint``). Messages never contain secrets: callers pass addresses and URLs without credentials.
"""

from __future__ import annotations

from typing import Any

#: Exit codes of the command-line contract (CLI.md).
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
#: EX_TEMPFAIL of sysexits.h: XNAT was away; the same command may well succeed later. Only the
#: data commands (``stage-in``, ``stage-out``) use it: a job chain's transfer jobs run them, and
#: the bridge waits out such a job's failure instead of failing its scan.
EXIT_TEMPFAIL = 75


class HpcBridgeError(Exception):
    """Base of every error hpcbridge raises on purpose."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(HpcBridgeError):
    """A setting, profile or config file is missing or malformed."""

    exit_code = EXIT_USAGE


class CredentialError(HpcBridgeError):
    """Credentials are missing, unreadable, or stored with unsafe permissions."""


class AddressError(HpcBridgeError):
    """An XNAT address such as ``PROJECT/SUBJECT/EXPERIMENT/SCAN`` cannot be parsed."""

    exit_code = EXIT_USAGE


class XnatError(HpcBridgeError):
    """Anything that went wrong talking to an XNAT server."""

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        status: int | None = None,
        url: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.url = url
        #: seconds the server asked us to wait (Retry-After of a 429 or 503), when it said
        self.retry_after = retry_after


class XnatConnectionError(XnatError):
    """The server could not be reached or the connection broke."""


class XnatAuthError(XnatError):
    """Authentication failed, or the session or token has expired (401, login page)."""


class XnatPermissionError(XnatError):
    """The user is authenticated but not allowed to do this (403)."""


class XnatNotFoundError(XnatError):
    """The addressed project, subject, experiment, scan, resource or file does not exist (404)."""


class XnatConflictError(XnatError):
    """The object already exists or a label is taken (409)."""


class XnatServerError(XnatError):
    """Any other unexpected answer; carries the status and an excerpt of the body."""


def xnat_away(exc: BaseException) -> bool:
    """Whether ``exc`` says XNAT is away for now (it could not be reached, or answered 408, 429
    or 5xx) rather than that the request itself is wrong: the same request may work later."""
    if isinstance(exc, XnatConnectionError):
        return True
    status = exc.status if isinstance(exc, XnatError) else None
    return status is not None and (status in (408, 429) or status >= 500)


class TemporaryFailure(HpcBridgeError):
    """XNAT was away (see :func:`xnat_away`); trying the same again later may well work."""

    exit_code = EXIT_TEMPFAIL

    def __init__(
        self, message: str, *, hint: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        #: seconds XNAT asked to wait (Retry-After), when it said
        self.retry_after = retry_after


class StageError(HpcBridgeError):
    """Staging data in or out failed: a bad download, a refused archive, a verification that
    did not hold, no space. Nothing half-written is left behind."""


class RecipeError(HpcBridgeError):
    """A recipe is invalid, missing, or cannot be rendered with the given values."""


class TransportError(HpcBridgeError):
    """A command could not be run, timed out, or failed; or a file could not be moved."""


class SshConnectionError(TransportError):
    """An SSH host could not be reached, or the connection dropped and reconnecting failed."""


class HostKeyError(TransportError):
    """An SSH host's key is unknown (and accepting new keys was not asked for) or has changed."""


class SshAuthError(TransportError):
    """The SSH server refused every key and method offered."""


class SandboxError(HpcBridgeError):
    """The sandbox XNAT server could not be started, found or stopped."""


class SchedulerError(HpcBridgeError):
    """A scheduler command's output could not be understood, or the scheduler refused a request.

    The message quotes the offending output so the user can see what the scheduler said.
    """


class PartialFailure(HpcBridgeError):
    """Some items of a batch succeeded and some failed; details are in the output."""

    exit_code = EXIT_PARTIAL


class LedgerError(HpcBridgeError):
    """The run ledger cannot be opened, is locked, is from a newer hpcbridge, or was asked for
    something it does not hold or allow (an unknown run or job, an illegal state change)."""

    run_id: int | None = None
    job_id: int | None = None

    @classmethod
    def no_run(cls, run_id: int) -> LedgerError:
        error = cls(f"no run {run_id}", hint="`hpcbridge runs` lists the runs")
        error.run_id = run_id
        return error

    @classmethod
    def no_job(cls, job_id: int, ledger: object) -> LedgerError:
        """No job ``job_id`` in the ledger file ``ledger``."""
        error = cls(f"no job {job_id} in the ledger {ledger}")
        error.job_id = job_id
        return error


class RunBusyError(HpcBridgeError):
    """Another process holds the run's lock (``sync``, ``run``, ``retry`` or ``cancel`` of the
    same run); ``holder`` says who, ``run_id`` which run."""

    def __init__(self, message: str, *, hint: str | None = None, run_id: int, holder: Any) -> None:
        super().__init__(message, hint=hint)
        self.run_id = run_id
        self.holder = holder
