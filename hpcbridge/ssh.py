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
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import errno
import getpass
import hashlib
import logging
import os
import select
import shlex
import socket
import stat
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import paramiko

from .config import redact_url
from .errors import ConfigError, HostKeyError, SshAuthError, SshConnectionError, TransportError
from .transport import READ_LIMIT, Result, Transport, remote_path

log = logging.getLogger(__name__)

# paramiko logs socket errors and tracebacks from its own thread; with no handler configured,
# Python's last-resort handler would print them under our one-line error messages.
if not logging.getLogger("paramiko").handlers:
    logging.getLogger("paramiko").addHandler(logging.NullHandler())

T = TypeVar("T")

SSH_PORT = 22
#: Keys OpenSSH tries when the config names no IdentityFile (the types paramiko can load).
DEFAULT_IDENTITIES = ("id_rsa", "id_ecdsa", "id_ed25519")
_CHUNK = 32768
_MAX_JUMPS = 8
_CONNECTION_ERRORS = (paramiko.SSHException, EOFError, OSError)


def fingerprint(key: paramiko.PKey) -> str:
    """The key's fingerprint as OpenSSH prints it, to compare with ``ssh-keygen -l``."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


@dataclasses.dataclass(frozen=True)
class _Hop:
    """One SSH server on the way to the destination, after ssh config resolution."""

    hostname: str
    port: int
    user: str
    identity_files: tuple[Path, ...]
    identities_only: bool
    known_hosts: Path
    jump: bool = False

    @property
    def where(self) -> str:
        return f"{self.hostname}:{self.port}"

    @property
    def label(self) -> str:
        # errors on the way must say it was the jump host, not the cluster, that failed
        return f"jump host {self.where}" if self.jump else self.where

    @property
    def who(self) -> str:
        return f"jump host {self.address}" if self.jump else self.address

    @property
    def address(self) -> str:
        return f"{self.user}@{self.hostname}:{self.port}"

    @property
    def hostkey_name(self) -> str:
        # the name OpenSSH files the key under in known_hosts
        return self.hostname if self.port == SSH_PORT else f"[{self.hostname}]:{self.port}"


class _Dropped(Exception):
    """The connection broke during an operation; ``sent`` if a command may have started."""

    def __init__(self, sent: bool) -> None:
        super().__init__("connection dropped")
        self.sent = sent


def _shown(destination: str) -> str:
    """A destination as an error may quote it: a password in it (which settings refuse, but a
    destination may come from elsewhere) masked with the user part."""
    rest = destination.partition("://")[2] or destination
    return redact_url(destination) if ":" in rest.rpartition("@")[0] else destination


def _split_destination(text: str) -> tuple[str | None, str, int | None]:
    """``[user@]host[:port]`` or ``ssh://[user@]host[:port]`` as (user, host, port)."""
    raw = text.strip()
    user: str | None
    port: int | None = None
    if raw.startswith("ssh://"):
        parts = urlsplit(raw)
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.password:
            raise ConfigError(
                f"invalid SSH destination {_shown(text)!r}: expected ssh://[user@]host[:port]"
            )
        try:
            port = parts.port
        except ValueError:
            raise ConfigError(f"invalid SSH destination {_shown(text)!r}: bad port") from None
        user = unquote(parts.username) if parts.username else None
        host = parts.hostname or ""
    else:
        user_part, at, rest = raw.rpartition("@")
        user = user_part if at else None
        host = rest
        if rest.startswith("["):
            close = rest.find("]")
            tail = rest[close + 1 :] if close > 0 else "?"
            if close < 0 or (tail and not tail.startswith(":")):
                raise ConfigError(f"invalid SSH destination {_shown(text)!r}")
            host = rest[1:close]
            port_text = tail[1:] if tail else None
        elif rest.count(":") == 1:
            host, port_text = rest.split(":")
        else:
            port_text = None  # a bare IPv6 address has several colons and no port
        if port_text is not None:
            if not port_text.isdigit():
                raise ConfigError(f"invalid SSH destination {_shown(text)!r}: bad port")
            port = int(port_text)
    if (
        not host
        or host.startswith("-")
        or any(c.isspace() or c in "/@" for c in host)
        or (user is not None and (not user or any(c.isspace() for c in user)))
    ):
        raise ConfigError(
            f"invalid SSH destination {_shown(text)!r}: expected [user@]host or ssh://..."
        )
    if port is not None and not 0 < port < 65536:
        raise ConfigError(f"invalid SSH destination {_shown(text)!r}: port out of range")
    return user, host, port


