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

import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

# config's API before config_values had its own module
from .config_values import check_xnat_url, convert_setting, display_url, insecure_http, redact_url  # noqa: F401
from .errors import ConfigError, Step

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

# xnatpy's variable names, honoured after ours so scripts written for it keep working.
ENV_ALIASES: dict[str, tuple[str, ...]] = {"xnat": ("XNAT_HOST",), "user": ("XNAT_USER",)}

BUILTIN_PROFILES: dict[str, dict[str, Any]] = {"sandbox": {"xnat": "sandbox", "scheduler": "local"}}


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
            hint=f"known profiles: {', '.join(known)}" if known else None,
            step=None if known else Step.CONFIG_INIT,
        )
    return {}


def _first_set(env: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    """The first of ``names`` that ``env`` sets to something."""
    return next((name for name in names if env.get(name)), None)


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
        values[key] = convert_setting(key, value, origins[key])
        sources[key] = "builtin profile" if name in BUILTIN_PROFILES else f"file {path}"
    for key in DEFAULTS:
        var = _first_set(env, (ENV_PREFIX + key.upper(), *ENV_ALIASES.get(key, ())))
        if var:
            origins[key] = f"environment {var}"
            values[key] = convert_setting(key, env[var], origins[key])
            sources[key] = origins[key]
    for key, value in (flags or {}).items():
        if value is not None and key in DEFAULTS:
            origins[key] = f"option --{key.replace('_', '-')}"
            values[key] = convert_setting(key, value, origins[key])
            sources[key] = "flag"
    # requests' own variables, below the profile's ca_bundle: a site-wide REQUESTS_CA_BUNDLE
    # must not override the CA a profile names for its server.
    var = _first_set(env, ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"))
    if values["ca_bundle"] is None and values["verify_tls"] and var:
        values["ca_bundle"] = convert_setting("ca_bundle", env[var], f"environment {var}")
        sources["ca_bundle"] = f"environment {var}"
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
