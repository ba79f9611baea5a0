"""Runs: one recipe over every matching scan, recorded in the ledger, resumable at any point.

``plan`` plans the scans and records them (state ``planned``); a pass of ``sync`` polls every
submitted job with one scheduler call, stages out and records jobs that finished, and submits
planned jobs until ``max_queued`` are in the scheduler, in either ``Mode``: one job per scan
(``single``) or a chain of three (``chained``). ``control`` retries and cancels;
``RunSession`` opens the handles all of them use.

On the files: the run's folders live under ``work_root`` on the machine that runs the jobs
(``<work_root>/run-<id>/<experiment>/scans/<scan>-<type>/``, holding ``resources/<input>/files``,
``out/`` and the job's ``.hpcbridge/``). When jobs run on this machine, stage-in writes there
directly; over SSH, the data is staged into ``$HPCBRIDGE_HOME/staging`` and copied by SFTP, and
outputs are copied back before they are uploaded.
"""

# ruff: noqa: F401 - the names a caller of the package needs, importable from it
from .context import SyncReport, Trouble, backoff, describe_wait, trouble_of, waiting
from .control import cancel_run, retry_run
from .plan import RunRequest, dry_run_scripts, plan_scans, start_run
from .session import RunSession
from .sync import wait_run
