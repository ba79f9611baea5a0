"""``hpcbridge config init`` and ``config show``: profiles and where each setting comes from."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import click

from ..config import read_config_file, write_profile
from ..config_values import SCHEDULERS, Unfit, check_xnat_url, xnat_url
from ..credentials import resolve
from ..errors import ConfigError, HpcBridgeError
from ..xnat.client import expiry_text
from .app import main, settings_of
from .output import echo, emit_json, emit_table


@main.group("config", short_help="Write and inspect profiles.")
def config_group() -> None:
    """Write and inspect profiles (config file: ~/.config/hpcbridge/config.toml).

    \b
    Examples:
      hpcbridge config init --name artemis --xnat https://xnat.example.org --user alice
      hpcbridge --profile artemis config show
    """


@config_group.command("init")
@click.option("--name", default="default", show_default=True, help="Profile name.")
@click.option("--xnat", metavar="URL", help="XNAT server URL (asked for on a terminal).")
@click.option("--user", metavar="NAME", help="XNAT user name.")
@click.option(
    "--scheduler",
    type=click.Choice(SCHEDULERS),
    help="Batch scheduler [default: pbs when qsub is on the PATH, slurm when sbatch is, else "
    "local; asked on a terminal].",
)
@click.option("--host", metavar="SSH_HOST", help="Submit over SSH to this login node.")
@click.option(
    "--account",
    metavar="PROJECT",
    help="PBS -P project (Artemis) or Slurm account (asked on a terminal with pbs or torque).",
)
@click.option("--queue", metavar="QUEUE", help="Queue (PBS) or partition (Slurm) for jobs.")
@click.option(
    "--work-root",
    metavar="DIR",
    help="Absolute folder where runs keep their data, on the machine that runs the jobs.",
)
@click.option(
    "--transfer-queue",
    metavar="QUEUE",
    help="Queue of run --chain's transfer jobs, whose nodes reach XNAT, e.g. Artemis's dtq "
    "(required for chains with pbs or torque; asked on a terminal).",
)
@click.option(
    "--allow-insecure-http",
    is_flag=True,
    help="Allow an http:// XNAT on another machine (password and token in clear text).",
)
@click.option(
    "--default/--no-default",
    "make_default",
    default=True,
    show_default=True,
    help="Make it the profile used when --profile is not given.",
)
@click.option("--force", is_flag=True, help="Replace an existing profile of that name.")
@click.pass_context
def config_init(
    ctx: click.Context,
    name: str,
    xnat: str | None,
    user: str | None,
    scheduler: str | None,
    host: str | None,
    account: str | None,
    queue: str | None,
    work_root: str | None,
    transfer_queue: str | None,
    allow_insecure_http: bool,
    make_default: bool,
    force: bool,
) -> None:
    """Write a profile to the config file (asks for what the options leave out).

    On a terminal it asks for the server, the user and the scheduler (proposing the one whose
    qsub or sbatch is on the PATH), and with pbs or torque for the project and the transfer
    queue. Without a terminal it asks nothing: the scheduler is then the one found on the PATH
    (a note on stderr says which and why), and what the options leave out stays unset.
    No secret goes into the file: run `hpcbridge login` afterwards for a token.

    \b
    Examples:
      hpcbridge config init --name artemis --xnat https://xnat.example.org --user alice \\
          --scheduler pbs --account PTV000 --transfer-queue dtq \\
          --work-root /scratch/PTV000/hpcbridge
      hpcbridge config init --name slurm-ws --xnat https://xnat.example.org --user alice \\
          --scheduler slurm --host login.cluster.example.org --work-root /scratch/alice/hb
    """
    settings = settings_of(ctx)
    path = settings.config_path
    _check_new_profile(path, name, force=force, work_root=work_root)
    interactive = sys.stdin.isatty()
    xnat = _server(xnat, interactive, allow_insecure_http)
    if user is None and interactive:
        user = click.prompt("XNAT user (empty for token-only)", default="", show_default=False)
    if scheduler is None:
        scheduler = _scheduler(host, interactive, quiet=settings.quiet)
    if scheduler in ("pbs", "torque"):
        account, transfer_queue = _pbs_keys(
            name, scheduler, account, transfer_queue, interactive, quiet=settings.quiet
        )
    values: dict[str, Any] = {
        "xnat": xnat.rstrip("/"),
        "user": user or None,
        "scheduler": scheduler,
        "host": host,
        "account": account,
        "queue": queue,
        "work_root": work_root,
        "transfer_queue": transfer_queue,
        "allow_insecure_http": True if allow_insecure_http else None,
    }
    write_profile(path, name, values, make_default=make_default)
    echo(f"profile {name!r} written to {path}; next: hpcbridge login")


def _check_new_profile(path: Path, name: str, *, force: bool, work_root: str | None) -> None:
    if work_root is not None and not work_root.startswith("/"):
        raise ConfigError(f"--work-root must be an absolute path, not {work_root!r}")
    if name in read_config_file(path).get("profiles", {}) and not force:
        raise ConfigError(
            f"profile {name!r} already exists in {path}", hint="add --force to replace it"
        )


def _server(xnat: str | None, interactive: bool, allow_insecure_http: bool) -> str:
    """The profile's XNAT URL, from --xnat or asked on a terminal, checked."""
    if xnat is None and interactive:
        xnat = click.prompt("XNAT server URL")
    if not xnat:
        raise ConfigError("an XNAT server URL is needed", hint="pass --xnat URL")
    try:
        xnat_url(xnat)
    except Unfit:
        pass  # its own message, which check_xnat_url gives below
    except ValueError:
        raise ConfigError(f"{xnat!r} is not an http(s) URL") from None
    # The rule settings apply when they load the profile, so init never writes one they refuse.
    return check_xnat_url(xnat, allow_insecure_http=allow_insecure_http, origin="option --xnat")


