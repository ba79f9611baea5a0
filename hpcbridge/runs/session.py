"""``RunSession``: the handles a command works with -- the settings, the XNAT client, the ledger,
the transport with its scheduler, the job records -- opened in one place and closed together."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from .. import xnat
from ..config import Settings
from ..jobs import JobStore, open_scheduler, open_transport
from ..ledger import Ledger
from ..schedulers.base import Scheduler
from ..xnat.client import XnatClient


class RunSession:
    """Use it as a context manager: entering opens the ledger, logs in to XNAT and connects to
    the scheduler's host, in that order, each only when asked for; leaving closes them. A
    handle not asked for is not there (AttributeError)."""

    ledger: Ledger
    client: XnatClient
    scheduler: Scheduler

    def __init__(
        self,
        settings: Settings,
        *,
        xnat: bool = True,
        ledger: bool = True,
        jobs: bool = True,
        accept_new_host_key: bool = False,
        connect: Callable[[Settings], XnatClient] = xnat.connect,
    ) -> None:
        self.settings = settings
        # The command line passes its own, which also finds the sandbox of the sandbox profile.
        self._connect = connect
        self._wanted = (ledger, xnat, jobs)
        self._accept_new_host_key = accept_new_host_key
        self._stack = contextlib.ExitStack()
        # One store for every pass of a process: it reads the profile's job records once, not
        # once per pass (polls check every record for afterok orphans).
        self.store = JobStore(settings.home, settings.profile)

    @classmethod
    def of(
        cls,
        settings: Settings,
        client: XnatClient,
        ledger: Ledger,
        scheduler: Scheduler,
        store: JobStore | None = None,
    ) -> RunSession:
        """A session over handles the caller opened, and closes."""
        session = cls(settings, xnat=False, ledger=False, jobs=False)
        session.client, session.ledger, session.scheduler = client, ledger, scheduler
        session.store = store or session.store
        return session

    def __enter__(self) -> RunSession:
        ledger, xnat, jobs = self._wanted
        with contextlib.ExitStack() as stack:
            if ledger:
                self.ledger = stack.enter_context(Ledger.for_settings(self.settings))
            if xnat:
                self.client = stack.enter_context(self._connect(self.settings))
            if jobs:
                transport = open_transport(
                    self.settings, accept_new_host_key=self._accept_new_host_key
                )
                stack.callback(transport.close)
                self.scheduler = open_scheduler(self.settings, transport)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
