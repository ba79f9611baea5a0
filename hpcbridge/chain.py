"""Job chains (``run --chain``): per scan a stage-in job, the compute job after it and a
stage-out job after that, linked by afterok dependencies. The machine running hpcbridge then only
submits and polls; the transfers run on the cluster (on a data-transfer queue, say), where they
run ``hpcbridge stage-in`` and ``hpcbridge stage-out``.

Their XNAT credentials are an alias token in a file only the user can read, in the run's own
folder on the cluster (``<work_root>/run-<id>/.hpcbridge-chain/``: a 0700 folder holding a 0600
``credentials.json`` and the ``config.toml`` naming the server). A secret never goes on a
command line, into a job script or into ``qsub -v`` variables: other users of a cluster can read
all three (``ps``, ``qstat -f``, ``scontrol show job``).
"""

from __future__ import annotations

import json
import shlex
import sys
import time
import weakref
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .config import DEFAULTS, Settings
from .credentials import SECRET_ENV, Secret, token_entry, token_of
from .errors import ConfigError, CredentialError, HpcBridgeError, Step, TransportError
from .recipes import (
    Recipe,
    Resources,
    format_walltime,
    parse_walltime,
    render_script,
    scan_variables,
)
from .transport import Transport
from .xnat.client import XnatClient, expiry_text
from .xnat.model import ScanRef

STEPS = ("stage-in", "compute", "stage-out")
CHAIN_DIR = ".hpcbridge-chain"
_RETIRED = "retired-tokens.json"  # in CHAIN_DIR: see retire_token
TRANSFER_MEMORY_MB = 2048
#: How long a chain may sit in queues on top of its walltimes, when judging whether the token
#: lasts. Queue waits cannot be known in advance; the warning says this allowance was assumed.
QUEUE_ALLOWANCE = 12 * 3600

# The transfer jobs' settings come only from the chain's own files: a variable exported in the
# shell that submitted them (qsub -V, sbatch's default --export=ALL) must not point them
# elsewhere or hand them another password. (Not all HPCBRIDGE_* names: the local scheduler
# passes the job its id in HPCBRIDGE_JOB_ID.)
_SETTINGS_VARIABLES = sorted(
    {f"HPCBRIDGE_{key.upper()}" for key in DEFAULTS}
    | {"HPCBRIDGE_CONFIG", "HPCBRIDGE_PROFILE", "HPCBRIDGE_RECIPES"}
    | {"XNAT_HOST", "XNAT_USER"}
    | set(SECRET_ENV)
)
_PREAMBLE = "unset " + " ".join(_SETTINGS_VARIABLES) + "\nexport HPCBRIDGE_HOME={{ params.home }}\n"

_COMMANDS = {
    "stage-in": _PREAMBLE
    + "{{ params.bridge | raw }} --config {{ params.config }} --profile chain stage-in \\\n"
    "    {{ params.experiment }} --scan {{ scan.id }} --resource {{ params.resource }} \\\n"
    "    --dest {{ params.dest }} --away-report {{ params.away }}\n",
    "stage-out": _PREAMBLE
    + "{{ params.bridge | raw }} --config {{ params.config }} --profile chain stage-out \\\n"
    "    {{ params.address }} --spec {{ params.spec }} --away-report {{ params.away }} \\\n"
    "    {{ input_dir }}\n",
}


def bridge_command(settings: Settings, *, local: bool) -> list[str]:
    """The command the transfer jobs run: the profile's ``bridge_command``; by default this
    Python's hpcbridge when jobs run here, and ``hpcbridge`` from the PATH on a cluster."""
    if settings.bridge_command:
        return shlex.split(settings.bridge_command)
    return [sys.executable, "-m", "hpcbridge"] if local else ["hpcbridge"]


#: check_bridge's answers, per transport (one process's connection): the command is run once,
#: not on every pass that submits chains (over SSH a command starts a login shell).
_BRIDGES_CHECKED: weakref.WeakKeyDictionary[Transport, dict[tuple[str, ...], str | None]] = (
    weakref.WeakKeyDictionary()
)


def check_bridge(transport: Transport, bridge: list[str], where: str) -> str | None:
    """Run the transfer jobs' command with ``--version`` where the jobs are submitted, so that
    a missing or wrong ``bridge_command`` stops a run before it queues chains that would all
    fail; a warning when its version differs from this one (the stage-out spec may differ)."""
    checked = _BRIDGES_CHECKED.setdefault(transport, {})
    if tuple(bridge) not in checked:
        checked[tuple(bridge)] = _check_bridge(transport, bridge, where)
    return checked[tuple(bridge)]


def _check_bridge(transport: Transport, bridge: list[str], where: str) -> str | None:
    from . import __version__

    try:
        result = transport.run([*bridge, "--version"], timeout=120)
        said = None if result.ok else result.said()
    except TransportError as exc:  # this machine says so at once: no such command
        said = exc.message
    if said is not None:
        raise ConfigError(
            f"the chain's transfer jobs would run `{shlex.join(bridge)}`, which fails on "
            f"{where}: {said}",
            hint="install hpcbridge there and set bridge_command in the profile to its "
            "absolute path, e.g. /home/you/venvs/hpcbridge/bin/hpcbridge",
        )
    words = result.stdout.split()
    theirs = words[-1] if words else "?"
    if theirs != __version__:
        return (
            f"the transfer jobs run hpcbridge {theirs} on {where}, this is {__version__}; "
            "install the same version there"
        )
    return None


