"""Where credentials come from, and the private files that hold them.

Order (first that yields a secret wins):

1. the alias token that ``hpcbridge login`` stored for the server (``credentials.json``);
2. the environment: ``HPCBRIDGE_PASSWORD`` or xnatpy's ``XNAT_PASS``, with the user from the
   settings (``HPCBRIDGE_USER`` / ``XNAT_USER`` / profile);
3. ``~/.netrc`` (or ``$NETRC``): the ``machine`` entry for the server's host.

Every file read here must be private to its owner: one that the group or others can read is
refused with a message that says how to fix it. Files are written 0600 through a temporary name
and an atomic rename, in a 0700 folder, so a crash never leaves a half-written credential.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import hmac
import json
import logging
import netrc
import os
import secrets
import stat
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import CredentialError

log = logging.getLogger(__name__)

#: The environment variables that hold a secret or name a file of secrets: hpcbridge's password,
#: xnatpy's password and session id, and the netrc file both read. None of them may reach a job:
#: a job that writes its environment into its outputs would upload them to XNAT, and PBS shows
#: the variables a job was given to every user (``qstat -f``'s Variable_List).
SECRET_ENV = ("HPCBRIDGE_PASSWORD", "NETRC", "XNATPY_JSESSION", "XNATPY_PASS", "XNAT_PASS")


def scrubbed_environ(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``environ`` (default: this process's) without the :data:`SECRET_ENV` variables,
    for every process hpcbridge starts that may start or become a job."""
    env = os.environ if environ is None else environ
    return {name: value for name, value in env.items() if name not in SECRET_ENV}


def check_private(path: Path) -> None:
    """Refuse a credential file that other users can read or write."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CredentialError(
            f"{path} is readable by other users (mode {stat.S_IMODE(mode):04o}); "
            "refusing to use it",
            hint=f"run `chmod 600 {path}`",
        )


#: A writer's temporary file (``.<name>.<unique>.part``) younger than this says the file is being
#: replaced right now, so a reader that finds it missing looks again instead of giving up.
REPLACING_SECONDS = 60.0
READ_ATTEMPTS = 5
READ_PAUSE = 0.05


def write_private(path: Path, data: dict[str, Any]) -> None:
    """Write JSON readable by the owner only, atomically.

    Many processes may write the same file at once (a chain's transfer jobs, on several nodes
    of one file system, saving the session they opened): each writes a temporary file of its
    own, named with its pid and a random part (pids repeat across machines), and renames it
    over the target, so a reader sees one whole version or another, never a mix.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(6)}.part")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise CredentialError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1)
            fh.flush()
            # without it a crash soon after the rename can leave an empty file in its place
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise CredentialError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise


def read_private(path: Path) -> dict[str, Any] | None:
    """The JSON in a private file, or None when there is none.

    A file another process is replacing is read whole, old or new: a moment's absence while
    a writer without atomic renames swaps it (an SFTP server without posix-rename), a stale
    handle on NFS, or a torn read are looked at again a few times before they count.
    """
    for attempt in range(READ_ATTEMPTS):
        last = attempt == READ_ATTEMPTS - 1
        try:
            check_private(path)
            with open(path) as fh:
                data = json.load(fh)
        except FileNotFoundError:
            if last or not _being_replaced(path):
                return None
        except (OSError, ValueError) as exc:
            transient = isinstance(exc, ValueError) or exc.errno == errno.ESTALE
            if last or not transient:
                raise CredentialError(f"cannot read {path}: {exc}") from None
        else:
            return data if isinstance(data, dict) else None
        time.sleep(READ_PAUSE * (attempt + 1))
    return None


def _being_replaced(path: Path) -> bool:
    """Whether a writer's temporary file for ``path`` is there, and fresh."""
    prefix = f".{path.name}."
    try:
        with os.scandir(path.parent) as entries:
            for entry in entries:
                if entry.name.startswith(prefix) and entry.name.endswith(".part"):
                    try:
                        age = time.time() - entry.stat(follow_symlinks=False).st_mtime
                    except OSError:
                        continue
                    if age < REPLACING_SECONDS:
                        return True
    except OSError:
        return False
    return False


def server_key(url: str) -> str:
    """One spelling per server: scheme and host lower-case, no trailing slash."""
    parts = urlsplit(url.strip())
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path.rstrip('/')}"


@dataclass(frozen=True)
class Secret:
    """A user name and a secret (password or alias-token secret), and where they came from."""

    user: str
    secret: str
    source: str  # "token", "environment", "netrc"
    expires_ms: int | None = None  # alias tokens only
    owner: str | None = None  # the XNAT user a token belongs to

    def __repr__(self) -> str:
        return f"Secret(user={self.user!r}, secret='***', source={self.source!r})"

    @property
    def is_token(self) -> bool:
        return self.source == "token"

    def expired(self, now: float | None = None) -> bool:
        now_ms = (time.time() if now is None else now) * 1000
        return self.expires_ms is not None and self.expires_ms <= now_ms


