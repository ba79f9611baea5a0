"""The sandbox XNAT server: a threaded HTTP/1.1 server on loopback that answers like XNAT 1.8.

``SandboxServer`` runs it in a background thread (tests, the demo) or in the foreground
(``hpcbridge sandbox serve``); ``app`` answers the requests, ``handler`` speaks HTTP.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from .app import SandboxApp
from .auth import Authority, AuthSettings
from .handler import _Handler, _Server
from .http import Faults, Stats
from .store import Store


class SandboxServer:
    """A sandbox XNAT on loopback, in a background thread; usable as a context manager.

    >>> with SandboxServer(seed="demo") as sb:   # doctest: +SKIP
    ...     requests.get(sb.url + "/data/projects", auth=(sb.user, sb.password))
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: str | None = None,
        admin_user: str = "admin",
        admin_password: str = "admin",
        auth: AuthSettings | None = None,
        faults: Faults | None = None,
    ) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="hpcbridge-sandbox-")
            data_dir = self._tmp.name
        self.data_dir = Path(data_dir)
        self.store = Store(self.data_dir)
        self.authority = Authority(self.store, auth or AuthSettings())
        self.authority.add_user(admin_user, admin_password, admin=True)
        self.user, self.password = admin_user, admin_password
        self.faults = faults or Faults()
        self.stats = Stats()
        self.app = SandboxApp(self.store, self.authority, self.faults, self.stats)
        if seed:
            from .seed import seed_archive

            seed_archive(self.store, seed, user=admin_user)
        self._httpd = _Server((host, port), _Handler)
        self._httpd.app = self.app
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return str(self._httpd.server_address[0])

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def add_user(self, login: str, password: str, *, admin: bool = False) -> None:
        self.authority.add_user(login, password, admin=admin)

    @property
    def request_log(self) -> list[tuple[str, str, str | None, int]]:
        """(method, path, user, status) of the latest requests, oldest first; token secrets
        in paths are masked."""
        return list(self.app.request_log)

    def ready_info(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "user": self.user,
            "password": self.password,
            "pid": os.getpid(),
            "data": str(self.data_dir),
        }

    def write_ready_file(self, path: str | os.PathLike[str]) -> None:
        """Write url/user/password/pid as JSON, 0600 (it holds a credential), atomically."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".part")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(self.ready_info(), fh)
        os.replace(tmp, target)

    def start(self) -> SandboxServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            name="sandbox",
            kwargs={"poll_interval": 0.2},
            daemon=True,
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._httpd.serve_forever(poll_interval=0.2)

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self._httpd.server_close()
        self.store.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
