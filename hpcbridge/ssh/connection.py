"""One SSH connection to the destination, through its jump hosts, with its one SFTP session:
opened when first needed, reused, and reopened once when it drops; and commands over it, their
output and stdin pumped together. Connecting, the banner, the handshake, authentication, opening
a channel, each command and each SFTP request have a timeout."""

from __future__ import annotations

import functools
import logging
import select
import shlex
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

import paramiko

from ..errors import SshConnectionError, Step, TransportError
from ..transport import Result
from .auth import authenticate
from .hops import CHUNK, CONNECTION_ERRORS, Dropped, Hop, reason
from .hostkeys import check_host_key, known_keys

log = logging.getLogger(__name__)

T = TypeVar("T")


class Connection:
    """The hops' SSH transports, the last one to the destination.

    Meant for one thread at a time; the lock only keeps two threads that share one anyway
    from opening two connections.
    """

    def __init__(self, hops: list[Hop], *, accept_new_host_key: bool, timeout: float) -> None:
        self.hops = hops
        self.accept_new_host_key = accept_new_host_key
        self.timeout = timeout
        #: successful connections so far (a reconnect adds one)
        self.opened = 0
        self._transports: list[paramiko.Transport] = []
        self._sftp: paramiko.SFTPClient | None = None
        self._lock = threading.RLock()

    @property
    def address(self) -> str:
        return self.hops[-1].address

    def call(self, what: str, op: Callable[[paramiko.Transport], T], *, retry: bool = True) -> T:
        """Run ``op`` on a live connection, reconnecting once if the connection is dead."""
        reconnects = 1
        with self._lock:
            transport = self._transports[-1] if self._transports else None
            if transport is None:
                transport = self._connect()
            elif not transport.is_active():
                reconnects -= 1
                transport = self._reconnect(what)
        while True:
            try:
                return op(transport)
            except Dropped as drop:
                self.discard()
                if drop.sent and not retry:
                    raise SshConnectionError(
                        f"lost the connection to {self.address} while `{what}` was running; "
                        "the command may or may not have run",
                        step=Step.CHECK_JOBS_FIRST,
                    ) from None
                if reconnects == 0:
                    raise SshConnectionError(
                        f"lost the connection to {self.address} again during `{what}`"
                    ) from None
                reconnects -= 1
                with self._lock:
                    transport = self._reconnect(what)

    def execute(
        self, args: tuple[str, ...], timeout: float, stdin: str | None, retry: bool
    ) -> Result:
        """Run ``args`` through the login shell, each element quoted."""
        data = stdin.encode("utf-8") if stdin is not None else b""
        op = functools.partial(self._exec, args, data, timeout)
        return self.call(shlex.join(args), op, retry=retry)

    def _exec(
        self, args: tuple[str, ...], data: bytes, timeout: float, transport: paramiko.Transport
    ) -> Result:
        command = shlex.join(args)
        try:
            channel = transport.open_session(timeout=self.timeout)
        except paramiko.ChannelException as exc:
            raise TransportError(
                f"{self.address} refused to open a session: {reason(exc)}"
            ) from None
        except CONNECTION_ERRORS:
            raise Dropped(sent=False) from None
        with channel:
            try:
                channel.exec_command(command)
            except CONNECTION_ERRORS as exc:
                if _died(transport, grace=1.0):
                    raise Dropped(sent=True) from None
                raise TransportError(
                    f"{self.address} refused to run `{command}`: {reason(exc)}"
                ) from None
            pump = _Pump(channel, data)
            if not pump.run(time.monotonic() + timeout):
                raise TransportError(
                    f"`{command}` did not finish within {timeout:g} s on {self.address}"
                )
            code = channel.exit_status
            # No exit status: the connection died, or a signal killed the command. A server
            # sends EOF before closing a finished channel; a dying connection closes its
            # channels first and marks itself inactive a moment later.
            if code == -1 and _died(transport, grace=0 if channel.eof_received else 1.0):
                raise Dropped(sent=True)
        out, err = (b"".join(chunks).decode("utf-8", "replace") for chunks in (pump.out, pump.err))
        return Result(args, code, out, err)

    def sftp_call(self, what: str, fn: Callable[[paramiko.SFTPClient], T], timeout: float) -> T:
        """Run an SFTP action on the shared session, each request answered within ``timeout``
        seconds; SFTP errors come back as OSError."""

        def op(transport: paramiko.Transport) -> T:
            sftp = self._sftp_session(transport, timeout)
            try:
                return fn(sftp)
            except TimeoutError:
                # a late answer would confuse the next request, so this session is done
                self._sftp = None
                sftp.close()
                raise TransportError(
                    f"{what}: {self.address} did not answer within {timeout:g} s"
                ) from None
            except CONNECTION_ERRORS as exc:
                if sftp.get_channel().closed or not transport.is_active():
                    raise Dropped(sent=True) from None
                if isinstance(exc, OSError):
                    raise
                raise TransportError(f"{what}: {reason(exc)}") from None

        return self.call(what, op)

    def _sftp_session(self, transport: paramiko.Transport, timeout: float) -> paramiko.SFTPClient:
        if self._sftp is not None:
            return self._sftp
        try:
            sftp = paramiko.SFTPClient.from_transport(transport)
        except (*CONNECTION_ERRORS, paramiko.SFTPError) as exc:
            if transport.is_active():
                raise TransportError(
                    f"{self.address} does not offer SFTP: {reason(exc)}",
                    hint="hpcbridge needs the sftp subsystem on the login node",
                ) from None
            raise Dropped(sent=False) from None
        if sftp is None:
            raise Dropped(sent=False)
        sftp.get_channel().settimeout(timeout)
        self._sftp = sftp
        return sftp

    def discard(self) -> None:
        """Drop the connection (and SFTP session) without caring whether it is alive."""
        with self._lock:
            sftp, self._sftp = self._sftp, None
            transports, self._transports = self._transports, []
        if sftp is not None:
            try:
                sftp.close()
            except Exception:  # closing a dead session may fail any way
                pass
        for transport in reversed(transports):
            transport.close()

    def _reconnect(self, what: str) -> paramiko.Transport:
        log.warning("the connection to %s dropped; reconnecting for `%s`", self.address, what)
        self.discard()
        try:
            return self._connect()
        except SshConnectionError as exc:
            why = f"lost the connection to {self.address} and could not reconnect: {exc.message}"
            raise replace(exc, message=why) from None  # its hint and facts still hold

    def _connect(self) -> paramiko.Transport:
        opened: list[paramiko.Transport] = []
        try:
            for index, hop in enumerate(self.hops):
                if index == 0:
                    sock: Any = self._dial(hop)
                else:
                    sock = self._tunnel(opened[-1], self.hops[index - 1], hop)
                try:
                    opened.append(paramiko.Transport(sock))
                except BaseException:
                    sock.close()
                    raise
                self._handshake(opened[-1], hop)
                authenticate(opened[-1], hop)
        except BaseException:
            for transport in reversed(opened):
                transport.close()
            raise
        self._transports = opened
        self.opened += 1
        log.debug("connected to %s (connection %d)", self.address, self.opened)
        return opened[-1]

    def _dial(self, hop: Hop) -> socket.socket:
        try:
            return socket.create_connection((hop.hostname, hop.port), timeout=self.timeout)
        except socket.gaierror:
            raise SshConnectionError(
                f"cannot resolve the host name {hop.hostname!r}",
                hint="check the name, or its Host/HostName entry in ~/.ssh/config",
            ) from None
        except ConnectionRefusedError:
            raise SshConnectionError(
                f"{hop.label} refused the connection",
                hint="is sshd running there, and is the port right?",
            ) from None
        except TimeoutError:
            raise SshConnectionError(
                f"{hop.label} did not answer within {self.timeout:g} s",
                hint="check the host name and port, and any VPN or firewall on the way",
            ) from None
        except OSError as exc:
            raise SshConnectionError(f"cannot reach {hop.label}: {reason(exc)}") from None

    def _tunnel(self, via: paramiko.Transport, jump: Hop, hop: Hop) -> paramiko.Channel:
        try:
            return via.open_channel(
                "direct-tcpip", (hop.hostname, hop.port), ("127.0.0.1", 0), timeout=self.timeout
            )
        except CONNECTION_ERRORS as exc:
            raise SshConnectionError(
                f"jump host {jump.where} could not connect to {hop.where}: {reason(exc)}",
                hint="check the destination's name and port as the jump host sees them"
                if isinstance(exc, paramiko.ChannelException)
                else None,
            ) from None

    def _handshake(self, transport: paramiko.Transport, hop: Hop) -> None:
        transport.banner_timeout = transport.handshake_timeout = self.timeout
        transport.auth_timeout = transport.channel_timeout = self.timeout
        known = known_keys(transport, hop)
        try:
            transport.start_client(timeout=self.timeout)
            server_key = transport.get_remote_server_key()
        except CONNECTION_ERRORS as exc:
            why = f"no answer within {self.timeout:g} s" if transport.is_active() else reason(exc)
            raise SshConnectionError(f"SSH handshake with {hop.label} failed: {why}") from None
        check_host_key(hop, known, server_key, accept_new=self.accept_new_host_key)