#: Schedulers whose chains must name their transfer queue: on PBS clusters such as Artemis the
#: compute nodes (the default queue's included) cannot reach the internet; only a data-transfer
#: queue's nodes (Artemis: ``dtq``) can, and the transfer jobs talk to XNAT.
EXPLICIT_TRANSFER_QUEUE = ("pbs", "torque")


def transfer_queue(settings: Settings) -> str | None:
    """The queue of a chain's transfer jobs: the profile's ``transfer_queue``; on Slurm and the
    local scheduler the profile's ``queue`` when it names none. On PBS and Torque the profile
    must name it (ConfigError): there ``queue`` is the compute queue, whose nodes usually cannot
    reach XNAT, so guessing would queue stage-in jobs that all fail."""
    if settings.transfer_queue:
        return settings.transfer_queue
    if settings.scheduler in EXPLICIT_TRANSFER_QUEUE:
        raise ConfigError(
            f"run --chain on the {settings.scheduler} scheduler needs the profile's "
            "transfer_queue: its stage-in and stage-out jobs talk to XNAT, which compute nodes "
            "usually cannot reach; on Artemis only the data-transfer queue dtq can",
            hint=f'add transfer_queue = "dtq" to [profiles.{settings.profile}] in '
            f"{settings.config_path}, naming your site's data-transfer queue",
        )
    return settings.queue


def transfer_walltime(settings: Settings) -> int:
    return parse_walltime(settings.transfer_walltime, "transfer_walltime")


def chain_seconds(settings: Settings, recipe: Recipe) -> int:
    """The longest a chain can run once started: its three walltimes."""
    return 2 * transfer_walltime(settings) + recipe.resources.walltime


def home_of(root: str) -> str:
    return f"{root}/{CHAIN_DIR}"


def step_work(folder: str, step: str) -> str:
    """Each step's work folder (its own, since a work folder holds one live job at a time)."""
    return folder if step == "compute" else f"{folder}/chain/{step}"


def step_name(name: str, step: str) -> str:
    return {"stage-in": f"{name}_in", "compute": name, "stage-out": f"{name}_out"}[step]


def spec_path(folder: str) -> str:
    return f"{step_work(folder, 'stage-out')}/spec.json"


def report_path(folder: str) -> str:
    return f"{step_work(folder, 'stage-out')}/uploaded.json"


def away_path(folder: str, step: str) -> str:
    """Where a transfer job that found XNAT away (exit code 75) says why and for how long."""
    return f"{step_work(folder, step)}/xnat-away.json"


def transfer_script(
    step: str,
    template: str,
    *,
    settings: Settings,
    bridge: list[str],
    root: str,
    folder: str,
    name: str,
    ref: ScanRef,
    input_resource: str,
) -> str:
    """The job script of a transfer step (``stage-in`` or ``stage-out``) for one scan."""
    walltime = transfer_walltime(settings)
    recipe = Recipe(
        name=f"hpcbridge-{step}",
        description=f"the {step} step of a job chain",
        source=Path(f"<{step}>"),
        origin="built-in",
        command=_COMMANDS[step],
        resources=Resources(cpus=1, memory_mb=TRANSFER_MEMORY_MB, walltime=walltime),
    )
    home = home_of(root)
    params: dict[str, Any] = {
        "bridge": " ".join(shlex.quote(word) for word in bridge),
        "home": home,
        "config": f"{home}/config.toml",
        "experiment": f"{ref.project}/{ref.subject_label}/{ref.experiment_label}",
        "address": ref.address,
        "resource": input_resource,
        "dest": root,
        "spec": spec_path(folder),
        "away": away_path(folder, step),
    }
    inputs = f"{folder}/resources" if step == "stage-in" else f"{folder}/out"
    return render_script(
        recipe,
        template,
        values=params,
        input_dir=inputs,
        output_dir=step_work(folder, step),
        work_dir=step_work(folder, step),
        name=step_name(name, step),
        scan=scan_variables(ref),
        queue=transfer_queue(settings),
        account=settings.account,
    )


def stage_out_spec(recipe: Recipe, folder: str, provenance: dict[str, Any]) -> dict[str, Any]:
    """What the stage-out job uploads and records: ``hpcbridge stage-out --spec`` reads it."""
    return {
        "outputs": [asdict(o) for o in recipe.outputs],
        "provenance": provenance,
        # the compute job's own record of its end, for the provenance
        "status_file": f"{step_work(folder, 'compute')}/.hpcbridge/status.json",
        "report": report_path(folder),
    }


# --- the token the transfer jobs use -----------------------------------------------------


def installed_token(transport: Transport, root: str, url: str) -> Secret | None:
    """The alias token already in the run's chain folder, if any."""
    text = transport.read_text(f"{home_of(root)}/credentials.json")
    if not text:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    return token_of(data, url) if isinstance(data, dict) else None


