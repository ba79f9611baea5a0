"""Settings, resolved once per process.

Precedence: defaults < config file < ``HPCBRIDGE_*`` environment < flags.

The config file is TOML with one table per profile::

    default_profile = "artemis"

    [profiles.artemis]
    xnat = "https://xnat.example.org"
    user = "alice"
    scheduler = "pbs"

``HPCBRIDGE_HOME`` moves all state (credentials, caches, the ledger, the sandbox's archive), which
is also how tests isolate themselves. The profile ``sandbox`` is built in: it talks to the sandbox
XNAT started by ``hpcbridge sandbox start`` and runs jobs with the local scheduler.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

from .errors import ConfigError, HpcBridgeError

ENV_PREFIX = "HPCBRIDGE_"

#: The keys a profile may set, with their defaults. Secrets are not among them: passwords and
#: tokens come from the credential store or the environment, never from a shared config file.
DEFAULTS: dict[str, Any] = {
    "xnat": None,
    "user": None,
    "scheduler": "local",
    "timeout": 60.0,
    "verify_tls": True,
    # Plain http is refused for every host but this machine's own (the sandbox): it carries the
    # password, the token and the session in clear text. A server without TLS needs this opt-in,
    # and every session opened with it logs a warning.
    "allow_insecure_http": False,
    # A CA file (PEM) or c_rehash'd folder to check XNAT's certificate against, for sites whose
    # CA is not in certifi's list; unset: REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE, else certifi.
    "ca_bundle": None,
    # Where jobs are submitted: empty runs qsub/sbatch here (on the login node); otherwise an
    # SSH destination ([user@]host, a Host alias from ~/.ssh/config, or ssh://user@host:port).
    "host": None,
    "queue": None,
    # PBS -P project (mandatory on Artemis) or Slurm --account.
    "account": None,
    # pbspro, torque or wrapper (Slurm's PBS commands); asked of `qstat --version` when unset.
    "pbs_flavour": None,
    "poll_interval": 30.0,
    # While XNAT or the cluster cannot be reached, a run waits this long before trying again,
    # doubling after each failed try up to retry_max (a Retry-After from XNAT is honoured).
    "retry_interval": 30.0,
    "retry_max": 1800.0,
    "local_max_jobs": None,
    "ssh_config": None,
    "known_hosts": None,
    # The run ledger (SQLite); default $HPCBRIDGE_HOME/ledger.sqlite. On an NFS home directory
    # set ledger_mode = "nfs": no WAL (it needs shared memory NFS cannot give) and a lock file.
    "ledger": None,
    "ledger_mode": "wal",
    # Where runs keep each scan's input, output and job files, on the machine that runs the jobs
    # (an absolute path on the cluster when `host` is set); default $HPCBRIDGE_HOME/work.
    "work_root": None,
    "max_queued": 50,
    # Job chains (`run --chain`): the command their transfer jobs run on the cluster (default:
    # `hpcbridge` from the PATH there; this Python's when jobs run on this machine), the queue
    # for those jobs (a data-transfer queue such as Artemis's dtq: required with pbs and torque,
    # whose compute nodes usually cannot reach XNAT; default elsewhere: the profile's queue),
    # their walltime.
    "bridge_command": None,
    "transfer_queue": None,
    "transfer_walltime": "01:00:00",
}

SCHEDULERS = ("local", "pbs", "torque", "slurm")

# xnatpy's variable names, honoured after ours so scripts written for it keep working.
ENV_ALIASES: dict[str, tuple[str, ...]] = {"xnat": ("XNAT_HOST",), "user": ("XNAT_USER",)}

BUILTIN_PROFILES: dict[str, dict[str, Any]] = {
    "sandbox": {"xnat": "sandbox", "scheduler": "local"},
}


def default_home(environ: Mapping[str, str] | None = None) -> Path:
    """Where state lives unless ``HPCBRIDGE_HOME`` says otherwise."""
    env = os.environ if environ is None else environ
    if env.get("HPCBRIDGE_HOME"):
        return Path(env["HPCBRIDGE_HOME"]).expanduser()
    base = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "hpcbridge"


def default_config_path() -> Path:
    """The config file used when ``--config`` and ``HPCBRIDGE_CONFIG`` are not given."""
    env = os.environ.get("HPCBRIDGE_CONFIG")
    if env:
        return Path(env).expanduser()
    if os.environ.get("HPCBRIDGE_HOME"):
        return default_home() / "config.toml"
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "hpcbridge" / "config.toml"


@dataclass(frozen=True, kw_only=True)
class Settings:
    """The effective settings of one invocation, with where each value came from."""

    home: Path
    config_path: Path
    profile: str
    xnat: str | None = None
    user: str | None = None
    scheduler: str = "local"
    timeout: float = 60.0
    verify_tls: bool = True
    allow_insecure_http: bool = False
    ca_bundle: str | None = None
    host: str | None = None
    queue: str | None = None
    account: str | None = None
    pbs_flavour: str | None = None
    poll_interval: float = 30.0
    retry_interval: float = 30.0
    retry_max: float = 1800.0
    local_max_jobs: int | None = None
    ssh_config: str | None = None
    known_hosts: str | None = None
    ledger: str | None = None
    ledger_mode: str = "wal"
    work_root: str | None = None
    max_queued: int = 50
    bridge_command: str | None = None
    transfer_queue: str | None = None
    transfer_walltime: str = "01:00:00"
    verbose: int = 0
    quiet: bool = False
    json: bool = False
    sources: Mapping[str, str] = field(default_factory=dict)

    def describe(self) -> list[tuple[str, Any, str]]:
        """(key, value, source) for every profile key, for ``config show``."""
        return [(k, getattr(self, k), self.sources.get(k, "default")) for k in DEFAULTS]

    @property
    def tls_verify(self) -> bool | str:
        """requests' ``verify``: False, the CA bundle to trust, or True (certifi's list)."""
        if not self.verify_tls:
            return False
        return self.ca_bundle or True


class Unfit(ValueError):
    """A value refused with a message of its own, for when "KEY must be ..., not VALUE" would
    quote a secret (a password in a URL) or not say what is wrong (a missing file)."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


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
        seconds = parse_walltime(value, "")
    except HpcBridgeError:
        raise ValueError(value) from None
    if seconds > MAX_WALLTIME_HOURS * 3600:
        raise ValueError(value)
    return value.strip()


