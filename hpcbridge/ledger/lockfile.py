"""Lock files that work on NFS: made with ``O_CREAT|O_EXCL`` (atomic on NFS even where its byte
range locks are broken or local to one host), holding ``host:pid:token``, and taken over when
stale. :func:`break_stale_lock` and :func:`pid_alive` serve the run locks too
(:mod:`hpcbridge.runlock`)."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import LedgerError

log = logging.getLogger(__name__)

HOST = socket.gethostname()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def break_stale_lock(lock: Path, seen: str, what: str) -> bool:
    """Remove the lock file ``lock`` that held ``seen`` when found stale; whether it was ours
    to remove (False: gone already, or a fresh lock taken meanwhile, which is put back).

    Renaming is atomic, so of several processes breaking one stale lock only one wins; the
    loser may instead have moved a fresh lock taken meanwhile, which it links back in place.
    """
    grave = lock.with_name(f"{lock.name}.{HOST}.{os.getpid()}.stale")
    try:
        os.rename(lock, grave)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise LedgerError(f"cannot remove the stale {what} {lock}: {exc}") from None
    try:
        moved: str | None = grave.read_text()
    except OSError:
        moved = None
    if moved != seen:
        with contextlib.suppress(OSError):
            os.link(grave, lock)
    with contextlib.suppress(OSError):
        grave.unlink()
    return moved == seen


def acquire(lock: Path, *, timeout: float, stale_after: float) -> str:
    """Take the ledger's lock file ``lock``, waiting up to ``timeout`` seconds for a live holder;
    the content that marks it as ours."""
    content = f"{HOST}:{os.getpid()}:{secrets.token_hex(8)}\n"
    deadline = time.monotonic() + timeout
    delay = 0.005
    while not _create(lock, content):
        found = look(lock, "ledger lock file")
        if found is None:
            continue  # released between our two looks
        seen, age = found
        if _is_stale(seen, age, stale_after):
            if break_stale_lock(lock, seen, "ledger lock"):
                log.warning("took over the stale ledger lock %s (%s)", lock, seen.strip())
            continue
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            holder = seen.strip().rsplit(":", 1)[0] or "a process that is starting"
            raise LedgerError(
                f"the ledger is locked: {lock} is held by {holder} (for {age:.0f} s); "
                f"gave up after {timeout:g} s",
                hint=f"if no hpcbridge is using the ledger on that host, delete {lock}",
            )
        # Jitter keeps a crowd of waiters from retrying in step.
        time.sleep(min(remaining, delay * (0.5 + random.random())))
        delay = min(delay * 2, 0.1)
    return content


def _create(lock: Path, content: str) -> bool:
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    except OSError as exc:
        raise LedgerError(f"cannot create the ledger lock file {lock}: {exc.strerror}") from None
    try:
        os.write(fd, content.encode())
    except OSError as exc:
        os.close(fd)
        with contextlib.suppress(OSError):
            lock.unlink()
        raise LedgerError(f"cannot write the ledger lock file {lock}: {exc.strerror}") from None
    os.close(fd)
    return True


def _is_stale(seen: str, age: float, stale_after: float) -> bool:
    if age > stale_after:  # writes take milliseconds; nobody holds it this long
        return True
    host, _, rest = seen.strip().partition(":")
    pid = rest.partition(":")[0]
    return host == HOST and pid.isdigit() and not pid_alive(int(pid))


@contextlib.contextmanager
def held(lock: Path, *, timeout: float, stale_after: float) -> Iterator[None]:
    """Hold the ledger's lock file ``lock`` (see :func:`acquire`) for the ``with`` block."""
    content = acquire(lock, timeout=timeout, stale_after=stale_after)
    try:
        yield
    finally:
        if not remove_if_ours(lock, lambda seen: seen == content, "ledger lock"):
            log.warning("the ledger lock %s was taken over while this process held it", lock)


def look(lock: Path, what: str) -> tuple[str, float] | None:
    """What the lock file ``lock`` holds and its age in seconds; None if there is none."""
    try:
        return lock.read_text(), time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LedgerError(f"cannot read the {what} {lock}: {exc}") from None


def remove_if_ours(lock: Path, ours: Callable[[str], bool], what: str) -> bool:
    """Remove ``lock`` if ``ours`` says its content is this process's; False when another
    process has taken it over (the caller says so: in its own words)."""
    try:
        if ours(lock.read_text()):
            lock.unlink()
            return True
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove the %s %s: %s", what, lock, exc)
        return True
    return False
