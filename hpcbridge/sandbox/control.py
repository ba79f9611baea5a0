"""Start, find and stop the background sandbox that the ``sandbox`` profile talks to.

``hpcbridge sandbox start`` runs ``hpcbridge sandbox serve`` as a detached process whose archive
lives in ``$HPCBRIDGE_HOME/sandbox/data`` (so it persists across restarts) and which writes its
URL and admin credential to ``$HPCBRIDGE_HOME/sandbox/ready.json`` (mode 0600).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..credentials import check_private
from ..errors import SandboxError
from ..processes import pid_alive

START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0


@dataclass(frozen=True)
class SandboxPaths:
    root: Path

    @classmethod
    def under(cls, home: Path) -> SandboxPaths:
        return cls(Path(home) / "sandbox")

    @property
    def ready(self) -> Path:
        return self.root / "ready.json"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "server.log"


def read_ready(path: Path) -> dict[str, Any]:
    """The ready-file of a sandbox: url, user, password, pid, data."""
    try:
        check_private(path)
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise SandboxError(
            "the sandbox is not running", hint="start it with `hpcbridge sandbox start`"
        ) from None
    except (OSError, ValueError) as exc:
        raise SandboxError(f"cannot read {path}: {exc}") from None
    if not all(k in info for k in ("url", "user", "password", "pid")):
        raise SandboxError(f"{path} is not a sandbox ready-file")
    return dict(info)


def _is_sandbox_process(pid: int) -> bool:
    """Only ever signal a process that is our sandbox (a stale pid may be reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return pid_alive(pid)
    return b"hpcbridge" in b" ".join(cmdline) and b"serve" in cmdline


def running(paths: SandboxPaths) -> dict[str, Any] | None:
    """The ready info of the running background sandbox, or None."""
    if not paths.ready.exists():
        return None
    info = read_ready(paths.ready)
    if pid_alive(int(info["pid"])) and _is_sandbox_process(int(info["pid"])):
        return info
    paths.ready.unlink(missing_ok=True)  # left behind by a sandbox that died
    return None


def start(
    paths: SandboxPaths,
    *,
    seed: str | None = "demo",
    port: int = 0,
    host: str = "127.0.0.1",
    extra_args: list[str] | None = None,
) -> tuple[dict[str, Any], bool]:
    """Start the background sandbox unless it runs; returns (info, started_now)."""
    info = running(paths)
    if info is not None:
        return info, False
    paths.root.mkdir(parents=True, exist_ok=True)
    os.chmod(paths.root, 0o700)
    argv = [
        sys.executable,
        "-m",
        "hpcbridge",
        "sandbox",
        "serve",
        "--host",
        host,
        "--port",
        str(port),
        "--data",
        str(paths.data),
        "--ready-file",
        str(paths.ready),
    ]
    if seed:
        argv += ["--seed", seed]
    argv += extra_args or []
    with open(paths.log, "ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
        )
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if paths.ready.exists():
            info = read_ready(paths.ready)
            if int(info["pid"]) == proc.pid:
                return info, True
        if proc.poll() is not None:
            raise SandboxError(
                f"the sandbox exited with code {proc.returncode} while starting",
                hint=f"see {paths.log}",
            )
        time.sleep(0.1)
    proc.terminate()
    raise SandboxError(
        f"the sandbox did not become ready within {START_TIMEOUT:g} s", hint=f"see {paths.log}"
    )


def stop(paths: SandboxPaths) -> bool:
    """Stop the background sandbox; False when none was running."""
    info = running(paths)
    if info is None:
        return False
    pid = int(info["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_alive(pid):
        raise SandboxError(f"the sandbox (pid {pid}) did not stop within {STOP_TIMEOUT:g} s")
    paths.ready.unlink(missing_ok=True)
    return True
