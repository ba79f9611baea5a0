"""Where a destination leads under ``~/.ssh/config``: the servers on the way (ProxyJump hops),
each with its address, user, keys and known_hosts file. Reads the config file and nothing else.
Also what every part of the SSH package shares: which errors mean a broken connection, and how a
low-level error is worded in a message."""

from __future__ import annotations

import dataclasses
import errno
import getpass
import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import paramiko

from ..config import redact_url
from ..errors import ConfigError

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


SSH_PORT = 22
#: Keys OpenSSH tries when the config names no IdentityFile (the types paramiko can load).
DEFAULT_IDENTITIES = ("id_rsa", "id_ecdsa", "id_ed25519")
_MAX_JUMPS = 8


@dataclasses.dataclass(frozen=True)
class Hop:
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


def _shown(destination: str) -> str:
    """A destination as an error may quote it: a password in it (which settings refuse, but a
    destination may come from elsewhere) masked with the user part."""
    rest = destination.partition("://")[2] or destination
    return redact_url(destination) if ":" in rest.rpartition("@")[0] else destination


def _invalid(text: str, why: str = "") -> ConfigError:
    return ConfigError(f"invalid SSH destination {_shown(text)!r}" + (f": {why}" if why else ""))


def split_destination(text: str) -> tuple[str | None, str, int | None]:
    """``[user@]host[:port]`` or ``ssh://[user@]host[:port]`` as (user, host, port)."""
    raw = text.strip()
    user, host, port = _split_url(raw, text) if raw.startswith("ssh://") else _split(raw, text)
    if _bad_name(user, host):
        raise _invalid(text, "expected [user@]host or ssh://...")
    if port is not None and not 0 < port < 65536:
        raise _invalid(text, "port out of range")
    return user, host, port


def _split_url(raw: str, text: str) -> tuple[str | None, str, int | None]:
    parts = urlsplit(raw)
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.password:
        raise _invalid(text, "expected ssh://[user@]host[:port]")
    try:
        port = parts.port
    except ValueError:
        raise _invalid(text, "bad port") from None
    return (unquote(parts.username) if parts.username else None), parts.hostname or "", port


def _split(raw: str, text: str) -> tuple[str | None, str, int | None]:
    user, at, rest = raw.rpartition("@")
    host, port = _split_port(rest, text)
    if port is not None and not port.isdigit():
        raise _invalid(text, "bad port")
    return (user if at else None), host, (int(port) if port is not None else None)


def _split_port(rest: str, text: str) -> tuple[str, str | None]:
    if rest.startswith("["):
        close = rest.find("]")
        tail = rest[close + 1 :] if close > 0 else "?"
        if close < 0 or (tail and not tail.startswith(":")):
            raise _invalid(text)
        return rest[1:close], (tail[1:] if tail else None)
    if rest.count(":") == 1:
        host, port = rest.split(":")
        return host, port
    return rest, None  # a bare IPv6 address has several colons and no port


def _bad_name(user: str | None, host: str) -> bool:
    if not host or host.startswith("-") or any(c.isspace() or c in "/@" for c in host):
        return True
    return user is not None and (not user or any(c.isspace() for c in user))


def route(destination: str, ssh_config: Path | None, known_hosts: Path | None) -> list[Hop]:
    """Every hop on the way to ``destination``, the first jump host first, the target last;
    ``known_hosts``, when given, for all of them whatever the config says."""
    resolver = _Resolver(_load_config(ssh_config), known_hosts)
    target, jump = resolver.resolve(*split_destination(destination))
    jumps = [dataclasses.replace(hop, jump=True) for hop in resolver.jump_chain(jump, 1)]
    return [*jumps, target]


def _load_config(path: Path | None) -> paramiko.SSHConfig:
    if path is None:
        path = Path.home() / ".ssh" / "config"
        if not path.exists():
            return paramiko.SSHConfig()
    try:
        return paramiko.SSHConfig.from_path(str(path))
    except OSError as exc:
        raise ConfigError(f"cannot read SSH config {path}: {reason(exc)}") from None
    except paramiko.ssh_exception.ConfigParseError as exc:
        raise ConfigError(f"SSH config {path}: {exc}") from None


@dataclasses.dataclass(frozen=True)
class _Resolver:
    config: paramiko.SSHConfig
    known_hosts: Path | None

    def resolve(self, user: str | None, host: str, port: int | None) -> tuple[Hop, str | None]:
        """The hop that ``[user@]host[:port]`` means under the ssh config, and its ProxyJump."""
        opts = self._lookup(host)
        if opts.get("proxycommand", "none").lower() != "none":
            raise ConfigError(
                f"SSH config for {host!r} uses ProxyCommand, which hpcbridge does not support",
                hint="use ProxyJump instead",
            )
        hop = Hop(
            hostname=opts.get("hostname", host),
            port=_port(opts, host) if port is None else port,
            user=user or opts.get("user") or getpass.getuser(),
            identity_files=_identity_files(opts),
            identities_only=opts.get("identitiesonly", "no").lower() == "yes",
            known_hosts=self._known_hosts(opts),
        )
        return hop, opts.get("proxyjump")

    def jump_chain(self, spec: str | None, depth: int) -> list[Hop]:
        # As OpenSSH does: in "a,b" only the first hop's own ProxyJump applies, since b is
        # reached through a.
        if not spec or spec.strip().lower() == "none":
            return []
        if depth > _MAX_JUMPS:
            raise ConfigError(f"ProxyJump chain deeper than {_MAX_JUMPS} hops (a loop?)")
        entries = [entry.strip() for entry in spec.split(",") if entry.strip()]
        chain: list[Hop] = []
        for index, entry in enumerate(entries):
            hop, own_jump = self.resolve(*split_destination(entry))
            if index == 0:
                chain.extend(self.jump_chain(own_jump, depth + 1))
            chain.append(hop)
        return chain

    def _lookup(self, host: str) -> dict[str, Any]:
        try:
            return dict(self.config.lookup(host))
        except Exception as exc:  # Match/exec and token errors have no common base
            raise ConfigError(f"SSH config entry for {host!r}: {reason(exc)}") from None

    def _known_hosts(self, opts: dict[str, Any]) -> Path:
        if self.known_hosts is not None:
            return self.known_hosts
        if opts.get("userknownhostsfile"):
            # OpenSSH reads all listed files and writes to the first; the first is enough here
            return Path(os.path.expanduser(opts["userknownhostsfile"].split()[0]))
        return Path.home() / ".ssh" / "known_hosts"


def _port(opts: dict[str, Any], host: str) -> int:
    try:
        return int(opts.get("port", SSH_PORT))
    except ValueError:
        raise ConfigError(f"SSH config for {host!r}: bad Port {opts['port']!r}") from None


def _identity_files(opts: dict[str, Any]) -> tuple[Path, ...]:
    files = [Path(os.path.expanduser(f)) for f in opts.get("identityfile", [])]
    if not files:
        files = [Path.home() / ".ssh" / name for name in DEFAULT_IDENTITIES]
    return tuple(dict.fromkeys(files))
