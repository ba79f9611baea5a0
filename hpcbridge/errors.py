"""The one exception hierarchy of hpcbridge.

Library code raises these; only ``hpcbridge.cli`` turns them into a one-line message and an exit
code. Every error a user can cause says what went wrong and, where there is one, what to do next
(``hint``, or a ``step`` that the CLI words). Messages never contain secrets: callers pass
addresses and URLs without credentials.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from enum import Enum
from typing import Any, Protocol

#: Exit codes of the command-line contract (CLI.md).
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
#: EX_TEMPFAIL of sysexits.h: XNAT was away; the same command may well succeed later. Only the
#: data commands (``stage-in``, ``stage-out``) use it: a job chain's transfer jobs run them, and
#: the bridge waits out such a job's failure instead of failing its scan.
EXIT_TEMPFAIL = 75


#: What to do next when it is a command of hpcbridge's, which ``hpcbridge.cli.hints`` words. The
#: facts a step names are the error's: LOGIN_AT its url, SYNC_AFTER its run_id (after its hint),
#: LS and LS_ABOVE (the one above what was not found) its address, WAIT_FOR_JOB its native_id.
Step = Enum(
    "Step",
    "LOGIN LOGIN_AT LOGIN_FOR_CHAINS LOGIN_THEN_RETRY CHOOSE_SERVER WHOAMI CHECK_URL LIST_RUNS "
    "SYNC_AFTER LS LS_ABOVE LS_TOP RENDER WAIT_FOR_JOB LIST_JOBS CHECK_JOBS_LATER CHECK_JOBS_FIRST "
    "LOGIN_ASKS CONFIG_INIT LIST_RECIPES RECIPES_WHY",
)


class CommandResult(Protocol):
    """What a command did (:class:`hpcbridge.transport.Result` is one)."""

    @property
    def argv(self) -> tuple[str, ...]: ...
    @property
    def exit_code(self) -> int: ...
    @property
    def stdout(self) -> str: ...
    @property
    def stderr(self) -> str: ...
    def said(self) -> str: ...


@dataclass(eq=False, repr=False)
class HpcBridgeError(Exception):
    """Base of every error hpcbridge raises on purpose: its message, and what to do next in its
    own words (``hint``) or as a ``step``. The facts after those are what a step names and a
    program may act on; the constructor that knows one sets it."""

    exit_code = EXIT_ERROR

    message: str
    _: KW_ONLY
    hint: str | None = None
    step: Step | None = None
    run_id: int | None = None
    job_id: int | None = None
    native_id: str | None = None
    address: str | None = None
    url: str | None = None
    #: the status of XNAT's answer
    status: int | None = None
    #: seconds XNAT asked to wait (Retry-After of a 429 or 503), when it said
    retry_after: float | None = None
    #: what the command that failed did (argv, exit code, output)
    result: CommandResult | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

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


class StageError(HpcBridgeError):
    """Staging data in or out failed: a bad download, a refused archive, a verification that
    did not hold, no space. Nothing half-written is left behind."""


class RecipeError(HpcBridgeError):
    """A recipe is invalid, missing, or cannot be rendered with the given values."""


class TransportError(HpcBridgeError):
    """A command could not be run, timed out, or failed (``result`` says how, when it ran); or a
    file could not be moved."""


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

    The message quotes the offending output so the user can see what the scheduler said; ``result``
    is the command's, when one ran.
    """

    @classmethod
    def failed(cls, result: CommandResult, what: str = "failed") -> SchedulerError:
        """A command that failed: ``qstat failed: <what it said last>``, ``what`` for failed."""
        return cls(f"{result.argv[0]} {what}: {result.said()}", result=result)


class PartialFailure(HpcBridgeError):
    """Some items of a batch succeeded and some failed; details are in the output."""

    exit_code = EXIT_PARTIAL


class LedgerError(HpcBridgeError):
    """The run ledger cannot be opened, is locked, is from a newer hpcbridge, or was asked for
    something it does not hold or allow (an unknown run or job, an illegal state change)."""

    @classmethod
    def no_run(cls, run_id: int) -> LedgerError:
        return cls(f"no run {run_id}", step=Step.LIST_RUNS, run_id=run_id)

    @classmethod
    def no_job(cls, job_id: int, ledger: object) -> LedgerError:
        """No job ``job_id`` in the ledger file ``ledger``."""
        return cls(f"no job {job_id} in the ledger {ledger}", job_id=job_id)


class RunBusyError(HpcBridgeError):
    """Another process holds the run's lock (``sync``, ``run``, ``retry`` or ``cancel`` of the
    same run); ``holder`` says who, ``run_id`` which run."""

    def __init__(self, message: str, *, hint: str | None = None, run_id: int, holder: Any) -> None:
        super().__init__(message, hint=hint, run_id=run_id)
        self.holder = holder