@dataclass(frozen=True)
class TokenStore:
    """Alias tokens stored by ``hpcbridge login``, one per server, in ``credentials.json``."""

    path: Path

    @classmethod
    def under(cls, home: Path) -> TokenStore:
        return cls(Path(home) / "credentials.json")

    def _load(self) -> dict[str, Any]:
        data = read_private(self.path) or {}
        data.setdefault("servers", {})
        return data

    def get(self, url: str) -> Secret | None:
        return token_of(self._load(), url)

    def default_server(self) -> str | None:
        """The server of the last login, for a machine with no configured XNAT."""
        data = self._load()
        default = data.get("default")
        return default if default in data["servers"] else None

    def put(self, url: str, *, user: str, alias: str, secret: str, expires: int | None) -> None:
        data = self._load()
        data["servers"].update(token_entry(url, user, alias, secret, expires)["servers"])
        data["default"] = server_key(url)
        write_private(self.path, data)

    def delete(self, url: str) -> bool:
        data = self._load()
        if data["servers"].pop(server_key(url), None) is None:
            return False
        if data.get("default") == server_key(url):
            data.pop("default")
        write_private(self.path, data)
        return True


def token_entry(
    url: str, user: str, alias: str, secret: str, expires: int | None
) -> dict[str, Any]:
    """A token store holding one alias token (the shape of ``credentials.json``)."""
    entry = {"user": user, "alias": alias, "secret": secret, "expires": expires}
    return {"servers": {server_key(url): entry}, "default": server_key(url)}


def token_of(data: dict[str, Any], url: str) -> Secret | None:
    """The alias token a token store holds for ``url``."""
    entry = data.get("servers", {}).get(server_key(url))
    if not isinstance(entry, dict) or not entry.get("alias") or not entry.get("secret"):
        return None
    return Secret(entry["alias"], entry["secret"], "token", entry.get("expires"), entry.get("user"))


def _entry(folder: Path, url: str, user: str) -> Path:
    """The file of ``folder`` for one server and user, named by a hash (no host or user in it)."""
    digest = hashlib.sha256(f"{server_key(url)}\n{user}".encode()).hexdigest()[:24]
    return folder / f"{digest}.json"


@dataclass(frozen=True)
class SessionCache:
    """The JSESSIONID of the last run, per server and user, so many runs share one session."""

    folder: Path

    @classmethod
    def under(cls, home: Path) -> SessionCache:
        return cls(Path(home) / "sessions")

    def get(self, url: str, user: str) -> str | None:
        path = _entry(self.folder, url, user)
        try:
            data = read_private(path)
        except CredentialError as exc:
            if path.exists() and not _private(path):
                raise  # a cache others can read is a leak to report, not a miss
            # Only a cache: a damaged entry (a crash mid-write on an older version) is a miss,
            # and the next login replaces it, instead of failing every job that shares it.
            log.debug("ignoring the cached XNAT session: %s", exc.message)
            return None
        return str(data["jsessionid"]) if data and data.get("jsessionid") else None

    def put(self, url: str, user: str, jsessionid: str) -> None:
        data = {"server": server_key(url), "user": user, "jsessionid": jsessionid}
        try:
            write_private(_entry(self.folder, url, user), dict(data, saved=int(time.time())))
        except CredentialError as exc:
            # The session works; only the next run's reuse of it is lost.
            log.warning("could not save the XNAT session for the next run: %s", exc.message)

    def delete(self, url: str, user: str) -> None:
        _entry(self.folder, url, user).unlink(missing_ok=True)

    @contextmanager
    def renewal(self, url: str, user: str, stale: str | None) -> Iterator[str | None]:
        """Held while this process opens the session that its siblings will share.

        Many processes share the cache (a chain's transfer jobs start together, and all find a
        session dead at once when XNAT times it out). Without this each would open a session
        of its own, and all but the last saved would live on unused until XNAT times them out:
        hundreds of jobs could fill the user's session limit. The first to get here logs in;
        the others wait and then get the session it saved (anything cached but ``stale``,
        the one the caller found dead), or None when it is still theirs to log in, with the
        lock held until they leave. Where the file system has no locks, or a holder takes
        longer than ``RENEWAL_WAIT``, each process logs in on its own, as without a cache.
        """
        fd = _lock(_entry(self.folder, url, user).with_suffix(".lock"))
        try:
            current = self.get(url, user)
            yield current if current and current != stale else None
        finally:
            if fd is not None:
                os.close(fd)  # releases the lock


#: How long a process waits for a sibling that is logging in (a login takes a second or so).
RENEWAL_WAIT = 30.0
#: flock's answers on a file system that does not lock (some Lustre and NFS mounts).
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS}