def _note(text: str, quiet: bool) -> None:
    if not quiet:
        echo(f"hpcbridge: note: {text}", err=True)


def detect_scheduler() -> tuple[str, str]:
    """The scheduler this machine's PATH points at, and why: ``qsub`` is PBS (PBS Pro, Torque
    or Slurm's PBS wrappers, told apart later by ``qstat --version``), ``sbatch`` is Slurm."""
    qsub, sbatch = shutil.which("qsub"), shutil.which("sbatch")
    if qsub and sbatch:
        return "slurm", (
            f"sbatch and qsub are both on the PATH ({sbatch}, {qsub}), and qsub beside sbatch "
            "is usually Slurm's PBS wrapper"
        )
    if sbatch:
        return "slurm", f"sbatch is on the PATH ({sbatch})"
    if qsub:
        return "pbs", (
            f"qsub is on the PATH ({qsub}); PBS Pro or Torque is told apart by "
            "`qstat --version` when jobs are submitted"
        )
    return "local", "neither qsub nor sbatch is on the PATH, so jobs run on this machine"


def _scheduler(host: str | None, interactive: bool, *, quiet: bool) -> str:
    """The scheduler when --scheduler is not given: proposed (or, without a terminal, chosen)
    from the PATH, so that a login node's profile does not silently run jobs on the login node."""
    if host is not None:
        # This machine's PATH says nothing of the login node's, and `local` cannot use a host.
        if not interactive:
            raise ConfigError(
                f"--host {host} needs --scheduler: which scheduler takes jobs there",
                hint="pass --scheduler pbs, torque or slurm",
            )
        return str(
            click.prompt(
                f"Batch scheduler on {host}", type=click.Choice(["pbs", "torque", "slurm"])
            )
        )
    found, why = detect_scheduler()
    if not interactive:
        _note(f"scheduler {found}: {why} (--scheduler chooses another)", quiet)
        return found
    echo(f"proposing scheduler {found}: {why}", err=True)
    return str(click.prompt("Batch scheduler", type=click.Choice(SCHEDULERS), default=found))


def _pbs_keys(
    name: str,
    scheduler: str,
    account: str | None,
    transfer_queue: str | None,
    interactive: bool,
    *,
    quiet: bool,
) -> tuple[str | None, str | None]:
    """The project and the transfer queue of a PBS or Torque profile: asked on a terminal when
    the options leave them out; without one, a note says what the profile lacks."""
    if interactive:
        if account is None:
            flag = "-P, required on Artemis, e.g. PTV000" if scheduler == "pbs" else "-A"
            account = click.prompt(
                f"Project for jobs ({flag}; empty for none)", default="", show_default=False
            )
        if transfer_queue is None:
            transfer_queue = click.prompt(
                "Queue for run --chain's transfer jobs, whose nodes must reach XNAT "
                "(Artemis: dtq; empty for none)",
                default="",
                show_default=False,
            )
        return account or None, transfer_queue or None
    missing = []
    if account is None and scheduler == "pbs":
        missing.append(
            "no account (--account: PBS Pro sites such as Artemis reject jobs without -P PROJECT)"
        )
    if transfer_queue is None:
        missing.append("no transfer_queue (--transfer-queue: run --chain needs one, Artemis: dtq)")
    if missing:
        _note(f"profile {name!r} has " + " and ".join(missing), quiet)
    return account, transfer_queue


@config_group.command("show")
@click.pass_context
def config_show(ctx: click.Context) -> None:
    """Show the effective settings and where each comes from; secrets are masked.

    \b
    Example:
      hpcbridge --profile artemis config show
    """
    settings = settings_of(ctx)
    rows = [
        {"key": k, "value": "" if v is None else str(v), "source": src}
        for k, v, src in settings.describe()
    ]
    rows.append({"key": "credentials", **_credential_row(settings)})
    rows += [
        {"key": "profile", "value": settings.profile, "source": ""},
        {"key": "config", "value": str(settings.config_path), "source": ""},
        {"key": "home", "value": str(settings.home), "source": ""},
    ]
    if settings.json:
        emit_json({r["key"]: {"value": r["value"], "source": r["source"]} for r in rows})
        return
    emit_table(rows, [("key", "KEY"), ("value", "VALUE"), ("source", "SOURCE")])


def _credential_row(settings: Any) -> dict[str, str]:
    url = settings.xnat
    if not url or url == "sandbox":
        return {"value": "", "source": "sandbox ready-file" if url else "none"}
    try:
        found = resolve(url, user=settings.user, home=settings.home)
    except HpcBridgeError as exc:
        return {"value": "", "source": f"refused: {exc.message}"}
    if found is None:
        return {"value": "", "source": "none (run `hpcbridge login`)"}
    source = {
        "token": "alias token stored by login",
        "environment": "environment",
        "netrc": "~/.netrc",
    }.get(found.source, found.source)
    if found.expires_ms:
        source += f", expires {expiry_text(found.expires_ms)}"
    return {"value": f"{found.user}:****", "source": source}