def _died(transport: paramiko.Transport, *, grace: float) -> bool:
    """Whether the connection is dead, waiting up to ``grace`` s for it to say so."""
    give_up = time.monotonic() + grace
    while transport.is_active() and time.monotonic() < give_up:
        time.sleep(0.01)
    return not transport.is_active()


class _Pump:
    """Both output streams and stdin at once, so no side waits on a full window."""

    def __init__(self, channel: paramiko.Channel, data: bytes) -> None:
        self.channel = channel
        self.data = data
        self.sent = 0
        self.out: list[bytes] = []
        self.err: list[bytes] = []

    def run(self, deadline: float) -> bool:
        """Until the command ended (True) or the deadline passed (False)."""
        if not self.data:
            self.channel.shutdown_write()
        while True:
            self._drain()
            self._feed()
            channel = self.channel
            if channel.closed or (channel.eof_received and channel.status_event.is_set()):
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._wait(remaining)
        self._drain()
        return True

    def _drain(self) -> None:
        while self.channel.recv_ready():
            self.out.append(self.channel.recv(CHUNK))
        while self.channel.recv_stderr_ready():
            self.err.append(self.channel.recv_stderr(CHUNK))

    def _feed(self) -> None:
        channel, data = self.channel, self.data
        while self.sent < len(data) and channel.send_ready() and not channel.closed:
            try:
                self.sent += channel.send(data[self.sent : self.sent + CHUNK])
            except OSError:
                break  # the command stopped reading; what it printed still counts
            if self.sent >= len(data):
                channel.shutdown_write()

    def _wait(self, remaining: float) -> None:
        if self.channel.eof_received:
            # no more output can come, and the fd would stay readable: wait for the status
            self.channel.status_event.wait(min(remaining, 0.5))
        else:
            # the fd signals output and close, not window space for stdin, hence the poll
            wait = 0.05 if self.sent < len(self.data) else 0.5
            select.select([self.channel], [], [], min(remaining, wait))
