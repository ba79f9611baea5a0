"""What the job-environment tests of tests/integration and tests/e2e share: random secrets under
every name hpcbridge or xnatpy reads a secret from, a recipe whose job writes the environment it
was given, and the check that none of the secrets arrived while a canary did.

The names are written here rather than taken from hpcbridge, so that a name dropped from the
library's list fails the tests instead of silently leaving their scope.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
from scenario import cli

SECRET_VARIABLES = ("HPCBRIDGE_PASSWORD", "XNAT_PASS", "XNATPY_PASS", "XNATPY_JSESSION", "NETRC")

ENV_RECIPE = """name = "envdump"
description = "writes the environment the job was given"
[run]
command = '''
env > {{ output_dir }}/env.txt
tr '\\0' '\\n' < /proc/$$/environ > {{ output_dir }}/environ.txt
'''
[resources]
memory = "100MB"
walltime = "00:05:00"
"""


@pytest.fixture()
def secret_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Random secrets under every secret-bearing name, and a canary, in this environment."""
    values = {name: f"{name.lower()}-{secrets.token_hex(12)}" for name in SECRET_VARIABLES}
    values["ENV_CANARY"] = f"canary-{secrets.token_hex(12)}"
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def assert_no_secret(text: str, secret_env: dict[str, str], what: str) -> None:
    assert secret_env["ENV_CANARY"] in text, f"{what} does not show the submitting environment"
    leaked = [name for name in SECRET_VARIABLES if secret_env[name] in text]
    assert not leaked, f"{what} holds the value of {', '.join(leaked)}"
    leaked = [name for name in SECRET_VARIABLES if f"\n{name}=" in f"\n{text}"]
    assert not leaked, f"{what} sets {', '.join(leaked)}"


def write_profile(home: Path, kind: str, ssh_config: Path | None) -> None:
    """A profile `ci` on ``kind``: on this machine, or through ``ssh_config``'s `secret-login`."""
    home.mkdir(parents=True, exist_ok=True)
    where = f'host = "secret-login"\nssh_config = "{ssh_config}"\n' if ssh_config else ""
    (home / "config.toml").write_text(
        f'default_profile = "ci"\n\n[profiles.ci]\n{where}scheduler = "{kind}"\n'
        "poll_interval = 0.3\n"
    )


def run_envdump(kind: str, tmp_path: Path, wait: tuple[str, ...]) -> tuple[str, str]:
    """Render, submit and wait for the envdump job (``jobs --wait`` with ``wait``'s interval and
    timeout); what it wrote: (env, process environment)."""
    recipes_dir = tmp_path / "recipes"
    recipes_dir.mkdir()
    (recipes_dir / "envdump.toml").write_text(ENV_RECIPE)
    base = tmp_path / "envdump"
    (base / "in").mkdir(parents=True)
    script = base / "job.sh"
    rendered = cli(
        "render", "envdump", "--recipes", str(recipes_dir), "--scheduler", kind,
        "--input", str(base / "in"), "--output", str(base / "out"), "--name", "envdump",
        "-o", str(script),
    )  # fmt: skip
    assert rendered.exit_code == 0, rendered.output
    submitted = cli("submit", str(script))
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.stdout.strip()
    waited = cli("jobs", job_id, "--wait", *wait)
    assert waited.exit_code == 0, waited.output
    out = base / "out"
    return (out / "env.txt").read_text(), (out / "environ.txt").read_text()
