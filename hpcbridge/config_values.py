"""How a setting's value is checked and converted, wherever it comes from (file, environment,
option): one converter per key, and the rules for XNAT URLs and SSH destinations that never
quote a secret back."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError, HpcBridgeError, Step

SCHEDULERS = ("local", "pbs", "torque", "slurm")


class Unfit(ValueError):
    """A value refused with a message of its own, for when "KEY must be ..., not VALUE" would
    quote a secret (a password in a URL) or not say what is wrong (a missing file)."""

    def __init__(self, message: str, *, hint: str | None = None, step: Step | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.step = step


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ValueError(value)


# Each converter raises ValueError or TypeError on bad input; the message says what was wanted.
def _choice(*allowed: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in allowed:
            raise ValueError(value)
        return text

    return convert


#: Upper bounds far beyond any sensible value, yet low enough that sleeps, socket timeouts and
#: date arithmetic cannot overflow (``time.sleep(1e300)`` raises; a walltime of 10^11 hours
#: overflows a datetime).
MAX_SECONDS = 86400
MAX_JOBS = 1024
MAX_QUEUED = 100_000
MAX_WALLTIME_HOURS = 8760


def _seconds(value: Any) -> float:
    # bool is an int to Python, but `timeout = true` is a mistake, not one second.
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(value)
    number = float(value)
    if not 0 < number <= MAX_SECONDS:  # written so that nan, which compares false, fails too
        raise ValueError(value)
    return number


def _whole(low: int, high: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool):
            raise TypeError(value)
        if isinstance(value, float):
            if not value.is_integer():  # 2.5 jobs is a mistake; int() would make it 2
                raise ValueError(value)
            value = int(value)
        elif isinstance(value, str):
            value = int(value.strip())
        elif not isinstance(value, int):
            raise TypeError(value)
        if not low <= value <= high:
            raise ValueError(value)
        return value

    return convert


def _walltime(value: Any) -> str:
    from .recipes import parse_walltime

    if isinstance(value, bool) or not isinstance(value, str):
        raise TypeError(value)
    try:
        parse_walltime(value, "")  # refuses more than a year, MAX_WALLTIME_HOURS
    except HpcBridgeError:
        raise ValueError(value) from None
    return value.strip()


def _ca_bundle(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise TypeError(value)
    path = Path(value.strip()).expanduser().absolute()
    wanted = "ca_bundle must be a readable PEM file of CA certificates, or a folder of them:"
    if not path.exists():
        raise Unfit(f"{wanted} {path} does not exist")
    if not (path.is_file() or path.is_dir()):
        raise Unfit(f"{wanted} {path} is neither a file nor a folder")
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise Unfit(f"{wanted} {path} is not readable by you")
    return str(path)


def redact_url(text: str) -> str:
    """``text`` with whatever may be a user or password (all before the last ``@`` after the
    scheme) masked. Cutting at the last ``@`` masks passwords that hold ``@``, ``/`` or ``?``,
    which a URL parser would read as part of the host or path and leave in view."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    if "@" not in rest:
        return text
    return f"{scheme}{sep}***@{rest.rpartition('@')[2]}"


def display_url(text: str) -> str:
    """A URL as messages may show it: no user, no password, no query or fragment (where tokens
    travel), and no control characters (a redirect's Location is the server's text, and an
    escape sequence in it would act on the user's terminal)."""
    shown = redact_url(text).split("?", 1)[0].split("#", 1)[0]
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in shown)


def ssh_destination(value: Any) -> str:
    """An SSH destination as settings accept it: ``[user@]host[:port]``, a Host alias or
    ``ssh://[user@]host[:port]``, never with a password (hpcbridge logs in with keys only, and
    a password in the config would be printed by ``config show`` and quoted by errors)."""
    text = str(value).strip()
    if not text:
        raise ValueError(text)
    user = text.partition("://")[2] if "://" in text else text
    if "@" in user and ":" in user.rpartition("@")[0]:
        raise Unfit(
            f"the SSH destination {redact_url(text)} contains a password",
            hint="hpcbridge logs in with SSH keys (the agent or IdentityFile) only: "
            "give the host as [user@]host[:port]",
        )
    return text


