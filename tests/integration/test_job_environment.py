"""No secret of the submitting environment reaches a job: the local scheduler, the commands
LocalTransport runs, and the job-script skeletons of every scheduler, with real processes.

The secrets are random values set in this process's environment under every name hpcbridge or
xnatpy reads a secret from (or a secret file's path). A job writes both what its shell exports
(``env``) and the environment its process was started with (``/proc/$$/environ``, which an
``unset`` inside the script does not change), and neither may hold any of the values. A canary
variable that is no secret must still arrive, so that the test sees the environment at all.
A job submitted on this machine is checked on the local scheduler and, with the CI cluster,
on sbatch and on qsub (Slurm's PBS wrappers); over SSH: tests/e2e/test_cluster_environment.py.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from clusters import on
from jobenv import (
    ENV_RECIPE,
    SECRET_VARIABLES,
    assert_no_secret,
    run_envdump,
    write_profile,
)

from hpcbridge import credentials, recipes, transport

# jobs --wait's interval and timeout: the local scheduler's, and the CI clusters' longer ones
WAIT = {"local": ("--interval", "0.1", "--timeout", "60")}
CLUSTER_WAIT = ("--interval", "0.3", "--timeout", "120")


def envdump_script(tmp_path: Path, scheduler: str, name: str = "envdump") -> Path:
    recipe_file = tmp_path / "recipes" / "envdump.toml"
    recipe_file.parent.mkdir(exist_ok=True)
    recipe_file.write_text(ENV_RECIPE)
    (tmp_path / name / "in").mkdir(parents=True)
    text = recipes.render_script(
        recipes.load_recipe(recipe_file),
        scheduler,
        values={},
        input_dir=str(tmp_path / name / "in"),
        output_dir=str(tmp_path / name / "out"),
        work_dir=str(tmp_path / name),
    )
    script = tmp_path / name / "job.sh"
    script.write_text(text)
    return script


def test_library_names_every_secret_variable() -> None:
    assert set(SECRET_VARIABLES) <= set(credentials.SECRET_ENV)


def test_scrubbed_environ_drops_the_secrets_and_keeps_the_rest() -> None:
    environ = {name: "s3cret" for name in credentials.SECRET_ENV} | {"PATH": "/bin", "HOME": "/h"}
    assert credentials.scrubbed_environ(environ) == {"PATH": "/bin", "HOME": "/h"}
    assert set(credentials.SECRET_ENV) <= set(environ)  # the caller's mapping is left alone


def test_local_transport_runs_commands_without_the_secrets(secret_env: dict[str, str]) -> None:
    result = transport.LocalTransport().run(["env"])
    assert result.ok
    assert_no_secret(result.stdout, secret_env, "the environment of a LocalTransport command")


def test_unset_secrets_clears_a_shell_that_has_them(secret_env: dict[str, str]) -> None:
    # What a login shell over SSH that exports them (~/.bashrc) runs a submission with.
    done = subprocess.run(
        transport.unset_secrets(["sh", "-c", 'env; tr "\\0" "\\n" < /proc/$$/environ']),
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert_no_secret(done.stdout, secret_env, "a command run through unset_secrets")


# The login node's own schedulers: PBS Pro's user submits over SSH only
# (tests/e2e/test_cluster_environment.py has SSH and a login shell that exports the secrets).
ON_THIS_MACHINE = on("local", "slurm", "pbs")


@pytest.mark.usefixtures("scheduler_queue", "no_local_jobs_left")
@pytest.mark.parametrize("kind", ON_THIS_MACHINE, indirect=True)
def test_job_submitted_on_this_machine_gets_no_secret(
    kind: str, tmp_path: Path, isolated_home: Path, secret_env: dict[str, str]
) -> None:
    write_profile(isolated_home, kind, None)
    env, environ = run_envdump(kind, tmp_path, WAIT.get(kind, CLUSTER_WAIT))
    assert_no_secret(env, secret_env, f"the env of a {kind} job")
    assert_no_secret(environ, secret_env, f"the process environment of a {kind} job")


@pytest.mark.parametrize("scheduler", recipes.SCHEDULERS)
def test_every_job_script_unsets_the_secrets(
    scheduler: str, tmp_path: Path, secret_env: dict[str, str]
) -> None:
    # The last layer: a job started WITH the secrets (qsub -V, a site's default export, a login
    # shell on the compute node) must not pass them on to the recipe's command.
    script = envdump_script(tmp_path, scheduler)
    subprocess.run(["bash", str(script)], env=dict(os.environ), timeout=60, check=True)
    env = (tmp_path / "envdump" / "out" / "env.txt").read_text()
    assert_no_secret(env, secret_env, f"the env of the command of a {scheduler} job")


@pytest.mark.parametrize("scheduler", recipes.SCHEDULERS)
def test_the_skeleton_unsets_exactly_the_library_list(scheduler: str, tmp_path: Path) -> None:
    text = envdump_script(tmp_path, scheduler).read_text()
    unset = [line for line in text.splitlines() if line.startswith("unset ")]
    assert len(unset) == 1, unset
    assert sorted(unset[0].split()[1:]) == sorted(credentials.SECRET_ENV)