def _ca_bundle(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise TypeError(value)
    path = Path(value.strip()).expanduser().absolute()
    if not path.exists():
        raise Unfit(
            f"ca_bundle must be a readable PEM file of CA certificates, or a folder of them: "
            f"{path} does not exist"
        )
    if not (path.is_file() or path.is_dir()):
        raise Unfit(
            f"ca_bundle must be a readable PEM file of CA certificates, or a folder of them: "
            f"{path} is neither a file nor a folder"
        )
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise Unfit(
            f"ca_bundle must be a readable PEM file of CA certificates, or a folder of them: "
            f"{path} is not readable by you"
        )
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


CREDENTIALS_IN_URL_HINT = (
    "give the user name with --user or the profile's `user`, and the password to "
    "`hpcbridge login`, which asks for it"
)


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
        raise Unfit(
            f"the XNAT URL {display_url(text)} contains credentials", hint=CREDENTIALS_IN_URL_HINT
        )
    if "?" in text or "#" in text:
        raise Unfit(
            f"the XNAT URL {display_url(text)} has a query or fragment (?... or #...)",
            hint="give the server's address only, such as https://xnat.example.org/xnat",
        )
    parts = urlsplit(text)
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or any(c.isspace() for c in text)
    ):
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
        raise ConfigError(where + exc.message, hint=exc.hint) from None
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


