"""``hpcbridge config init`` and ``config show``: profiles and where each setting comes from."""

from __future__ import annotations

import sys
from typing import Any

import click

from ..config import Unfit, check_xnat_url, read_config_file, write_profile, xnat_url
from ..credentials import resolve
from ..errors import ConfigError, HpcBridgeError
from ..xnat.client import expiry_text
from .app import emit_json, emit_table, main, settings_of
from .output import echo


@main.group("config")
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
    "--scheduler", type=click.Choice(["local", "pbs", "torque", "slurm"]), help="Batch scheduler."
)
@click.option("--host", metavar="SSH_HOST", help="Submit over SSH to this login node.")
@click.option("--account", metavar="PROJECT", help="PBS -P project (Artemis) or Slurm account.")
@click.option("--queue", metavar="QUEUE", help="Queue (PBS) or partition (Slurm) for jobs.")
@click.option(
    "--work-root",
    metavar="DIR",
    help="Absolute folder where runs keep their data, on the machine that runs the jobs.",
)
@click.option(
    "--transfer-queue", metavar="QUEUE", help="Queue of a chain's transfer jobs, e.g. dtq."
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

    No secret goes into the file: run `hpcbridge login` afterwards for a token.

    \b
    Examples:
      hpcbridge config init --name artemis --xnat https://xnat.example.org --user alice \\
          --scheduler pbs --account PTV000 --work-root /scratch/PTV000/hpcbridge
      hpcbridge config init --name slurm-ws --xnat https://xnat.example.org --user alice \\
          --scheduler slurm --host login.cluster.example.org --work-root /scratch/alice/hb
    """
    settings = settings_of(ctx)
    if work_root is not None and not work_root.startswith("/"):
        raise ConfigError(f"--work-root must be an absolute path, not {work_root!r}")
    path = settings.config_path
    if name in read_config_file(path).get("profiles", {}) and not force:
        raise ConfigError(
            f"profile {name!r} already exists in {path}", hint="add --force to replace it"
        )
    interactive = sys.stdin.isatty()
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
    xnat = check_xnat_url(xnat, allow_insecure_http=allow_insecure_http, origin="option --xnat")
    if user is None and interactive:
        user = click.prompt("XNAT user (empty for token-only)", default="", show_default=False)
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
