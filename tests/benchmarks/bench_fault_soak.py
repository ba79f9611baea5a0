#!/usr/bin/env python3
"""Benchmark: the long fault soak (issue 15), on demand.

The same engine as the suite's soak (``tests/integration/test_fault_soak.py``: a run synced to
its end while the sandbox XNAT answers 503, cuts bodies, answers late and is restarted, the
syncing process is killed with SIGKILL, scheduler commands fail now and then and two syncs start
at once), with more scans, a longer fault phase and denser faults:

    python tests/benchmarks/bench_fault_soak.py                          # 200 scans, about 5 min
    python tests/benchmarks/bench_fault_soak.py --scans 500 --fault-seconds 600 --out r.md
    python tests/benchmarks/bench_fault_soak.py --seed 1234              # replay a schedule

It prints (and with ``--out`` appends as Markdown) the scans, the faults injected by kind, the
episodes, sync processes and passes, the times and the result, and exits 1 when the soak finds
the product wrong: a scan not uploaded, uploaded twice or failed on the way, a job submitted
twice, a resource in XNAT that does not hold exactly the expected files with the expected md5s,
a ledger that disagrees with XNAT, a traceback. Children run with ``PYTHONPATH`` set to
``--source`` (default: this checkout). Everything it starts is stopped by its PID; its temporary
folder is removed unless ``--keep``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import random
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# This checkout's hpcbridge for the soak's own process (seeding, reading the ledger), and its
# engine; the processes it starts run --source.
sys.path[:0] = [str(REPO), str(REPO / "tests" / "integration")]

from test_fault_soak import SEED_ENV, Soak, SoakConfig, SoakFailure, SoakResult  # noqa: E402

# The long variant: denser faults than the suite's soak (see SoakConfig for its defaults).
LONG = {
    "fail_every": (0, 3, 5, 9, 15, 30),
    "drop_every": (0, 2, 4, 8, 12),
    "drop_after": (0, 16, 300, 1500),
    "latency": (0.0, 0.0, 0.01, 0.05),
    "retry_after": (0, 0, 0, 0, 1),
    "scheduler_rate": (0.0, 0.1, 0.2, 0.4),
    "p_two_syncs": 0.4,
    "p_watch": 0.3,
    "p_kill": 0.5,
    "p_restart": 0.3,
}


def machine_line() -> str:
    cpus = os.cpu_count()
    try:
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    return (
        f"{cpus} CPUs, Linux {platform.release()}, Python {platform.python_version()}; "
        f"load average {load}"
    )


def report(result: SoakResult, cfg: SoakConfig, source: Path, started: str, load: str) -> str:
    lines = [
        f"#### Fault soak, seed {result.seed} ({started})",
        "",
        f"Machine: {load}; hpcbridge: {source}",
        "",
        f"max_queued {cfg.max_queued}, fault phase at most {cfg.fault_seconds:g} s or "
        f"{cfg.max_episodes} episodes, episodes of {cfg.episode_seconds[0]:g}-"
        f"{cfg.episode_seconds[1]:g} s, retry_interval 0.2 s, retry_max 1 s.",
        "",
        "| scans | episodes | sync processes | passes | uploaded under faults | fault phase s "
        "| finish s | wall s | result |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| {result.scans} | {result.episodes} | {result.syncs} | {result.passes} "
        f"| {result.uploaded_in_fault_phase} | {result.fault_phase_s:.1f} "
        f"| {result.finish_s:.1f} | {result.wall_s:.1f} "
        f"| {'PASS' if result.ok else 'FAIL'} |",
        "",
        "| fault | count |",
        "|---|---:|",
    ]
    lines += [f"| {kind} | {n} |" for kind, n in sorted(result.faults.items())]
    codes = ", ".join(f"{code}: {n}" for code, n in sorted(result.exit_codes.items()))
    lines += ["", f"Exit codes of the sync processes that were not killed: {codes}."]
    if result.problems:
        lines += ["", "Problems:", ""] + [f"- {p}" for p in result.problems[:50]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--scans", type=int, default=200)
    ap.add_argument("--max-queued", type=int, default=20)
    ap.add_argument("--fault-seconds", type=float, default=240.0)
    ap.add_argument("--max-episodes", type=int, default=300)
    ap.add_argument("--finish-seconds", type=float, default=300.0)
    ap.add_argument(
        "--seed", type=int, default=None, help=f"default: ${SEED_ENV}, or a new random seed"
    )
    ap.add_argument("--source", type=Path, default=REPO, help="the hpcbridge tree to run")
    ap.add_argument("--tmpdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--out", type=Path, default=None, help="append the Markdown report here")
    args = ap.parse_args(argv)

    seed = args.seed
    if seed is None:
        given = os.environ.get(SEED_ENV)
        seed = int(given) if given else random.SystemRandom().randrange(1, 10**9)
    source = args.source.resolve()
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(source), os.environ.get("PYTHONPATH", "")) if p
    )
    cfg = SoakConfig(
        scans=args.scans,
        max_queued=args.max_queued,
        fault_seconds=args.fault_seconds,
        max_episodes=args.max_episodes,
        finish_seconds=args.finish_seconds,
        pass_limit=120.0,
    )
    for key, value in LONG.items():
        setattr(cfg, key, value)
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    load = machine_line()
    print(f"fault soak: seed {seed} (replay with --seed {seed}), {cfg.scans} scans", flush=True)
    root = Path(tempfile.mkdtemp(prefix="hpcbridge-soak-", dir=args.tmpdir))
    soak = Soak(root, cfg, seed)
    try:
        result = soak.run()
    except SoakFailure as exc:  # the soak could not drive the product (it stopped everything)
        result = soak.result
        result.problems.append(f"the soak stopped: {exc}")
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    text = report(result, cfg, source, started, load)
    print(text)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(text + "\n")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