def _lock(path: Path) -> int | None:
    """An open descriptor holding an exclusive lock on ``path``, or None without one."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        log.debug("logging in without the session lock %s: %s", path, exc)
        return None
    deadline = time.monotonic() + RENEWAL_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                log.debug("%s is held too long; logging in without it", path)
                break
            time.sleep(0.05)
        except OSError as exc:
            if exc.errno not in _NO_LOCKS:
                log.debug("logging in without the session lock %s: %s", path, exc)
            break
    os.close(fd)
    return None


def _private(path: Path) -> bool:
    try:
        check_private(path)
    except (CredentialError, OSError):
        return False
    return True


def from_netrc(url: str, path: Path | None = None) -> Secret | None:
    """The netrc entry for the server's host, refusing a netrc others can read."""
    file = path or Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    if not file.exists():
        return None
    check_private(file)
    try:
        entry = netrc.netrc(str(file)).authenticators(urlsplit(url).hostname or "")
    except (netrc.NetrcParseError, OSError) as exc:
        raise CredentialError(f"cannot read {file}: {exc}") from None
    if not entry or not entry[0] or not entry[2]:
        return None
    return Secret(entry[0], entry[2], "netrc")


def secret_files(home: Path, environ: dict[str, str] | None = None) -> list[Path]:
    """Every file of hpcbridge's that holds a secret, for the state folder ``home`` (a chain's
    ``.hpcbridge-chain`` folder is one too): the token store, the cached sessions, the
    sandbox's ready-file (its admin password), and the netrc that ``from_netrc`` would read.
    Some may not exist. Stage-out refuses to upload any of them, however it is reached."""
    env = os.environ if environ is None else environ
    home = Path(home)
    sessions = SessionCache.under(home).folder
    try:
        cached = sorted(p for p in sessions.iterdir() if p.suffix == ".json")
    except OSError:
        cached = []
    # SandboxPaths.ready, spelled out: importing the sandbox package costs every command 60 ms
    ready = home / "sandbox" / "ready.json"
    netrc_file = Path(env.get("NETRC") or Path.home() / ".netrc")
    return [TokenStore.under(home).path, *cached, ready, netrc_file]


def resolve(
    url: str, *, user: str | None, home: Path, environ: dict[str, str] | None = None
) -> Secret | None:
    """The credentials to use for ``url``, in the documented order."""
    env = os.environ if environ is None else environ
    token = TokenStore.under(home).get(url)
    if token is not None and (user is None or user in (token.owner, token.user)):
        return token
    password = env.get("HPCBRIDGE_PASSWORD") or env.get("XNAT_PASS")
    if password and user:
        return Secret(user, password, "environment")
    found = from_netrc(url)
    if found is not None and (user is None or user == found.user):
        return found
    return None


@dataclass(frozen=True)
class Refusal:
    """A login that XNAT refused: when (epoch seconds), and which credential source."""

    refused_at: float
    source: str


@dataclass(frozen=True)
class LoginRefusals:
    """Credentials XNAT refused, per server and user, so that unattended runs stop retrying them.

    XNAT locks an account after a number of failed logins in a row (20 by default, for an hour);
    a cron job retrying a wrong or changed password every ten minutes would keep its user locked
    out. A refusal is kept in ``refused/`` (0600) until a login succeeds, with a salted, slow
    hash of the secret, never the secret: a new password or token is tried, the refused one not.
    """

    folder: Path

    #: PBKDF2 rounds: the file holds no secret, but a plain hash of a weak password is guessed
    #: offline in moments; at this cost a guess takes tens of milliseconds.
    ROUNDS = 200_000

    @classmethod
    def under(cls, home: Path) -> LoginRefusals:
        return cls(Path(home) / "refused")

    def _fingerprint(self, secret: str, salt: bytes) -> str:
        return hashlib.pbkdf2_hmac("sha256", secret.encode(), salt, self.ROUNDS).hex()

    def get(self, url: str, user: str, secret: str) -> Refusal | None:
        """The refusal of exactly this secret for ``user`` at ``url``, if one is recorded."""
        data = read_private(_entry(self.folder, url, user))
        if not data or data.get("server") != server_key(url) or data.get("user") != user:
            return None
        try:
            salt = bytes.fromhex(str(data["salt"]))
            refused_at = float(data["refused_at"])
        except (KeyError, TypeError, ValueError):
            return None  # unreadable: trying once more is better than never
        if not hmac.compare_digest(self._fingerprint(secret, salt), str(data.get("fingerprint"))):
            return None
        return Refusal(refused_at, str(data.get("source", "")))

    def put(self, url: str, user: str, secret: str, *, source: str) -> None:
        salt = os.urandom(16)
        data = {
            "server": server_key(url),
            "user": user,
            "source": source,
            "refused_at": time.time(),
            "salt": salt.hex(),
            "fingerprint": self._fingerprint(secret, salt),
        }
        write_private(_entry(self.folder, url, user), data)

    def clear(self, url: str, user: str | None = None) -> None:
        """Forget the refusals at ``url``: of ``user``, or of every user."""
        if user is not None:
            _entry(self.folder, url, user).unlink(missing_ok=True)
            return
        try:
            files = [p for p in self.folder.iterdir() if p.suffix == ".json"]
        except OSError:
            return
        for path in files:
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and data.get("server") == server_key(url):
                path.unlink(missing_ok=True)