def _reason(exc: BaseException) -> str:
    """A short reason for a low-level error; paramiko's messages are often empty."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower() if exc.strerror[:1].isupper() else exc.strerror
    text = str(exc).strip().rstrip(".")
    return text or type(exc).__name__


def _sftp_reason(exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return "no such file or directory"
    if exc.errno == errno.EACCES:
        return "permission denied"
    return _reason(exc)


class SshTransport(Transport):
    """Commands and files on a remote host over one lazily opened SSH connection.

    Meant for one thread at a time; the lock only keeps two threads that share one anyway
    from opening two connections.
    """

    name = "ssh"
    #: how long one SFTP request may go unanswered before the transfer is abandoned
    sftp_timeout = 60.0

    def __init__(
        self,
        destination: str,
        *,
        ssh_config: Path | None = None,
        known_hosts: Path | None = None,
        accept_new_host_key: bool = False,
        connect_timeout: float = 15.0,
    ) -> None:
        self.destination = destination
        self.accept_new_host_key = accept_new_host_key
        self.connect_timeout = connect_timeout
        #: successful connections so far (a reconnect adds one); tests check reuse with it
        self.connections_opened = 0
        self._explicit_known_hosts = known_hosts
        self._config = self._load_config(ssh_config)
        user, host, port = _split_destination(destination)
        self._hops = self._route(user, host, port)
        self._transports: list[paramiko.Transport] = []
        self._sftp: paramiko.SFTPClient | None = None
        self._posix_rename = True
        self._lock = threading.RLock()

    # -- what the transport talks to -------------------------------------------------------

    @property
    def address(self) -> str:
        """``user@host:port`` of the destination after ssh config resolution."""
        return self._hops[-1].address

    @property
    def jump_hosts(self) -> tuple[str, ...]:
        """``user@host:port`` of each ProxyJump hop, first hop first."""
        return tuple(hop.address for hop in self._hops[:-1])

    @staticmethod
    def _load_config(path: Path | None) -> paramiko.SSHConfig:
        if path is None:
            path = Path.home() / ".ssh" / "config"
            if not path.exists():
                return paramiko.SSHConfig()
        try:
            return paramiko.SSHConfig.from_path(str(path))
        except OSError as exc:
            raise ConfigError(f"cannot read SSH config {path}: {_reason(exc)}") from None
        except paramiko.ssh_exception.ConfigParseError as exc:
            raise ConfigError(f"SSH config {path}: {exc}") from None

    def _lookup(self, host: str) -> dict[str, Any]:
        try:
            return dict(self._config.lookup(host))
        except Exception as exc:  # Match/exec and token errors have no common base
            raise ConfigError(f"SSH config entry for {host!r}: {_reason(exc)}") from None

    def _resolve(self, user: str | None, host: str, port: int | None) -> tuple[_Hop, str | None]:
        """The hop that ``[user@]host[:port]`` means under the ssh config, and its ProxyJump."""
        opts = self._lookup(host)
        if opts.get("proxycommand", "none").lower() != "none":
            raise ConfigError(
                f"SSH config for {host!r} uses ProxyCommand, which hpcbridge does not support",
                hint="use ProxyJump instead",
            )
        if port is None:
            try:
                port = int(opts.get("port", SSH_PORT))
            except ValueError:
                raise ConfigError(f"SSH config for {host!r}: bad Port {opts['port']!r}") from None
        files = [Path(os.path.expanduser(f)) for f in opts.get("identityfile", [])]
        if not files:
            home = Path.home() / ".ssh"
            files = [home / name for name in DEFAULT_IDENTITIES]
        if self._explicit_known_hosts is not None:
            known_hosts = self._explicit_known_hosts
        elif opts.get("userknownhostsfile"):
            # OpenSSH reads all listed files and writes to the first; the first is enough here
            known_hosts = Path(os.path.expanduser(opts["userknownhostsfile"].split()[0]))
        else:
            known_hosts = Path.home() / ".ssh" / "known_hosts"
        hop = _Hop(
            hostname=opts.get("hostname", host),
            port=port,
            user=user or opts.get("user") or getpass.getuser(),
            identity_files=tuple(dict.fromkeys(files)),
            identities_only=opts.get("identitiesonly", "no").lower() == "yes",
            known_hosts=known_hosts,
        )
        return hop, opts.get("proxyjump")

    def _route(self, user: str | None, host: str, port: int | None) -> list[_Hop]:
        target, jump = self._resolve(user, host, port)
        jumps = [dataclasses.replace(hop, jump=True) for hop in self._jump_chain(jump, 1)]
        return [*jumps, target]

    def _jump_chain(self, spec: str | None, depth: int) -> list[_Hop]:
        # As OpenSSH does: in "a,b" only the first hop's own ProxyJump applies, since b is
        # reached through a.
        if not spec or spec.strip().lower() == "none":
            return []
        if depth > _MAX_JUMPS:
            raise ConfigError(f"ProxyJump chain deeper than {_MAX_JUMPS} hops (a loop?)")
        entries = [entry.strip() for entry in spec.split(",") if entry.strip()]
        chain: list[_Hop] = []
        for index, entry in enumerate(entries):
            hop, own_jump = self._resolve(*_split_destination(entry))
            if index == 0:
                chain.extend(self._jump_chain(own_jump, depth + 1))
            chain.append(hop)
        return chain

    # -- connecting -----------------------------------------------------------------------

    def _connect(self) -> paramiko.Transport:
        opened: list[paramiko.Transport] = []
        try:
            for index, hop in enumerate(self._hops):
                if index == 0:
                    sock: Any = self._dial(hop)
                else:
                    sock = self._tunnel(opened[-1], self._hops[index - 1], hop)
                try:
                    transport = paramiko.Transport(sock)
                except BaseException:
                    sock.close()
                    raise
                opened.append(transport)
                self._handshake(transport, hop)
                self._authenticate(transport, hop)
        except BaseException:
            for transport in reversed(opened):
                transport.close()
            raise
        self._transports = opened
        self.connections_opened += 1
        log.debug("connected to %s (connection %d)", self.address, self.connections_opened)
        return opened[-1]

    def _dial(self, hop: _Hop) -> socket.socket:
        try:
            return socket.create_connection((hop.hostname, hop.port), timeout=self.connect_timeout)
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
                f"{hop.label} did not answer within {self.connect_timeout:g} s",
                hint="check the host name and port, and any VPN or firewall on the way",
            ) from None
        except OSError as exc:
            raise SshConnectionError(f"cannot reach {hop.label}: {_reason(exc)}") from None

    def _tunnel(self, via: paramiko.Transport, jump: _Hop, hop: _Hop) -> paramiko.Channel:
        try:
            return via.open_channel(
                "direct-tcpip",
                (hop.hostname, hop.port),
                ("127.0.0.1", 0),
                timeout=self.connect_timeout,
            )
        except paramiko.ChannelException as exc:
            raise SshConnectionError(
                f"jump host {jump.where} could not connect to {hop.where}: {_reason(exc)}",
                hint="check the destination's name and port as the jump host sees them",
            ) from None
        except _CONNECTION_ERRORS as exc:
            raise SshConnectionError(
                f"jump host {jump.where} could not connect to {hop.where}: {_reason(exc)}"
            ) from None

    def _handshake(self, transport: paramiko.Transport, hop: _Hop) -> None:
        transport.banner_timeout = self.connect_timeout
        transport.handshake_timeout = self.connect_timeout
        transport.auth_timeout = self.connect_timeout
        transport.channel_timeout = self.connect_timeout
        known = self._load_known_hosts(hop.known_hosts)
        entries = known.lookup(hop.hostkey_name)
        if entries is not None:
            self._prefer_key_types(transport, list(entries.keys()))
        try:
            transport.start_client(timeout=self.connect_timeout)
            server_key = transport.get_remote_server_key()
        except _CONNECTION_ERRORS as exc:
            if transport.is_active():
                reason = f"no answer within {self.connect_timeout:g} s"
            else:
                reason = _reason(exc)
            raise SshConnectionError(f"SSH handshake with {hop.label} failed: {reason}") from None
        self._check_host_key(hop, entries, server_key)

    @staticmethod
    def _load_known_hosts(path: Path) -> paramiko.HostKeys:
        keys = paramiko.HostKeys()
        try:
            keys.load(str(path))
        except FileNotFoundError:
            pass
        except (OSError, UnicodeDecodeError) as exc:
            raise HostKeyError(f"cannot read {path}: {_reason(exc)}") from None
        return keys

    @staticmethod
    def _prefer_key_types(transport: paramiko.Transport, known_types: list[str]) -> None:
        # OpenSSH asks first for the key types it already knows for a host; without this the
        # server may present another of its keys and look like a changed key.
        options = transport.get_security_options()
        offered = list(options.key_types)
        wanted: list[str] = []
        for key_type in known_types:
            if key_type == "ssh-rsa":
                wanted += [t for t in ("rsa-sha2-512", "rsa-sha2-256") if t in offered]
            if key_type in offered:
                wanted.append(key_type)
        if wanted:
            options.key_types = list(dict.fromkeys(wanted + offered))

    def _check_host_key(self, hop: _Hop, known: Any, key: paramiko.PKey) -> None:
        key_type, printed = key.get_name(), fingerprint(key)
        if known is not None:
            expected = known.get(key_type)
            if expected is not None and expected.asbytes() == key.asbytes():
                return
            old = expected if expected is not None else next(iter(known.values()))
            raise HostKeyError(
                f"the host key of {hop.label} has changed: {hop.known_hosts} has "
                f"{old.get_name()} {fingerprint(old)}, the server offered {key_type} {printed}; "
                "this could mean someone is intercepting the connection (an attack), "
                "so hpcbridge refuses to connect",
                hint=(
                    "if the admins confirm the key was replaced, remove the old one with "
                    f"`ssh-keygen -R '{hop.hostkey_name}' -f {hop.known_hosts}` and connect again"
                ),
            )
        if not self.accept_new_host_key:
            port_option = f"-p {hop.port} " if hop.port != SSH_PORT else ""
            raise HostKeyError(
                f"the host key of {hop.label} is not known ({hop.known_hosts}): "
                f"{key_type} {printed}",
                hint=(
                    "verify the fingerprint with the cluster admins, then re-run with "
                    "--accept-new-host-key, or add it with "
                    f"`ssh-keyscan {port_option}{hop.hostname} >> {hop.known_hosts}`"
                ),
            )
        self._record_host_key(hop, key)
        log.warning(
            "accepted the new host key of %s: %s %s (recorded in %s)",
            hop.label,
            key_type,
            printed,
            hop.known_hosts,
        )

    @staticmethod
    def _record_host_key(hop: _Hop, key: paramiko.PKey) -> None:
        path = hop.known_hosts
        line = f"{hop.hostkey_name} {key.get_name()} {key.get_base64()}\n"
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "r+b") as fh:
                size = os.fstat(fd).st_size
                if size:
                    fh.seek(size - 1)
                    if fh.read(1) != b"\n":
                        line = "\n" + line
                fh.write(line.encode("ascii"))
        except OSError as exc:
            raise HostKeyError(
                f"cannot record the host key of {hop.label} in {path}: {_reason(exc)}"
            ) from None

    def _authenticate(self, transport: paramiko.Transport, hop: _Hop) -> None:
        offered: list[str] = []
        skipped: list[str] = []
        tried: set[bytes] = set()

        def attempt(key: paramiko.PKey) -> bool:
            if key.asbytes() in tried:
                return False
            tried.add(key.asbytes())
            try:
                return not transport.auth_publickey(hop.user, key)
            except paramiko.BadAuthenticationType as exc:
                methods = ", ".join(exc.allowed_types) or "none"
                raise SshAuthError(
                    f"{hop.who} does not accept key authentication (it allows: {methods})",
                    hint="hpcbridge logs in with SSH keys only; ask the admins about key login",
                ) from None
            except paramiko.ssh_exception.PartialAuthentication as exc:
                raise SshAuthError(
                    f"{hop.who} accepted the key but wants more "
                    f"({', '.join(exc.allowed_types)}), which hpcbridge cannot provide",
                    hint="use a multiplexed session or ask the admins about key-only login",
                ) from None
            except paramiko.AuthenticationException:
                return False
            except _CONNECTION_ERRORS as exc:
                if transport.is_active():
                    raise SshAuthError(
                        f"{hop.who}: authentication failed: {_reason(exc)}"
                    ) from None
                raise SshConnectionError(
                    f"{hop.who} closed the connection during authentication"
                    + (f" after {len(tried)} keys (too many?)" if len(tried) > 1 else ""),
                    hint="name the right key with IdentityFile and IdentitiesOnly yes",
                ) from None

        agent = None
        if os.environ.get("SSH_AUTH_SOCK"):
            try:
                agent = paramiko.Agent()
                agent_keys = list(agent.get_keys())
            except (paramiko.SSHException, OSError):
                agent_keys = []
            if hop.identities_only:
                # OpenSSH only uses agent keys that match the configured files then
                wanted = self._public_blobs(hop.identity_files)
                agent_keys = [k for k in agent_keys if k.asbytes() in wanted]
            if agent_keys:
                offered.append(f"{len(agent_keys)} key(s) from the SSH agent")
        else:
            agent_keys = []
        try:
            for agent_key in agent_keys:
                if attempt(agent_key):
                    return
            for path in hop.identity_files:
                if not path.is_file():
                    continue
                try:
                    key = paramiko.PKey.from_path(path)
                except (paramiko.PasswordRequiredException, TypeError):
                    # TypeError: cryptography's word for a new-format key that needs a passphrase
                    if self._public_blob(path) not in tried:
                        skipped.append(f"{path} (passphrase-protected and not in the agent)")
                    continue
                except (paramiko.SSHException, OSError, ValueError):
                    skipped.append(f"{path} (not a private key hpcbridge can read)")
                    continue
                offered.append(str(path))
                if attempt(key):
                    return
        finally:
            if agent is not None:
                agent.close()
        if not offered:
            looked = ", ".join(str(p) for p in hop.identity_files)
            message = f"no SSH key to offer {hop.who}: no agent keys, no usable key in {looked}"
        else:
            message = f"{hop.who} refused the key(s) offered: {', '.join(offered)}"
        if skipped:
            message += f"; not offered: {', '.join(skipped)}"
        raise SshAuthError(
            message,
            hint=(
                "load your key into the agent with `ssh-add`, or name it with IdentityFile in "
                "~/.ssh/config; its public half must be in ~/.ssh/authorized_keys on the server"
            ),
        )

    @classmethod
    def _public_blobs(cls, paths: Sequence[Path]) -> set[bytes]:
        return {blob for blob in (cls._public_blob(p) for p in paths) if blob}

    @staticmethod
    def _public_blob(path: Path) -> bytes:
        """The public key next to a private key file, to match it against agent keys."""
        try:
            fields = Path(f"{path}.pub").read_text().split()
            return base64.b64decode(fields[1])
        except (OSError, IndexError, ValueError):
            return b""

    # -- the connection's life ------------------------------------------------------------

    def _discard(self) -> None:
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

    def close(self) -> None:
        self._discard()

    def __enter__(self) -> SshTransport:
        return self

    def _call(self, what: str, op: Callable[[paramiko.Transport], T], *, retry: bool = True) -> T:
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
            except _Dropped as drop:
                self._discard()
                if drop.sent and not retry:
                    raise SshConnectionError(
                        f"lost the connection to {self.address} while `{what}` was running; "
                        "the command may or may not have run",
                        hint="check with `hpcbridge jobs` before submitting again",
                    ) from None
                if reconnects == 0:
                    raise SshConnectionError(
                        f"lost the connection to {self.address} again during `{what}`"
                    ) from None
                reconnects -= 1
                with self._lock:
                    transport = self._reconnect(what)

    def _reconnect(self, what: str) -> paramiko.Transport:
        log.warning("the connection to %s dropped; reconnecting for `%s`", self.address, what)
        self._discard()
        try:
            return self._connect()
        except SshConnectionError as exc:
            raise SshConnectionError(
                f"lost the connection to {self.address} and could not reconnect: {exc.message}",
                hint=exc.hint,
            ) from None

    # -- commands -------------------------------------------------------------------------

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 60.0,
        stdin: str | None = None,
        retry: bool = True,
    ) -> Result:
        """Run ``argv`` on the remote host through its login shell, each element quoted.

        ``retry=False`` is for commands that must not run twice (``qsub``, ``sbatch``): if the
        connection drops after the command was sent, the error says it may have run.
        """
        args = tuple(str(a) for a in argv)
        if not args:
            raise TransportError("no command given")
        command = shlex.join(args)
        data = stdin.encode("utf-8") if stdin is not None else b""

        def op(transport: paramiko.Transport) -> Result:
            code, out, err = self._exec(transport, command, data, timeout)
            return Result(
                args, code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
            )

        return self._call(command, op, retry=retry)

    def _exec(
        self, transport: paramiko.Transport, command: str, data: bytes, timeout: float
    ) -> tuple[int, bytes, bytes]:
        try:
            channel = transport.open_session(timeout=self.connect_timeout)
        except paramiko.ChannelException as exc:
            raise TransportError(
                f"{self.address} refused to open a session: {_reason(exc)}"
            ) from None
        except _CONNECTION_ERRORS:
            raise _Dropped(sent=False) from None
        with channel:
            try:
                channel.exec_command(command)
            except _CONNECTION_ERRORS as exc:
                if self._died(transport, grace=1.0):
                    raise _Dropped(sent=True) from None
                raise TransportError(
                    f"{self.address} refused to run `{command}`: {_reason(exc)}"
                ) from None
            out, err = self._pump(channel, command, data, timeout)
            code = channel.exit_status
            # No exit status: the connection died, or a signal killed the command. A server
            # sends EOF before closing a finished channel; a dying connection closes its
            # channels first and marks itself inactive a moment later.
            if code == -1 and self._died(transport, grace=0 if channel.eof_received else 1.0):
                raise _Dropped(sent=True)
        return code, out, err

    def _pump(
        self, channel: paramiko.Channel, command: str, data: bytes, timeout: float
    ) -> tuple[bytes, bytes]:
        """Both output streams and stdin at once, so no side waits on a full window."""
        out: list[bytes] = []
        err: list[bytes] = []
        sent = 0
        if not data:
            channel.shutdown_write()
        deadline = time.monotonic() + timeout
        while True:
            while channel.recv_ready():
                out.append(channel.recv(_CHUNK))
            while channel.recv_stderr_ready():
                err.append(channel.recv_stderr(_CHUNK))
            while sent < len(data) and channel.send_ready() and not channel.closed:
                try:
                    sent += channel.send(data[sent : sent + _CHUNK])
                except OSError:
                    break  # the command stopped reading; what it printed still counts
                if sent >= len(data):
                    channel.shutdown_write()
            if channel.closed or (channel.eof_received and channel.status_event.is_set()):
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TransportError(
                    f"`{command}` did not finish within {timeout:g} s on {self.address}"
                )
            if channel.eof_received:
                # no more output can come, and the fd would stay readable: wait for the status
                channel.status_event.wait(min(remaining, 0.5))
            else:
                # the fd signals output and close, not window space for stdin, hence the poll
                wait = 0.05 if sent < len(data) else 0.5
                select.select([channel], [], [], min(remaining, wait))
        while channel.recv_ready():
            out.append(channel.recv(_CHUNK))
        while channel.recv_stderr_ready():
            err.append(channel.recv_stderr(_CHUNK))
        return b"".join(out), b"".join(err)

    @staticmethod
    def _died(transport: paramiko.Transport, *, grace: float) -> bool:
        """Whether the connection is dead, waiting up to ``grace`` s for it to say so."""
        give_up = time.monotonic() + grace
        while transport.is_active() and time.monotonic() < give_up:
            time.sleep(0.01)
        return not transport.is_active()

    # -- files ----------------------------------------------------------------------------

    def _sftp_call(self, what: str, fn: Callable[[paramiko.SFTPClient], T]) -> T:
        """Run an SFTP action on the shared session; SFTP errors come back as OSError."""

        def op(transport: paramiko.Transport) -> T:
            sftp = self._sftp_session(transport)
            try:
                return fn(sftp)
            except TimeoutError:
                # a late answer would confuse the next request, so this session is done
                self._sftp = None
                sftp.close()
                raise TransportError(
                    f"{what}: {self.address} did not answer within {self.sftp_timeout:g} s"
                ) from None
            except _CONNECTION_ERRORS as exc:
                if sftp.get_channel().closed or not transport.is_active():
                    raise _Dropped(sent=True) from None
                if isinstance(exc, OSError):
                    raise
                raise TransportError(f"{what}: {_reason(exc)}") from None

        return self._call(what, op)

    def _sftp_session(self, transport: paramiko.Transport) -> paramiko.SFTPClient:
        if self._sftp is not None:
            return self._sftp
        try:
            sftp = paramiko.SFTPClient.from_transport(transport)
        except (*_CONNECTION_ERRORS, paramiko.SFTPError) as exc:
            if transport.is_active():
                raise TransportError(
                    f"{self.address} does not offer SFTP: {_reason(exc)}",
                    hint="hpcbridge needs the sftp subsystem on the login node",
                ) from None
            raise _Dropped(sent=False) from None
        if sftp is None:
            raise _Dropped(sent=False)
        sftp.get_channel().settimeout(self.sftp_timeout)
        self._sftp = sftp
        return sftp

    def _failed(self, action: str, path: str, exc: OSError) -> TransportError:
        return TransportError(f"cannot {action} {self.address}:{path}: {_sftp_reason(exc)}")

    @staticmethod
    def _temp_name(target: str) -> str:
        # random, not the pid: several machines may write into the same remote folder
        pure = PurePosixPath(target)
        return str(pure.with_name(f".{pure.name}.{uuid.uuid4().hex[:12]}.part"))

    def _replace(self, sftp: paramiko.SFTPClient, tmp: str, target: str) -> None:
        if self._posix_rename:
            try:
                sftp.posix_rename(tmp, target)
                return
            except OSError as exc:
                if exc.errno is not None or "unsupported" not in str(exc).lower():
                    raise
                self._posix_rename = False  # not OpenSSH: plain SFTP rename won't overwrite
        try:
            sftp.remove(target)
        except FileNotFoundError:
            pass
        sftp.rename(tmp, target)

    def _write(
        self,
        what: str,
        target: str,
        mode: int | None,
        write: Callable[[paramiko.SFTPFile], None],
    ) -> None:
        tmp = self._temp_name(target)

        def fn(sftp: paramiko.SFTPClient) -> None:
            self._mkdirs(sftp, str(PurePosixPath(target).parent))
            try:
                with sftp.open(tmp, "wb") as fh:
                    if mode is not None:
                        fh.chmod(mode)  # before the data, so it is never readable more widely
                    fh.set_pipelined(True)
                    write(fh)
                self._replace(sftp, tmp, target)
            except TimeoutError:
                raise
            except OSError:
                if not sftp.get_channel().closed:
                    try:
                        sftp.remove(tmp)
                    except OSError:
                        pass
                raise

        try:
            self._sftp_call(what, fn)
        except OSError as exc:
            raise self._failed("write", target, exc) from None

    def write_text(self, path: str, text: str, *, mode: int = 0o644) -> None:
        target = remote_path(path)
        data = text.encode("utf-8")
        self._write(f"write {target}", target, mode, lambda fh: fh.write(data))

    def put(self, local: Path, path: str, *, mode: int | None = None) -> None:
        target = remote_path(path)
        try:
            source = open(local, "rb")  # closed below, opened before connecting
        except OSError as exc:
            raise TransportError(f"cannot read {local}: {_reason(exc)}") from None

        def copy(fh: paramiko.SFTPFile) -> None:
            source.seek(0)  # a retried attempt starts over
            while chunk := source.read(_CHUNK * 8):
                fh.write(chunk)

        with source:
            self._write(f"copy {local} to {target}", target, mode, copy)

    def read_text(self, path: str, *, limit: int = READ_LIMIT) -> str | None:
        target = remote_path(path)

        def fn(sftp: paramiko.SFTPClient) -> str | None:
            try:
                with sftp.open(target, "rb") as fh:
                    return fh.read(limit).decode("utf-8", "replace")
            except FileNotFoundError:
                return None

        try:
            return self._sftp_call(f"read {target}", fn)
        except OSError as exc:
            raise self._failed("read", target, exc) from None

    def get(self, path: str, local: Path) -> None:
        source = remote_path(path)
        tmp = local.with_name(f".{local.name}.{os.getpid()}.part")

        def fn(sftp: paramiko.SFTPClient) -> None:
            with sftp.open(source, "rb") as remote:
                remote.prefetch()
                try:
                    fh = open(tmp, "wb")  # closed by the with below
                except OSError as exc:
                    raise TransportError(f"cannot write {local}: {_reason(exc)}") from None
                with fh:
                    while chunk := remote.read(_CHUNK * 8):
                        try:
                            fh.write(chunk)
                        except OSError as exc:
                            raise TransportError(f"cannot write {local}: {_reason(exc)}") from None
            try:
                os.replace(tmp, local)
            except OSError as exc:
                raise TransportError(f"cannot write {local}: {_reason(exc)}") from None

        try:
            self._sftp_call(f"copy {source} to {local}", fn)
        except OSError as exc:
            raise self._failed("copy", source, exc) from None
        finally:
            tmp.unlink(missing_ok=True)

    def get_files(
        self, folder: str, local: Path, *, below: str | None = None, scope: str = "given"
    ) -> list[str]:
        """Copy the regular files directly in ``folder`` into ``local``; their names, sorted.

        For what a job wrote: nothing is read through a symbolic link. ``folder`` must not be a
        link, nor (with ``below``, an ancestor) any folder between the two; in it, a link, FIFO,
        socket or device is refused (a RefusedFileError naming it, before anything is copied);
        sub-folders are left, as ``files_in`` leaves them. SFTP's listing reports lstat
        attributes, but its open follows links, so each file's attributes are compared with
        those of the opened handle and of a fresh lstat after the copy: a file swapped for a
        link meanwhile is refused too. A missing ``folder`` holds no files.
        """
        from .stageout import kind_of, link_refusal, refusal, replaced

        target = remote_path(folder)

        def check(sftp: paramiko.SFTPClient, path: str, attrs: paramiko.SFTPAttributes) -> None:
            mode = attrs.st_mode or 0
            if stat.S_ISLNK(mode):
                try:
                    to: str | None = sftp.readlink(path)
                except OSError:
                    to = None
                raise link_refusal(path, to, scope)
            what = kind_of(mode)
            if what is not None:
                raise refusal(path, what, scope)

        def same(a: paramiko.SFTPAttributes, b: paramiko.SFTPAttributes) -> bool:
            return stat.S_ISREG(b.st_mode or 0) and (a.st_size, a.st_mtime, a.st_uid) == (
                b.st_size,
                b.st_mtime,
                b.st_uid,
            )

        def fn(sftp: paramiko.SFTPClient) -> list[str]:
            try:
                self._no_link_between(sftp, below, target, check)
                entries = sftp.listdir_attr(target)
            except FileNotFoundError:
                return []
            for entry in entries:
                check(sftp, f"{target}/{entry.filename}", entry)
            files = sorted(
                (e for e in entries if stat.S_ISREG(e.st_mode or 0)), key=lambda e: e.filename
            )
            for entry in files:
                source = f"{target}/{entry.filename}"
                dest = local / entry.filename
                tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
                try:
                    with sftp.open(source, "rb") as remote:
                        if not same(entry, remote.stat()):
                            raise replaced(source)
                        remote.prefetch()
                        self._copy_into(remote, tmp, dest)
                    if not same(entry, sftp.lstat(source)):
                        raise replaced(source)
                    try:
                        os.replace(tmp, dest)
                    except OSError as exc:
                        raise TransportError(f"cannot write {dest}: {_reason(exc)}") from None
                finally:
                    tmp.unlink(missing_ok=True)
            return [e.filename for e in files]

        try:
            return self._sftp_call(f"copy the files of {target} to {local}", fn)
        except OSError as exc:
            raise self._failed("copy the files of", target, exc) from None

    @staticmethod
    def _no_link_between(
        sftp: paramiko.SFTPClient,
        below: str | None,
        folder: str,
        check: Callable[[paramiko.SFTPClient, str, paramiko.SFTPAttributes], None],
    ) -> None:
        """Refuse ``folder`` if it, or a folder between ``below`` and it, is a link: one round
        trip for each when none is (realpath below + the rest == realpath of folder), one lstat
        per part to name the link when there is one."""
        start = remote_path(below) if below else None
        if start is None or not folder.startswith(f"{start.rstrip('/')}/"):
            check(sftp, folder, sftp.lstat(folder))
            return
        rest = PurePosixPath(folder).relative_to(start)
        with contextlib.suppress(FileNotFoundError):  # a dangling link: found below
            if sftp.normalize(folder) == str(PurePosixPath(sftp.normalize(start)) / rest):
                return
        here = PurePosixPath(start)
        for part in rest.parts:
            here = here / part
            check(sftp, str(here), sftp.lstat(str(here)))

    @staticmethod
    def _copy_into(remote: paramiko.SFTPFile, tmp: Path, dest: Path) -> None:
        try:
            fh = open(tmp, "wb")  # closed by the with below
        except OSError as exc:
            raise TransportError(f"cannot write {dest}: {_reason(exc)}") from None
        with fh:
            while chunk := remote.read(_CHUNK * 8):
                try:
                    fh.write(chunk)
                except OSError as exc:
                    raise TransportError(f"cannot write {dest}: {_reason(exc)}") from None

    def files_in(self, folder: str) -> list[str]:
        target = remote_path(folder)

        def fn(sftp: paramiko.SFTPClient) -> list[str]:
            try:
                entries = sftp.listdir_attr(target)
            except FileNotFoundError:
                return []
            return sorted(e.filename for e in entries if stat.S_ISREG(e.st_mode or 0))

        try:
            return self._sftp_call(f"list {target}", fn)
        except OSError as exc:
            raise self._failed("list", target, exc) from None

    def remove(self, path: str) -> None:
        target = remote_path(path)

        def fn(sftp: paramiko.SFTPClient) -> None:
            try:
                sftp.remove(target)
            except FileNotFoundError:
                pass

        try:
            self._sftp_call(f"delete {target}", fn)
        except OSError as exc:
            raise self._failed("delete", target, exc) from None

    def makedirs(self, path: str) -> None:
        target = remote_path(path)
        try:
            self._sftp_call(f"create {target}", lambda sftp: self._mkdirs(sftp, target))
        except OSError as exc:
            raise self._failed("create", target, exc) from None

    def _mkdirs(self, sftp: paramiko.SFTPClient, path: str) -> None:
        """``mkdir -p``: one stat when the folder is there, which is the usual case."""
        try:
            if stat.S_ISDIR(sftp.stat(path).st_mode or 0):
                return
            raise OSError(errno.EEXIST, f"{path} exists and is not a folder")
        except FileNotFoundError:
            pass
        parent = str(PurePosixPath(path).parent)
        if parent != path:
            self._mkdirs(sftp, parent)
        try:
            sftp.mkdir(path)
        except OSError:
            # another writer may have made it meanwhile; SFTP says only "Failure"
            if not stat.S_ISDIR(sftp.stat(path).st_mode or 0):
                raise
