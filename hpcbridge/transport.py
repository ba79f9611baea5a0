"""Where scheduler commands run and job files go: this machine, or (later) a login node over SSH.

One interface for both: run an argv with a timeout and get a ``Result``; put, get, write and
read files; make folders. Paths on the far side are absolute POSIX paths, and every write goes to
a temporary name first and is renamed into place, so a job never sees half a script. Commands
are argv lists, never shell strings: a label cannot turn into shell syntax on the way.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .closing import Closing
from .credentials import SECRET_ENV, scrubbed_environ
from .errors import TransportError

READ_LIMIT = 1024 * 1024


@dataclass(frozen=True)
class Result:
    """What a command did: its argv, exit code and output."""

    argv: tuple[str, ...]
    exit_code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def tail(self, limit: int = 300) -> str:
        """The last lines of stderr (stdout when stderr is empty) on one line, for messages."""
        return " ".join((self.stderr or self.stdout).strip().splitlines()[-3:])[:limit]

    def said(self) -> str:
        """What the command said last, or its exit status when it said nothing."""
        return self.tail(400) or f"exit status {self.exit_code}"

    def check(self, what: str) -> Result:
        """This result, or a TransportError naming the command and the end of its stderr."""
        if self.ok:
            return self
        tail = self.tail()
        raise TransportError(
            f"{what}: `{shlex.join(self.argv)}` exited {self.exit_code}"
            + (f": {tail}" if tail else ""),
            result=self,
        )


def remote_path(path: str) -> str:
    """An absolute, normalised POSIX path (no ``..``), or a TransportError."""
    text = str(path)
    if not text.startswith("/") or "\0" in text or "\n" in text:
        raise TransportError(f"{text!r} is not an absolute path")
    if ".." in PurePosixPath(text).parts:
        raise TransportError(f"{text!r} must not contain '..'")
    return str(PurePosixPath(text))


def part_path(path: Path) -> Path:
    """Where a file is written on this machine before it is renamed to ``path``."""
    return path.with_name(f".{path.name}.{os.getpid()}.part")


def unset_secrets(argv: Sequence[str]) -> list[str]:
    """``argv`` behind ``env -u NAME ...``: it runs without the :data:`SECRET_ENV` variables
    whatever the shell that starts it exports."""
    return ["env", *(arg for name in SECRET_ENV for arg in ("-u", name)), *argv]


class Transport(Closing, ABC):
    """Run commands and move files on the machine that talks to the scheduler."""

    name = "transport"

    def without_secrets(self, argv: Sequence[str]) -> list[str]:
        """``argv`` as it must run to submit a job: without the secret variables, which a job
        would otherwise inherit. A remote command runs in the login shell's environment, which
        hpcbridge does not build (a ``~/.bashrc`` may export a password), so they are unset
        on the command line."""
        return unset_secrets(argv)

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 60.0,
        stdin: str | None = None,
        retry: bool = True,
    ) -> Result:
        """Run ``argv``; ``retry=False`` for commands that must not run twice (``qsub``): a
        transport that can lose its connection must then not repeat them after a drop."""
        args = tuple(str(a) for a in argv)
        if not args:
            raise TransportError("no command given")
        return self._run(args, timeout, stdin, retry)

    def _run(self, args: tuple[str, ...], timeout: float, stdin: str | None, retry: bool) -> Result:
        """What :meth:`run` does once ``args`` is checked: a transport implements this, or
        overrides :meth:`run` itself."""
        raise NotImplementedError

    @abstractmethod
    def write_text(self, path: str, text: str, *, mode: int = 0o644) -> None: ...

    @abstractmethod
    def read_text(self, path: str, *, limit: int = READ_LIMIT) -> str | None: ...

    @abstractmethod
    def put(self, local: Path, path: str, *, mode: int | None = None) -> None: ...

    @abstractmethod
    def get(self, path: str, local: Path) -> None: ...

    @abstractmethod
    def makedirs(self, path: str) -> None: ...

    @abstractmethod
    def files_in(self, folder: str) -> list[str]:
        """The names of the regular files directly in ``folder``, sorted; [] when it is missing.
        (Over SSH an SFTP listing: a shell command costs a login shell's start-up each time.)"""

    @abstractmethod
    def remove(self, path: str) -> None:
        """Delete a file; a missing one is not an error."""


class LocalTransport(Transport):
    """This machine: the login node itself, or the embedded local scheduler's host."""

    name = "local"

    def without_secrets(self, argv: Sequence[str]) -> list[str]:
        # run() already gives every command an environment without them.
        return list(argv)

    def _run(self, args: tuple[str, ...], timeout: float, stdin: str | None, retry: bool) -> Result:
        try:
            # Scrubbed for every command, not only qsub and sbatch: whatever runs here may start
            # a job, and none of them needs a secret.
            done = subprocess.run(
                args,
                input=stdin,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                env=scrubbed_environ(),
            )
        except FileNotFoundError:
            raise TransportError(f"{args[0]}: command not found on this machine") from None
        except PermissionError:
            raise TransportError(f"{args[0]}: not executable") from None
        except subprocess.TimeoutExpired:
            raise TransportError(
                f"`{shlex.join(args)}` did not finish within {timeout:g} s"
            ) from None
        return Result(args, done.returncode, done.stdout, done.stderr)

    def write_text(self, path: str, text: str, *, mode: int = 0o644) -> None:
        target = Path(remote_path(path))
        tmp = part_path(target)
        with _failing(f"write {target}", tmp):
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            os.chmod(tmp, mode)  # the umask may have narrowed it
            os.replace(tmp, target)

    def read_text(self, path: str, *, limit: int = READ_LIMIT) -> str | None:
        with _failing(f"read {path}"), contextlib.suppress(FileNotFoundError):
            with open(remote_path(path), errors="replace") as fh:
                return fh.read(limit)
        return None

    def put(self, local: Path, path: str, *, mode: int | None = None) -> None:
        target = Path(remote_path(path))
        tmp = part_path(target)
        with _failing(f"copy {local} to {target}", tmp):
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local, tmp)
            if mode is not None:
                os.chmod(tmp, mode)
            os.replace(tmp, target)

    def get(self, path: str, local: Path) -> None:
        tmp = part_path(local)
        with _failing(f"copy {path} to {local}", tmp):
            shutil.copyfile(remote_path(path), tmp)
            os.replace(tmp, local)

    def makedirs(self, path: str) -> None:
        with _failing(f"create {path}"):
            Path(remote_path(path)).mkdir(parents=True, exist_ok=True)

    def files_in(self, folder: str) -> list[str]:
        with _failing(f"list {folder}"), contextlib.suppress(FileNotFoundError):
            with os.scandir(remote_path(folder)) as entries:
                return sorted(e.name for e in entries if e.is_file(follow_symlinks=False))
        return []

    def remove(self, path: str) -> None:
        with _failing(f"delete {path}"):
            Path(remote_path(path)).unlink(missing_ok=True)


@contextlib.contextmanager
def _failing(what: str, tmp: Path | None = None) -> Iterator[None]:
    """An OSError in the block as "cannot WHAT: why", after removing ``tmp``."""
    try:
        yield
    except OSError as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise TransportError(f"cannot {what}: {exc.strerror}") from None
