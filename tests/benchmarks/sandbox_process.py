"""Start and stop an ``hpcbridge sandbox serve`` process for the benchmarks in this folder.

The bench_* scripts run as ``python tests/benchmarks/bench_X.py``, so this folder is on their
import path.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

READY_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0


class BenchFailure(Exception):
    """A benchmark step went wrong: a transfer arrived damaged, a tool failed."""


def hpcbridge_argv() -> list[str]:
    exe = shutil.which("hpcbridge")
    return [exe] if exe else [sys.executable, "-m", "hpcbridge"]


def start_server(work: Path) -> tuple[subprocess.Popen[bytes], dict[str, Any], list[str]]:
    argv = hpcbridge_argv()
    command = list(argv)
    ready = work / "ready.json"
    data = work / "server-data"
    log_path = work / "server.log"
    argv += [
        "sandbox",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--ready-file",
        str(ready),
        "--data",
        str(data),
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True
        )
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if ready.exists():
            try:
                info = json.loads(ready.read_text())
            except ValueError:  # written atomically, but be patient anyway
                info = None
            if info:
                return proc, info, command
        if proc.poll() is not None:
            raise BenchFailure(
                f"the sandbox exited with code {proc.returncode} while starting:\n"
                + log_path.read_text(errors="replace")[-2000:]
            )
        time.sleep(0.05)
    raise BenchFailure(f"the sandbox was not ready within {READY_TIMEOUT:g} s")


def stop_server(proc: subprocess.Popen[bytes] | None, pid: int | None) -> None:
    """Terminate the server by its PID, wait, and kill it after a timeout."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)
    # Should the ready-file name another process than the one we started (a wrapper), stop it
    # too -- by that PID only.
    if pid is not None and (proc is None or pid != proc.pid):
        try:
            other = psutil.Process(pid)
            other.terminate()
            try:
                other.wait(timeout=STOP_TIMEOUT)
            except psutil.TimeoutExpired:
                other.kill()
        except psutil.NoSuchProcess:
            pass