def _convert(key: str, value: Any, origin: str) -> Any:
    if value is None or key not in _CONVERTERS:
        return value
    convert, wanted = _CONVERTERS[key]
    try:
        return convert(value)
    except Unfit as exc:
        raise ConfigError(f"{origin}: {exc.message}", hint=exc.hint) from None
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{origin}: {key} must be {wanted}, not {value!r}") from None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def write_profile(path: Path, name: str, values: Mapping[str, Any], *, make_default: bool) -> None:
    """Add or replace one profile in the config file, keeping the others; atomic."""
    data = read_config_file(path)
    profiles = dict(data.get("profiles", {}))
    profiles[name] = {k: v for k, v in values.items() if k in DEFAULTS and v is not None}
    default = name if make_default else data.get("default_profile")
    lines = [f"default_profile = {_toml_value(default)}", ""] if default else []
    for pname, table in profiles.items():
        lines.append(f"[profiles.{json.dumps(pname) if not pname.isidentifier() else pname}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse the TOML config file; a missing file is an empty config."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    profiles = data.get("profiles", {})
    if not isinstance(profiles, dict) or not all(isinstance(v, dict) for v in profiles.values()):
        raise ConfigError(f"{path}: [profiles.NAME] must be tables")
    for name, table in profiles.items():
        unknown = sorted(set(table) - set(DEFAULTS))
        if unknown:
            raise ConfigError(
                f"{path}: profile {name!r} has unknown key(s) {', '.join(unknown)}",
                hint=f"known keys: {', '.join(DEFAULTS)}",
            )
    return data


def _profile_table(data: dict[str, Any], name: str, path: Path, explicit: bool) -> dict[str, Any]:
    profiles = data.get("profiles", {})
    if name in profiles:
        return dict(BUILTIN_PROFILES.get(name, {}), **profiles[name])
    if name in BUILTIN_PROFILES:
        return dict(BUILTIN_PROFILES[name])
    if explicit:
        known = sorted(set(profiles) | set(BUILTIN_PROFILES))
        raise ConfigError(
            f"no profile named {name!r} in {path}",
            hint=f"known profiles: {', '.join(known)}" if known else "run `hpcbridge config init`",
        )
    return {}


def load_settings(
    *,
    profile: str | None = None,
    config_path: str | os.PathLike[str] | None = None,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    verbose: int = 0,
    quiet: bool = False,
    json: bool = False,
) -> Settings:
    """Resolve settings once: defaults < config file < environment < flags (None flags ignored)."""
    env = os.environ if environ is None else environ
    path = Path(config_path).expanduser() if config_path else default_config_path()
    data = read_config_file(path)
    explicit = profile is not None or "HPCBRIDGE_PROFILE" in env
    name = profile or env.get("HPCBRIDGE_PROFILE") or data.get("default_profile") or "default"
    values: dict[str, Any] = dict(DEFAULTS)
    sources: dict[str, str] = {}
    origins: dict[str, str] = {}  # where each value came from, as error messages name it
    for key, value in _profile_table(data, name, path, explicit).items():
        origins[key] = f"{path} [profiles.{name}]"
        values[key] = _convert(key, value, origins[key])
        sources[key] = "builtin profile" if name in BUILTIN_PROFILES else f"file {path}"
    for key in DEFAULTS:
        for var in (ENV_PREFIX + key.upper(), *ENV_ALIASES.get(key, ())):
            if env.get(var):
                origins[key] = f"environment {var}"
                values[key] = _convert(key, env[var], origins[key])
                sources[key] = origins[key]
                break
    for key, value in (flags or {}).items():
        if value is not None and key in DEFAULTS:
            origins[key] = f"option --{key.replace('_', '-')}"
            values[key] = _convert(key, value, origins[key])
            sources[key] = "flag"
    # requests' own variables, below the profile's ca_bundle: a site-wide REQUESTS_CA_BUNDLE
    # must not override the CA a profile names for its server.
    if values["ca_bundle"] is None and values["verify_tls"]:
        for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
            if env.get(var):
                values["ca_bundle"] = _convert("ca_bundle", env[var], f"environment {var}")
                sources["ca_bundle"] = f"environment {var}"
                break
    if values["xnat"] not in (None, "sandbox"):
        check_xnat_url(
            values["xnat"],
            allow_insecure_http=values["allow_insecure_http"],
            origin=origins.get("xnat"),
        )
    known = {f.name for f in fields(Settings)}
    return Settings(
        home=default_home(env),
        config_path=path,
        profile=name,
        verbose=verbose,
        quiet=quiet,
        json=json,
        sources=sources,
        **{k: v for k, v in values.items() if k in known},
    )
