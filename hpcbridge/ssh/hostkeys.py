"""Host keys as OpenSSH checks them: strictly against ``known_hosts``, a new key recorded only
when the user opted in, a changed key always refused."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import paramiko

from ..errors import HostKeyError
from .hops import SSH_PORT, Hop, reason

log = logging.getLogger(__name__)


def fingerprint(key: paramiko.PKey) -> str:
    """The key's fingerprint as OpenSSH prints it, to compare with ``ssh-keygen -l``."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def known_keys(transport: paramiko.Transport, hop: Hop) -> Any:
    """The keys ``known_hosts`` has for ``hop`` (None when none), its types asked for first."""
    keys = paramiko.HostKeys()
    try:
        keys.load(str(hop.known_hosts))
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError) as exc:
        raise HostKeyError(f"cannot read {hop.known_hosts}: {reason(exc)}") from None
    entries = keys.lookup(hop.hostkey_name)
    if entries is not None:
        _prefer_key_types(transport, list(entries.keys()))
    return entries


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


def check_host_key(hop: Hop, known: Any, key: paramiko.PKey, *, accept_new: bool) -> None:
    """Pass a known key, record a new one if ``accept_new``; refuse anything else."""
    if known is not None:
        expected = known.get(key.get_name())
        if expected is not None and expected.asbytes() == key.asbytes():
            return
        raise _changed(hop, expected if expected is not None else next(iter(known.values())), key)
    if not accept_new:
        raise _unknown(hop, key)
    _record(hop, key)
    log.warning(
        "accepted the new host key of %s: %s %s (recorded in %s)",
        hop.label,
        key.get_name(),
        fingerprint(key),
        hop.known_hosts,
    )


def _changed(hop: Hop, old: paramiko.PKey, key: paramiko.PKey) -> HostKeyError:
    return HostKeyError(
        f"the host key of {hop.label} has changed: {hop.known_hosts} has "
        f"{old.get_name()} {fingerprint(old)}, the server offered "
        f"{key.get_name()} {fingerprint(key)}; "
        "this could mean someone is intercepting the connection (an attack), "
        "so hpcbridge refuses to connect",
        hint=(
            "if the admins confirm the key was replaced, remove the old one with "
            f"`ssh-keygen -R '{hop.hostkey_name}' -f {hop.known_hosts}` and connect again"
        ),
    )


def _unknown(hop: Hop, key: paramiko.PKey) -> HostKeyError:
    port_option = f"-p {hop.port} " if hop.port != SSH_PORT else ""
    return HostKeyError(
        f"the host key of {hop.label} is not known ({hop.known_hosts}): "
        f"{key.get_name()} {fingerprint(key)}",
        hint=(
            "verify the fingerprint with the cluster admins, then re-run with "
            "--accept-new-host-key, or add it with "
            f"`ssh-keyscan {port_option}{hop.hostname} >> {hop.known_hosts}`"
        ),
    )


def _record(hop: Hop, key: paramiko.PKey) -> None:
    path: Path = hop.known_hosts
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
            f"cannot record the host key of {hop.label} in {path}: {reason(exc)}"
        ) from None
