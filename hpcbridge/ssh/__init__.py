"""The login node over SSH: one paramiko connection per transport, commands and SFTP over it.

Opening an SSH connection costs a TCP handshake, key exchange and authentication, often
through a jump host, so a transport opens one connection lazily and reuses it (one SFTP session
too) for everything it does. Behaviour follows OpenSSH where users will compare the two:
``~/.ssh/config`` (Host aliases, HostName, User, Port, IdentityFile, UserKnownHostsFile,
ProxyJump), the SSH agent, and strict host-key checking against ``known_hosts``; accepting an
unknown key is an explicit opt-in and a changed key is always refused.

A dropped connection is reopened once and the operation retried, unless the operation was a
command that is not safe to run twice (``run(..., retry=False)``, e.g. ``qsub``) and the
connection broke after the command was sent: then nobody knows whether it ran, and the error
says so instead of guessing.

The parts, bottom up: ``hops`` (ssh config, ProxyJump, shared errors), ``hostkeys``, ``auth``,
``connection`` (and commands over it), ``transfer`` (SFTP); ``SshTransport`` here composes them.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..transport import Result, Transport
from .connection import Connection
from .hops import route
from .transfer import SftpFiles

# paramiko logs socket errors and tracebacks from its own thread; with no handler configured,
# Python's last-resort handler would print them under our one-line error messages.
if not logging.getLogger("paramiko").handlers:
    logging.getLogger("paramiko").addHandler(logging.NullHandler())


class SshTransport(SftpFiles, Transport):
    """Commands and files on a remote host over one lazily opened SSH connection.

    Meant for one thread at a time; the lock only keeps two threads that share one anyway
    from opening two connections.
    """

    name = "ssh"

    def __init__(
        self,
        destination: str,
        *,
        ssh_config: Path | None = None,
        known_hosts: Path | None = None,
        accept_new_host_key: bool = False,
        connect_timeout: float = 15.0,
    ) -> None:
        self._connection = Connection(
            route(destination, ssh_config, known_hosts),
            accept_new_host_key=accept_new_host_key,
            timeout=connect_timeout,
        )

    @property
    def address(self) -> str:
        """``user@host:port`` of the destination after ssh config resolution."""
        return self._connection.address

    @property
    def jump_hosts(self) -> tuple[str, ...]:
        """``user@host:port`` of each ProxyJump hop, first hop first."""
        return tuple(hop.address for hop in self._connection.hops[:-1])

    @property
    def connections_opened(self) -> int:
        """Successful connections so far (a reconnect adds one); tests check reuse with it."""
        return self._connection.opened

    def close(self) -> None:
        self._connection.discard()

    def _run(self, args: tuple[str, ...], timeout: float, stdin: str | None, retry: bool) -> Result:
        """Run ``args`` on the remote host through its login shell, each element quoted; with
        ``retry=False``, a drop after the command was sent is an error saying it may have run."""
        return self._connection.execute(args, timeout, stdin, retry)
