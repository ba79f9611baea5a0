"""Logging in with keys as OpenSSH does: the agent's keys first, then the IdentityFile keys (or
the default ones), each key offered once. Keys only: no password, no keyboard-interactive."""

from __future__ import annotations

import base64
import contextlib
import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import paramiko

from ..errors import SshAuthError, SshConnectionError, TransportError
from .hops import CONNECTION_ERRORS, Hop, reason


def authenticate(transport: paramiko.Transport, hop: Hop) -> None:
    """Log in to ``hop`` with the first key it accepts, or say which keys it refused."""
    login = _Login(transport, hop)
    with _agent() as agent:
        agent_keys = _agent_keys(agent, hop)
        if agent_keys:
            login.offered.append(f"{len(agent_keys)} key(s) from the SSH agent")
        if any(login.attempt(key) for key in itertools.chain(agent_keys, login.file_keys())):
            return
    raise login.refused()


@contextlib.contextmanager
def _agent() -> Iterator[paramiko.Agent | None]:
    agent = None
    if os.environ.get("SSH_AUTH_SOCK"):
        with contextlib.suppress(paramiko.SSHException, OSError):
            agent = paramiko.Agent()
    try:
        yield agent
    finally:
        if agent is not None:
            agent.close()


def _agent_keys(agent: paramiko.Agent | None, hop: Hop) -> list[paramiko.PKey]:
    if agent is None:
        return []
    try:
        keys = list(agent.get_keys())
    except (paramiko.SSHException, OSError):
        return []
    if hop.identities_only:
        # OpenSSH only uses agent keys that match the configured files then
        wanted = {blob for blob in map(_public_blob, hop.identity_files) if blob}
        keys = [k for k in keys if k.asbytes() in wanted]
    return keys


def _public_blob(path: Path) -> bytes:
    """The public key next to a private key file, to match it against agent keys."""
    try:
        fields = Path(f"{path}.pub").read_text().split()
        return base64.b64decode(fields[1])
    except (OSError, IndexError, ValueError):
        return b""


class _Login:
    """One login's record of the keys offered, skipped and tried, for the error if all fail."""

    def __init__(self, transport: paramiko.Transport, hop: Hop) -> None:
        self.transport = transport
        self.hop = hop
        self.offered: list[str] = []
        self.skipped: list[str] = []
        self.tried: set[bytes] = set()

    def attempt(self, key: paramiko.PKey) -> bool:
        if key.asbytes() in self.tried:
            return False
        self.tried.add(key.asbytes())
        try:
            return not self.transport.auth_publickey(self.hop.user, key)
        except paramiko.BadAuthenticationType as exc:
            methods = ", ".join(exc.allowed_types) or "none"
            raise SshAuthError(
                f"{self.hop.who} does not accept key authentication (it allows: {methods})",
                hint="hpcbridge logs in with SSH keys only; ask the admins about key login",
            ) from None
        except paramiko.ssh_exception.PartialAuthentication as exc:
            raise SshAuthError(
                f"{self.hop.who} accepted the key but wants more "
                f"({', '.join(exc.allowed_types)}), which hpcbridge cannot provide",
                hint="use a multiplexed session or ask the admins about key-only login",
            ) from None
        except paramiko.AuthenticationException:
            return False
        except CONNECTION_ERRORS as exc:
            raise self._broken(exc) from None

    def _broken(self, exc: BaseException) -> TransportError:
        if self.transport.is_active():
            return SshAuthError(f"{self.hop.who}: authentication failed: {reason(exc)}")
        return SshConnectionError(
            f"{self.hop.who} closed the connection during authentication"
            + (f" after {len(self.tried)} keys (too many?)" if len(self.tried) > 1 else ""),
            hint="name the right key with IdentityFile and IdentitiesOnly yes",
        )

    def file_keys(self) -> Iterator[paramiko.PKey]:
        """The identity files' keys, read one at a time: whether a key that needs a passphrase
        is worth mentioning depends on the keys tried before it."""
        for path in self.hop.identity_files:
            key = self._load(path) if path.is_file() else None
            if key is not None:
                self.offered.append(str(path))
                yield key

    def _load(self, path: Path) -> paramiko.PKey | None:
        try:
            return paramiko.PKey.from_path(path)
        except (paramiko.PasswordRequiredException, TypeError):
            # TypeError: cryptography's word for a new-format key that needs a passphrase
            if _public_blob(path) not in self.tried:
                self.skipped.append(f"{path} (passphrase-protected and not in the agent)")
        except (paramiko.SSHException, OSError, ValueError):
            self.skipped.append(f"{path} (not a private key hpcbridge can read)")
        return None

    def refused(self) -> SshAuthError:
        if self.offered:
            message = f"{self.hop.who} refused the key(s) offered: {', '.join(self.offered)}"
        else:
            looked = ", ".join(str(p) for p in self.hop.identity_files)
            message = f"no SSH key to offer {self.hop.who}: no agent keys, no usable key in "
            message += looked
        if self.skipped:
            message += f"; not offered: {', '.join(self.skipped)}"
        return SshAuthError(
            message,
            hint=(
                "load your key into the agent with `ssh-add`, or name it with IdentityFile in "
                "~/.ssh/config; its public half must be in ~/.ssh/authorized_keys on the server"
            ),
        )