def xnat_url(value: Any) -> str:
    """An XNAT server as settings accept it: http(s)://host[:port][/path], or ``sandbox``.

    A URL holding a user or password is refused: the config file is readable by others, and the
    URL is shown by ``config show`` and in messages. So is a query or fragment, which the paths
    the client appends would break.
    """
    text = str(value).strip()
    if text == "sandbox":
        return text
    if redact_url(text) != text:
        raise Unfit(f"the XNAT URL {display_url(text)} contains credentials", step=Step.LOGIN_ASKS)
    if "?" in text or "#" in text:
        raise Unfit(
            f"the XNAT URL {display_url(text)} has a query or fragment (?... or #...)",
            hint="give the server's address only, such as https://xnat.example.org/xnat",
        )
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or any(map(str.isspace, text)):
        raise ValueError(value)
    _ = parts.port  # raises ValueError for a port that is not a number in range
    return text


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine (localhost, 127.0.0.0/8, ::1)."""
    name = host.strip("[]").rstrip(".").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def insecure_http(url: str) -> bool:
    """Whether ``url`` is plain http to another machine than this one."""
    parts = urlsplit(url)
    return parts.scheme.lower() == "http" and not is_loopback(parts.hostname or "")


def check_xnat_url(url: str, *, allow_insecure_http: bool, origin: str | None = None) -> str:
    """``url`` as :func:`xnat_url` accepts it, and http only to this machine unless the profile
    opted in; else a one-line ConfigError starting with ``origin``, quoting no secret."""
    where = f"{origin}: " if origin else ""
    try:
        text = xnat_url(url)
    except Unfit as exc:
        raise ConfigError(where + exc.message, hint=exc.hint, step=exc.step) from None
    except (TypeError, ValueError):
        raise ConfigError(f"{where}xnat must be {_URL_WANTED}, not {url!r}") from None
    if insecure_http(text) and not allow_insecure_http:
        raise ConfigError(
            f"{where}{display_url(text)} would carry your password and token in clear text",
            hint="use the server's https:// address; only for a server without TLS on a network "
            "you trust, set allow_insecure_http = true in the profile",
        )
    return text


_URL_WANTED = "a URL such as https://xnat.example.org (or sandbox)"

_CONVERTERS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "xnat": (xnat_url, _URL_WANTED),
    "host": (ssh_destination, "an SSH destination such as alice@login.example.org"),
    "timeout": (_seconds, f"a number of seconds above 0 and at most {MAX_SECONDS}"),
    "verify_tls": (_to_bool, "true or false"),
    "allow_insecure_http": (_to_bool, "true or false"),
    "ca_bundle": (_ca_bundle, "the path of a PEM file of CA certificates"),
    "scheduler": (_choice(*SCHEDULERS), "one of " + ", ".join(SCHEDULERS)),
    "pbs_flavour": (_choice("pbspro", "torque", "wrapper"), "pbspro, torque or wrapper"),
    "poll_interval": (_seconds, f"a number of seconds above 0 and at most {MAX_SECONDS}"),
    "retry_interval": (_seconds, f"a number of seconds above 0 and at most {MAX_SECONDS}"),
    "retry_max": (_seconds, f"a number of seconds above 0 and at most {MAX_SECONDS}"),
    "local_max_jobs": (_whole(1, MAX_JOBS), f"a whole number from 1 to {MAX_JOBS}"),
    "ledger_mode": (_choice("wal", "nfs"), "wal or nfs"),
    "max_queued": (_whole(1, MAX_QUEUED), f"a whole number from 1 to {MAX_QUEUED}"),
    "transfer_walltime": (
        _walltime,
        f"a walltime like 01:00:00, above zero and at most {MAX_WALLTIME_HOURS}:00:00",
    ),
}


def convert_setting(key: str, value: Any, origin: str) -> Any:
    """``value`` of setting ``key`` converted, or a ConfigError naming ``origin``."""
    if value is None or key not in _CONVERTERS:
        return value
    convert, wanted = _CONVERTERS[key]
    try:
        return convert(value)
    except Unfit as exc:
        raise ConfigError(f"{origin}: {exc.message}", hint=exc.hint, step=exc.step) from None
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{origin}: {key} must be {wanted}, not {value!r}") from None
