"""Entry point of the local scheduler's per-job runner process (see :mod:`.local`)."""

import sys
from pathlib import Path

from hpcbridge.schedulers.local import run_job

if __name__ == "__main__":
    sys.exit(run_job(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else None))
