"""What every part of the SSH package shares: which errors mean a broken connection, and how a
low-level error is worded in a message."""

from __future__ import annotations

import errno

import paramiko

CHUNK = 32768
CONNECTION_ERRORS = (paramiko.SSHException, EOFError, OSError)


class Dropped(Exception):
    """The connection broke during an operation; ``sent`` if a command may have started."""

    def __init__(self, sent: bool) -> None:
        super().__init__("connection dropped")
        self.sent = sent


def reason(exc: BaseException) -> str:
    """A short reason for a low-level error; paramiko's messages are often empty."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower() if exc.strerror[:1].isupper() else exc.strerror
    text = str(exc).strip().rstrip(".")
    return text or type(exc).__name__


def sftp_reason(exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return "no such file or directory"
    if exc.errno == errno.EACCES:
        return "permission denied"
    return reason(exc)
