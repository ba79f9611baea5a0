"""No secret of the submitting environment reaches a job on the CI cluster: sbatch and qsub
(Slurm's PBS wrappers) over SSH, through `hpcbridge submit`. (Submitted on the login node
itself: tests/integration/test_job_environment.py, one test for local, sbatch and qsub.)

Random secrets are set under every name hpcbridge or xnatpy reads a secret from. On the login
node they are in this process's environment, which sbatch exports by default. Over SSH the
submitting environment is the remote login shell's, so the test starts an sshd of its own (the
cluster's keys, a port of its own) whose ``SetEnv`` gives every session the secrets, as a
``~/.bashrc`` that exports them would. The job writes what its shell exports (``env``) and the
environment its process started with (``/proc/$$/environ``); neither may hold a secret, while a
canary variable that is no secret must arrive (the job does see the submitting environment).
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jobenv import (
    assert_no_secret,
    run_envdump,
    write_profile,
)

pytestmark = pytest.mark.e2e

SSHD = "/usr/sbin/sshd"
WAIT = ("--interval", "0.3", "--timeout", "120")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture()
def secret_sshd(
    cluster: dict[str, Any], secret_env: dict[str, str], tmp_path: Path
) -> Iterator[Path]:
    """An sshd (a child of this test, stopped by its pid) whose sessions have the secrets in
    their environment; yields an ssh_config whose host ``secret-login`` reaches it."""
    ssh = cluster["ssh"]
    folder = tmp_path / "secret-sshd"
    folder.mkdir()
    port = _free_port()
    setenv = " ".join(f"{name}={value}" for name, value in secret_env.items())
    config = folder / "sshd_config"
    config.write_text(
        f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {cluster["dir"]}/host_ed25519
PidFile {folder}/sshd.pid
AuthorizedKeysFile {cluster["dir"]}/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
SetEnv {setenv}
"""
    )
    host_key = Path(ssh["host_key_pub"]).read_text().split()
    (folder / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    client = folder / "ssh_config"
    client.write_text(
        f"Host secret-login\n    HostName 127.0.0.1\n    Port {port}\n    User {ssh['user']}\n"
        f"    IdentityFile {ssh['identity_file']}\n    IdentitiesOnly yes\n"
        f"    UserKnownHostsFile {folder}/known_hosts\n"
    )
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)
    log = folder / "sshd.log"
    proc = subprocess.Popen([SSHD, "-D", "-f", str(config), "-E", str(log)])
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                pytest.fail(f"sshd exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"sshd did not listen on port {port} within 10 s")
                time.sleep(0.05)
        yield client
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.usefixtures("scheduler_queue")
@pytest.mark.parametrize("kind", ["slurm", "pbs"])
def test_job_submitted_over_ssh_gets_no_secret_of_the_login_shell(
    kind: str, tmp_path: Path, isolated_home: Path, secret_env: dict[str, str], secret_sshd: Path
) -> None:
    write_profile(isolated_home, kind, secret_sshd)
    env, environ = run_envdump(kind, tmp_path, WAIT)
    assert_no_secret(env, secret_env, f"the env of a {kind} job over SSH")
    assert_no_secret(environ, secret_env, f"the process environment of a {kind} job over SSH")


@pytest.mark.usefixtures("scheduler_queue", "cluster")
@pytest.mark.parametrize("kind", ["slurm"])
def test_sbatch_export_policy_does_not_depend_on_the_site(
    tmp_path: Path, isolated_home: Path, secret_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A site (or user) default of SBATCH_EXPORT must not decide what jobs get: hpcbridge's
    # policy is explicit, so the canary arrives even where the default exports nothing.
    monkeypatch.setenv("SBATCH_EXPORT", "NONE")
    write_profile(isolated_home, "slurm", None)
    env, environ = run_envdump("slurm", tmp_path, WAIT)
    assert_no_secret(env, secret_env, "the env of a job submitted with SBATCH_EXPORT=NONE")
    assert_no_secret(environ, secret_env, "the process environment of that job")