def fresh_token(client: XnatClient) -> Secret:
    """A new alias token for the chain's jobs, issued in this run's session; the login's own
    token when the server will not issue one. Never a password: that stays on this machine."""
    creds = client.credentials
    try:
        data = client.issue_token()
    except HpcBridgeError as exc:
        if creds is not None and creds.is_token and not creds.expired():
            return creds
        raise CredentialError(
            f"cannot issue an XNAT alias token for the chain's transfer jobs: {exc.message}",
            step=Step.LOGIN_FOR_CHAINS,
        ) from None
    expires = data.get("estimatedExpirationTime")
    return Secret(
        str(data["alias"]),
        str(data["secret"]),
        "token",
        int(expires) if isinstance(expires, (int, float)) else None,
        creds.user if creds is not None else None,
    )


def install_token(
    transport: Transport, root: str, url: str, token: Secret, settings: Settings
) -> None:
    """Write the chain folder: 0700, a 0600 token store and the config naming the server."""
    home = home_of(root)
    transport.makedirs(home)
    transport.run(["chmod", "700", home]).check(f"making {home} private")
    entry = token_entry(url, token.owner or "", token.user, token.secret, token.expires_ms)
    transport.write_text(f"{home}/credentials.json", json.dumps(entry, indent=1), mode=0o600)
    config = (
        'default_profile = "chain"\n\n[profiles.chain]\n'
        f"xnat = {json.dumps(url)}\n"
        f"verify_tls = {'true' if settings.verify_tls else 'false'}\n"
        f"timeout = {float(settings.timeout)!r}\n"
    )
    if settings.allow_insecure_http:
        config += "allow_insecure_http = true\n"
    if settings.ca_bundle and Path(settings.ca_bundle).is_file():
        # The profile's CA file is on this machine, not necessarily on the cluster: the transfer
        # jobs get a copy beside their config (certificates are public, nothing secret).
        bundle = f"{home}/ca-bundle.pem"
        transport.write_text(bundle, Path(settings.ca_bundle).read_text(), mode=0o600)
        config += f"ca_bundle = {json.dumps(bundle)}\n"
    elif settings.ca_bundle:  # a folder of certificates: the same path must exist there
        config += f"ca_bundle = {json.dumps(settings.ca_bundle)}\n"
    transport.write_text(f"{home}/config.toml", config, mode=0o600)


def cached_sessions(transport: Transport, root: str) -> list[str]:
    """The XNAT sessions the transfer jobs cached (so that each job need not log in again)."""
    folder = f"{home_of(root)}/sessions"
    listing = transport.run(["find", folder, "-maxdepth", "1", "-name", "*.json"], timeout=60)
    found = []
    for path in listing.stdout.split() if listing.ok else []:
        try:
            data = json.loads(transport.read_text(path) or "{}")
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and data.get("jsessionid"):
            found.append(str(data["jsessionid"]))
    return found


def retire_token(transport: Transport, root: str, token: Secret) -> None:
    """Note a token that a new one replaced in the chain folder, to be invalidated when the run
    ends, not now: jobs of chains submitted earlier read it when they started and log in with
    it again when their session expires; invalidated under them, they would fail. (Its alias
    only: that is all invalidating takes, and the secret need not outlive the jobs.)"""
    aliases = retired_tokens(transport, root)
    if token.user not in aliases:
        text = json.dumps({"aliases": [*aliases, token.user]}, indent=1)
        transport.write_text(f"{home_of(root)}/{_RETIRED}", text, mode=0o600)


def retired_tokens(transport: Transport, root: str) -> list[str]:
    """The aliases of the tokens :func:`retire_token` noted."""
    text = transport.read_text(f"{home_of(root)}/{_RETIRED}")
    try:
        data = json.loads(text or "{}")
    except json.JSONDecodeError:
        return []
    aliases = data.get("aliases") if isinstance(data, dict) else None
    return [str(a) for a in aliases if a] if isinstance(aliases, list) else []


def remove_secrets(transport: Transport, root: str) -> None:
    """Delete the token and the cached sessions from the run's chain folder."""
    home = home_of(root)
    transport.run(
        ["rm", "-rf", f"{home}/credentials.json", f"{home}/sessions", f"{home}/{_RETIRED}"]
    ).check(f"removing the chain's credentials from {home}")


def expiry_warning(token: Secret, seconds: int, now: float | None = None) -> CredentialError | None:
    """A warning when ``token`` may expire before a chain submitted now can end."""
    if token.expires_ms is None:
        return None
    now = time.time() if now is None else now
    if token.expires_ms / 1000 >= now + seconds + QUEUE_ALLOWANCE:
        return None
    return CredentialError(
        f"the XNAT token the chains use expires {expiry_text(token.expires_ms, now)}; a chain "
        f"submitted now may need it for {format_walltime(seconds)} of walltime plus up to "
        f"{QUEUE_ALLOWANCE // 3600} h queued, and a stage-out after it expires fails",
        step=Step.LOGIN_THEN_RETRY,
    )
