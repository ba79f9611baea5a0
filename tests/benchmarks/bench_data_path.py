#!/usr/bin/env python3
"""Benchmark: hpcbridge's data path against curl and xnatpy, on the sandbox XNAT.

Downloads and uploads one big file through ``hpcbridge sandbox serve`` on loopback with curl
(the reference), hpcbridge and xnatpy, in one run, and reports throughput ratios to curl and the
peak resident memory (RSS) of each client process:

    python tests/benchmarks/bench_data_path.py                  # 256 MiB, quick
    python tests/benchmarks/bench_data_path.py --size-mib 1024 --repeat 3 --out results.md

Targets (docs/performance.md): hpcbridge moves data at >= 0.9 of curl's throughput both ways,
and its peak RSS stays under 100 MB whatever the file size. Every tool runs in its own child
process; its peak RSS is the kernel's ``ru_maxrss`` for it as GNU time (``/usr/bin/time``)
reports it, or else its ``VmHWM`` polled every 10 ms (see ``run_child``). Each transfer is
timed ``--repeat`` times, the tools interleaved, and the best time is kept (and the largest
peak RSS). The script exits 1 when hpcbridge's peak RSS reaches 100 MB or any transfer comes
back wrong (sizes and md5 of what arrived are checked); throughput is reported, never asserted.

The rows:

- curl, the reference: the resource as a zip (``?format=zip``, what stage-in downloads), the
  single file, and the upload (``-T``, ``inbody=true``); credentials from a 0600 netrc file;
- hpcbridge's commands as users run them (``hpcbridge stage-in`` / ``stage-out``), timed as
  whole processes: start-up, listings, the transfer, and the verification they add (stage-in
  checks the zip's CRCs and every file's md5 while extracting and writes a manifest; stage-out
  hashes the local file before sending it and re-reads XNAT's listing afterwards);
- like for like with curl, hpcbridge's HTTP transfer alone, timed inside a child process:
  ``stagein._Plan._download`` (the very code stage-in runs to stream the zip to disk) and
  ``stageout._upload_one`` (the very code stage-out runs for one file's PUT);
- the same steps as the commands done by hand (``curl`` + ``unzip`` + ``md5sum``; ``md5sum`` +
  ``curl`` + a listing), when those tools are installed;
- xnatpy: the single file (md5 checked on the fly), the resource zip, and the upload, each
  timed inside its child after ``xnat.connect`` (which builds xnatpy's model first).

It needs about 5x ``--size-mib`` of free disk in ``--tmpdir``. Everything is removed at the
end, and the server is stopped by its PID. This is a measurement run on demand, not part of
the test suite (pyproject's testpaths do not include tests/benchmarks).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import requests
from sandbox_process import BenchFailure, hpcbridge_argv, start_server, stop_server

MIB = 1024 * 1024
RSS_LIMIT = 100 * 1000 * 1000  # the target: hpcbridge's peak RSS under 100 MB
RATIO_TARGET = 0.9
PROJECT, SUBJECT, EXPERIMENT, SCAN = "BENCH", "S1", "E1", "1"
NAME = "big.bin"

# -- the python children ---------------------------------------------------------------------
# Each prints one JSON line: {"seconds": <the transfer alone, timed in the child>}.

LIB_DOWNLOAD = """
import json, os, sys, time
from pathlib import Path
from hpcbridge.credentials import Secret
from hpcbridge.stagein.fetch import _plan
from hpcbridge.xnat.address import Address
from hpcbridge.xnat.browse import scans_of
from hpcbridge.xnat.client import XnatClient

url, address, target = sys.argv[1:4]
where = Address.parse(address)
secret = Secret(os.environ["HPCBRIDGE_USER"], os.environ["HPCBRIDGE_PASSWORD"], "environment")
with XnatClient(url, secret) as client:
    expt_id, label, scans = scans_of(client, where)
    scan = next(s for s in scans if s.id == where.scan)
    base = str(Address(where.project, where.subject, where.experiment))
    plan = _plan(client, expt_id, label, scan, "DICOM", Path(target).parent, base)
    t0 = time.perf_counter()
    plan._download(client, Path(target), None)  # what stage-in runs: zip streamed to disk
    seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds}))
"""

LIB_UPLOAD = """
import json, os, sys, time
from pathlib import Path
from hpcbridge.credentials import Secret
from hpcbridge.stageout.upload import LocalFile, _upload_one, resolve_target
from hpcbridge.xnat.address import Address
from hpcbridge.xnat.client import XnatClient

url, address, resource, source, size, md5 = sys.argv[1:7]
secret = Secret(os.environ["HPCBRIDGE_USER"], os.environ["HPCBRIDGE_PASSWORD"], "environment")
with XnatClient(url, secret) as client:
    target = resolve_target(client, Address.parse(address), resource)
    item = LocalFile(Path(source), Path(source).name, int(size), md5)  # md5 given, not computed
    t0 = time.perf_counter()
    _upload_one(client, target, item, False, None)  # what stage-out runs for one file's PUT
    seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds}))
"""

XNATPY_DOWNLOAD = """
import json, os, sys, time
import xnat

url, expt_id, scan_id, name, mode, target = sys.argv[1:7]
session = xnat.connect(
    url, user=os.environ["XNAT_USER"], password=os.environ["XNAT_PASS"], loglevel="ERROR"
)
try:
    resource = session.experiments[expt_id].scans[scan_id].resources["DICOM"]
    fobj = resource.files[name]
    t0 = time.perf_counter()
    if mode == "file":
        fobj.download(target, verbose=False)  # xnatpy checks the listed md5 on the fly
    else:
        resource.download(target, verbose=False)  # the resource as a zip
    seconds = time.perf_counter() - t0
finally:
    session.disconnect()
print(json.dumps({"seconds": seconds}))
"""

XNATPY_UPLOAD = """
import json, os, sys, time
import xnat

url, expt_id, scan_id, label, source, name = sys.argv[1:7]
session = xnat.connect(
    url, user=os.environ["XNAT_USER"], password=os.environ["XNAT_PASS"], loglevel="ERROR"
)
try:
    resource = session.experiments[expt_id].scans[scan_id].create_resource(label)
    t0 = time.perf_counter()
    resource.upload(source, name, verbose=False)
    seconds = time.perf_counter() - t0
finally:
    session.disconnect()
print(json.dumps({"seconds": seconds}))
"""


# -- one child process, with its own peak RSS -------------------------------------------------
@dataclass
class Child:
    returncode: int
    wall: float  # seconds from spawn to exit
    max_rss: int  # bytes, the child's peak RSS (see run_child)
    stdout: str
    stderr: str


GNU_TIME = "/usr/bin/time"


def rss_method() -> str:
    if os.access(GNU_TIME, os.X_OK):
        return "GNU time `%M` (ru_maxrss of the child, forked by `time`)"
    return "VmHWM of the child, polled every 10 ms"


def _hwm(pid: int) -> int:
    """The peak RSS (``VmHWM``) of a live process, in bytes; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def run_child(argv: list[str], *, env: dict[str, str] | None, timeout: float, work: Path) -> Child:
    """Run ``argv`` in a new process group and measure its wall time and peak RSS.

    Not ``os.wait4`` on a child of this script: Linux folds the RSS high-water mark of the
    memory a process had before ``exec`` into its ``ru_maxrss``, so every child of this
    ~35 MiB python process would read at least 35 MiB (curl included). GNU time forks the
    command from a process of about 2 MiB instead; without it the child's own ``VmHWM`` (the
    high-water mark of its memory since ``exec``) is polled, which misses only growth in the
    last 10 ms before exit.
    """
    out_path, err_path, rss_path = work / "child.out", work / "child.err", work / "child.rss"
    use_time = os.access(GNU_TIME, os.X_OK)
    full = [GNU_TIME, "-f", "%M", "-o", str(rss_path), "--", *argv] if use_time else argv
    peak = 0
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            full,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=env,
            close_fds=True,
            start_new_session=True,  # its own process group, so a timeout can end all of it
        )
        try:
            if use_time:
                proc.wait(timeout=timeout)
            else:
                deadline = t0 + timeout
                while proc.poll() is None:
                    peak = max(peak, _hwm(proc.pid))
                    if time.perf_counter() > deadline:
                        raise subprocess.TimeoutExpired(full, timeout)
                    time.sleep(0.01)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # a hung transfer: end the group we started
            proc.wait()
        wall = time.perf_counter() - t0
    if use_time:
        try:
            peak = int(rss_path.read_text().strip().splitlines()[-1]) * 1024  # KiB
        except (OSError, ValueError, IndexError):
            peak = 0
    child = Child(
        proc.returncode,
        wall,
        peak,
        out_path.read_text(errors="replace"),
        err_path.read_text(errors="replace"),
    )
    for path in (out_path, err_path, rss_path):
        path.unlink(missing_ok=True)
    return child


def _tail(text: str, n: int = 600) -> str:
    text = text.strip()
    return text if len(text) <= n else "..." + text[-n:]


# -- checks of what arrived -------------------------------------------------------------------
def md5_of(path: Path) -> tuple[int, str]:
    digest, size = hashlib.md5(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(MIB):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def zip_member(path: Path) -> tuple[int, str]:
    """Size and md5 of the zip's only file (zipfile checks its CRC as it is read)."""
    with zipfile.ZipFile(path) as zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        if len(infos) != 1 or not infos[0].filename.endswith("/" + NAME):
            raise BenchFailure(f"the zip holds {[i.filename for i in infos]}, not one {NAME}")
        digest, size = hashlib.md5(), 0
        with zf.open(infos[0]) as src:
            while chunk := src.read(MIB):
                digest.update(chunk)
                size += len(chunk)
    return size, digest.hexdigest()


# -- results ----------------------------------------------------------------------------------
@dataclass
class Row:
    direction: str
    tool: str
    timed: str  # what the seconds cover
    reference: str  # key of the curl row it is compared with ("" for curl rows)
    key: str
    hpcbridge: bool = False
    seconds: list[float] = field(default_factory=list)
    walls: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def best(self) -> float:
        return min(self.seconds) if self.seconds else float("nan")

    @property
    def best_wall(self) -> float:
        return min(self.walls) if self.walls else float("nan")

    @property
    def peak_rss(self) -> int:
        return max(self.rss) if self.rss else 0


# -- the server -------------------------------------------------------------------------------
# -- the benchmark ----------------------------------------------------------------------------
class Bench:
    def __init__(
        self, info: dict[str, Any], work: Path, src: Path, src_md5: str, curl: str
    ) -> None:
        self.url = str(info["url"]).rstrip("/")
        self.user, self.password = str(info["user"]), str(info["password"])
        self.work, self.src, self.src_md5, self.curl = work, src, src_md5, curl
        self.size = src.stat().st_size
        self.mib = self.size / MIB
        self.timeout = 120.0 + self.mib * 0.5
        self.session = requests.Session()
        self.expt_id = ""
        self.netrc = work / "netrc"
        self.out = work / "out"
        self.out.mkdir()
        home = work / "home"
        home.mkdir()
        base_env = {k: v for k, v in os.environ.items() if not k.startswith(("HPCBRIDGE_", "XNAT"))}
        self.env = {
            **base_env,
            "HPCBRIDGE_HOME": str(home),
            "HPCBRIDGE_XNAT": self.url,
            "HPCBRIDGE_USER": self.user,
            "HPCBRIDGE_PASSWORD": self.password,
            "XNAT_USER": self.user,
            "XNAT_PASS": self.password,
        }
        self.address = f"{PROJECT}/{SUBJECT}/{EXPERIMENT}/{SCAN}"
        # The same steps as the hpcbridge commands, done by hand (when the tools are present).
        self.by_hand = all(shutil.which(t) for t in ("sh", "unzip", "md5sum"))
        self.rows: dict[str, Row] = {}

    # set-up ---------------------------------------------------------------------------------
    def setup(self) -> None:
        auth = (self.user, self.password)
        r = self.session.post(f"{self.url}/data/JSESSION", auth=auth, timeout=30)
        r.raise_for_status()
        if self.session.cookies.get("JSESSIONID") != r.text.strip():
            self.session.cookies.set("JSESSIONID", r.text.strip())
        s, u = self.session, self.url
        s.put(
            f"{u}/data/projects/{PROJECT}?xsiType=xnat:projectData", timeout=30
        ).raise_for_status()
        s.put(f"{u}/data/projects/{PROJECT}/subjects/{SUBJECT}", timeout=30).raise_for_status()
        r = s.put(
            f"{u}/data/projects/{PROJECT}/subjects/{SUBJECT}/experiments/{EXPERIMENT}"
            "?xsiType=xnat:mrSessionData",
            timeout=30,
        )
        r.raise_for_status()
        self.expt_id = r.text.strip()
        s.put(f"{self.scan_url}?xsiType=xnat:mrScanData&type=T1", timeout=30).raise_for_status()
        fd = os.open(self.netrc, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        host = self.url.split("://", 1)[1].split("/", 1)[0].split(":")[0]
        with os.fdopen(fd, "w") as fh:
            fh.write(f"machine {host} login {self.user} password {self.password}\n")
        # the download source, stored once with curl
        self._curl("-T", str(self.src), "-o", os.devnull, self.files_url("DICOM", f"/{NAME}"))
        self.check_stored("DICOM")

    @property
    def scan_url(self) -> str:
        return f"{self.url}/data/experiments/{self.expt_id}/scans/{SCAN}"

    def files_url(self, resource: str, suffix: str = "", inbody: bool = True) -> str:
        query = "?inbody=true" if inbody and suffix else ""
        return f"{self.scan_url}/resources/{resource}/files{suffix}{query}"

    def check_stored(self, resource: str) -> str:
        """XNAT's listing of an upload must give the source's size and md5."""
        r = self.session.get(self.files_url(resource), params={"format": "json"}, timeout=30)
        r.raise_for_status()
        rows = {row["Name"]: row for row in r.json()["ResultSet"]["Result"]}
        row = rows.get(NAME)
        if row is None:
            raise BenchFailure(f"{NAME} is not listed in {resource} after the upload")
        if int(row["Size"]) != self.size or row["digest"] != self.src_md5:
            raise BenchFailure(
                f"{resource}/{NAME} stored as {row['Size']} bytes md5 {row['digest']}, "
                f"sent {self.size} bytes md5 {self.src_md5}"
            )
        return "stored md5 ok"

    def drop_resource(self, resource: str) -> None:
        r = self.session.delete(f"{self.scan_url}/resources/{resource}", timeout=60)
        if r.status_code not in (200, 204, 404):
            r.raise_for_status()

    def _curl(self, *args: str) -> str:
        argv = [self.curl, "-sS", "-f", "--netrc-file", str(self.netrc), *args]
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=self.timeout, check=False
        )
        if done.returncode != 0:
            raise BenchFailure(f"curl exited {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    # rows -----------------------------------------------------------------------------------
    def row(self, key: str, direction: str, tool: str, timed: str, reference: str = "") -> Row:
        if key not in self.rows:
            self.rows[key] = Row(
                direction, tool, timed, reference, key, hpcbridge=tool.startswith("hpcbridge")
            )
        return self.rows[key]

    def measure(
        self, row: Row, argv: list[str], check: Callable[[], str], seconds_from: str
    ) -> None:
        """Run one child; record its seconds, wall and peak RSS; ``check()`` what arrived."""
        child = run_child(argv, env=self.env, timeout=self.timeout, work=self.work)
        row.walls.append(child.wall)
        row.rss.append(child.max_rss)
        try:
            if child.returncode != 0:
                raise BenchFailure(
                    f"exit code {child.returncode}: {_tail(child.stderr or child.stdout)}"
                )
            if seconds_from == "json":
                seconds = float(json.loads(child.stdout.strip().splitlines()[-1])["seconds"])
            elif seconds_from == "curl":
                seconds = float(child.stdout.strip())
            else:
                seconds = child.wall
            note = check()
        except (BenchFailure, ValueError, KeyError, IndexError, OSError, zipfile.BadZipFile) as exc:
            row.errors.append(str(exc))
            print(f"  {row.direction:<8} {row.tool:<28} FAILED: {exc}", flush=True)
            return
        row.seconds.append(seconds)
        print(
            f"  {row.direction:<8} {row.tool:<28} {seconds:7.2f} s "
            f"{self.mib / seconds:8.1f} MiB/s  process {child.wall:6.2f} s  "
            f"peak RSS {child.max_rss / MIB:6.1f} MiB  {note}",
            flush=True,
        )

    def curl_argv(self, *args: str) -> list[str]:
        netrc = str(self.netrc)
        return [self.curl, "-sS", "-f", "--netrc-file", netrc, "-w", "%{time_total}", *args]

    def py_argv(self, code: str, *args: str) -> list[str]:
        return [sys.executable, "-c", code, *args]

    def expect_file(self, path: Path) -> str:
        size, md5 = md5_of(path)
        if (size, md5) != (self.size, self.src_md5):
            raise BenchFailure(f"got {size} bytes md5 {md5}, expected {self.size} {self.src_md5}")
        return "md5 ok"

    def expect_zip(self, path: Path) -> str:
        size, md5 = zip_member(path)
        if (size, md5) != (self.size, self.src_md5):
            raise BenchFailure(
                f"zip entry {size} bytes md5 {md5}, expected {self.size} {self.src_md5}"
            )
        return "zip CRC + md5 ok"

    def expect_staged(self, dest: Path) -> str:
        folder = dest / EXPERIMENT / "scans" / f"{SCAN}-T1" / "resources" / "DICOM"
        self.expect_file(folder / "files" / NAME)
        manifest = json.loads((folder / "manifest.json").read_text())
        (record,) = manifest["files"]
        if record["path"] != NAME or record["md5"] != self.src_md5:
            raise BenchFailure(f"the manifest records {record}")
        return "md5 + manifest ok"

    def expect_md5sum(self, dest: Path) -> str:
        """The by-hand download printed md5sum's line for the unpacked file; check it too."""
        (path,) = dest.glob(f"*/scans/*/resources/*/files/{NAME}")
        return self.expect_file(path)

    # one round: every transfer once, tools interleaved ----------------------------------
    def round(self) -> None:
        self.downloads()
        self.uploads()

    def downloads(self) -> None:
        out = self.out
        zip_url = self.files_url("DICOM") + "?format=zip"
        file_url = self.files_url("DICOM", f"/{NAME}", inbody=False)

        # the resource as a zip: what stage-in downloads
        target = out / "curl.zip"
        self.measure(
            self.row("dl-zip-curl", "download", "curl (zip)", "transfer (curl time_total)"),
            self.curl_argv("-o", str(target), zip_url),
            lambda: self.expect_zip(target),
            "curl",
        )
        target.unlink(missing_ok=True)

        target = out / "lib.zip"
        self.measure(
            self.row(
                "dl-zip-lib",
                "download",
                "hpcbridge library (zip)",
                "transfer (`_Plan._download`, in process)",
                "dl-zip-curl",
            ),
            self.py_argv(LIB_DOWNLOAD, self.url, self.address, str(target)),
            lambda: self.expect_zip(target),
            "json",
        )
        target.unlink(missing_ok=True)

        dest = out / "stagein"
        self.measure(
            self.row(
                "dl-stagein",
                "download",
                "hpcbridge stage-in (CLI)",
                "whole command: download + CRC/md5 check + extract + manifest",
                "dl-zip-curl",
            ),
            hpcbridge_argv() + ["stage-in", self.address, "--dest", str(dest), "--allow-non-dicom"],
            lambda: self.expect_staged(dest),
            "wall",
        )
        shutil.rmtree(dest, ignore_errors=True)

        if self.by_hand:
            dest = out / "by-hand"
            self.measure(
                self.row(
                    "dl-by-hand",
                    "download",
                    "by hand: curl + unzip + md5sum",
                    "whole: download + unzip (CRC check) + remove zip + md5sum",
                    "dl-zip-curl",
                ),
                [
                    "sh",
                    "-c",
                    'set -e; curl -sS -f --netrc-file "$1" -o "$2" "$3"; unzip -q "$2" -d "$4"; '
                    'rm "$2"; md5sum "$4"/*/scans/*/resources/*/files/*',
                    "sh",
                    str(self.netrc),
                    str(out / "by-hand.zip"),
                    zip_url,
                    str(dest),
                ],
                lambda: self.expect_md5sum(dest),
                "wall",
            )
            shutil.rmtree(dest, ignore_errors=True)
            (out / "by-hand.zip").unlink(missing_ok=True)

        target = out / "xnatpy.zip"
        self.measure(
            self.row(
                "dl-zip-xnatpy",
                "download",
                "xnatpy (zip)",
                "transfer (`resource.download`, in process)",
                "dl-zip-curl",
            ),
            self.py_argv(XNATPY_DOWNLOAD, self.url, self.expt_id, SCAN, NAME, "zip", str(target)),
            lambda: self.expect_zip(target),
            "json",
        )
        target.unlink(missing_ok=True)

        # the single file
        target = out / "curl.bin"
        self.measure(
            self.row("dl-file-curl", "download", "curl (file)", "transfer (curl time_total)"),
            self.curl_argv("-o", str(target), file_url),
            lambda: self.expect_file(target),
            "curl",
        )
        target.unlink(missing_ok=True)

        target = out / "xnatpy.bin"
        self.measure(
            self.row(
                "dl-file-xnatpy",
                "download",
                "xnatpy (file)",
                "transfer (`file.download`, md5 on the fly, in process)",
                "dl-file-curl",
            ),
            self.py_argv(XNATPY_DOWNLOAD, self.url, self.expt_id, SCAN, NAME, "file", str(target)),
            lambda: self.expect_file(target),
            "json",
        )
        target.unlink(missing_ok=True)

    def uploads(self) -> None:
        for label in ("OUTC", "OUTL", "OUTH", "OUTM", "OUTX"):
            self.drop_resource(label)  # every upload is fresh
        self.measure(
            self.row("ul-curl", "upload", "curl", "transfer (curl time_total)"),
            self.curl_argv(
                "-T", str(self.src), "-o", os.devnull, self.files_url("OUTC", f"/{NAME}")
            ),
            lambda: self.check_stored("OUTC"),
            "curl",
        )
        self.drop_resource("OUTC")
        self.measure(
            self.row(
                "ul-lib",
                "upload",
                "hpcbridge library",
                "transfer (`_upload_one`, in process)",
                "ul-curl",
            ),
            self.py_argv(
                LIB_UPLOAD,
                self.url,
                self.address,
                "OUTL",
                str(self.src),
                str(self.size),
                self.src_md5,
            ),
            lambda: self.check_stored("OUTL"),
            "json",
        )
        self.drop_resource("OUTL")
        self.measure(
            self.row(
                "ul-stageout",
                "upload",
                "hpcbridge stage-out (CLI)",
                "whole command: md5 of the file + upload + listing check",
                "ul-curl",
            ),
            hpcbridge_argv() + ["stage-out", self.address, "--resource", "OUTH", str(self.src)],
            lambda: self.check_stored("OUTH"),
            "wall",
        )
        self.drop_resource("OUTH")
        if self.by_hand:
            self.measure(
                self.row(
                    "ul-by-hand",
                    "upload",
                    "by hand: md5sum + curl + listing",
                    "whole: md5sum + upload + one listing (`curl`)",
                    "ul-curl",
                ),
                [
                    "sh",
                    "-c",
                    'set -e; md5sum "$1"; curl -sS -f --netrc-file "$2" -T "$1" -o /dev/null "$3"; '
                    'curl -sS -f --netrc-file "$2" -o /dev/null "$4"',
                    "sh",
                    str(self.src),
                    str(self.netrc),
                    self.files_url("OUTM", f"/{NAME}"),
                    self.files_url("OUTM") + "?format=json",
                ],
                lambda: self.check_stored("OUTM"),
                "wall",
            )
            self.drop_resource("OUTM")
        self.measure(
            self.row(
                "ul-xnatpy",
                "upload",
                "xnatpy",
                "transfer (`resource.upload`, in process)",
                "ul-curl",
            ),
            self.py_argv(XNATPY_UPLOAD, self.url, self.expt_id, SCAN, "OUTX", str(self.src), NAME),
            lambda: self.check_stored("OUTX"),
            "json",
        )
        self.drop_resource("OUTX")


# -- the source file --------------------------------------------------------------------------
def make_file(path: Path, size_mib: int) -> str:
    """``size_mib`` MiB of cheap pseudo-random bytes written in 1 MiB chunks; their md5."""
    block = os.urandom(MIB)
    md5 = hashlib.md5()
    with open(path, "wb") as fh:
        for i in range(size_mib):
            chunk = i.to_bytes(8, "little") + block[8:]  # every MiB differs
            fh.write(chunk)
            md5.update(chunk)
    return md5.hexdigest()


# -- reporting --------------------------------------------------------------------------------
def machine_line(curl: str) -> str:
    import xnat

    out = subprocess.run([curl, "--version"], capture_output=True, text=True, check=False).stdout
    curl_version = out.splitlines()[0].split(" (")[0] if out else "curl ?"
    return (
        f"{os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.1f} GiB RAM, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
        f"requests {requests.__version__}, xnatpy {xnat.__version__}, {curl_version}"
    )


def table(rows: list[Row], mib: float) -> str:
    by_key = {r.key: r for r in rows}
    lines = [
        "| direction | tool | what the seconds cover | MiB | best s | MiB/s | ratio to curl "
        "| process s | peak RSS MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ref = by_key.get(r.reference)
        if r.errors and not r.seconds:
            lines.append(
                f"| {r.direction} | {r.tool} | {r.timed} | {mib:.0f} | **failed** | – | – "
                f"| – | {r.peak_rss / MIB:.1f} |"
            )
            continue
        ratio = (
            "1.00 (ref.)"
            if not r.reference
            else (f"{ref.best / r.best:.2f}" if ref and ref.seconds else "–")
        )
        lines.append(
            f"| {r.direction} | {r.tool} | {r.timed} | {mib:.0f} | {r.best:.2f} "
            f"| {mib / r.best:.1f} | {ratio} | {r.best_wall:.2f} | {r.peak_rss / MIB:.1f} |"
        )
    return "\n".join(lines)


def _speed(ref: Row, row: Row) -> float:
    """Throughput of ``row`` relative to ``ref`` (best times; nan when either failed)."""
    if not row.seconds or not ref.seconds:
        return float("nan")
    return ref.best / row.best


def ratio(rows: dict[str, Row], key: str) -> float:
    return _speed(rows[rows[key].reference], rows[key])


def verdict(rows: dict[str, Row]) -> tuple[bool, str]:
    hp = [r for r in rows.values() if r.hpcbridge]
    worst = max(hp, key=lambda r: r.peak_rss)
    failed = [r for r in rows.values() if r.errors]
    rss_ok = worst.peak_rss < RSS_LIMIT
    dl, ul = ratio(rows, "dl-zip-lib"), ratio(rows, "ul-lib")
    dl_cmd, ul_cmd = ratio(rows, "dl-stagein"), ratio(rows, "ul-stageout")

    def mark(x: float) -> str:
        return "met" if x >= RATIO_TARGET else "NOT met"

    by_hand = ""
    if rows.get("dl-by-hand") and rows.get("ul-by-hand"):
        dl_hand = _speed(rows["dl-by-hand"], rows["dl-stagein"])
        ul_hand = _speed(rows["ul-by-hand"], rows["ul-stageout"])
        by_hand = (
            f" Against the same steps done by hand: stage-in {dl_hand:.2f} of the throughput of "
            f"curl + unzip + md5sum, stage-out {ul_hand:.2f} of md5sum + curl + listing."
        )

    text = (
        f"**Throughput (target >= {RATIO_TARGET} of curl)**: like for like (the HTTP transfer "
        f"alone) download {dl:.2f} ({mark(dl)}), upload {ul:.2f} ({mark(ul)}); whole commands, "
        f"which also verify (and, stage-in, extract): stage-in {dl_cmd:.2f} ({mark(dl_cmd)}), "
        f"stage-out {ul_cmd:.2f} ({mark(ul_cmd)}).{by_hand}\n\n"
        f"**Memory (target < 100 MB)**: hpcbridge's largest peak RSS "
        f"{worst.peak_rss / MIB:.1f} MiB ({worst.peak_rss / 1e6:.1f} MB, {worst.tool}): "
        f"{'met' if rss_ok else 'NOT met'}.\n\n"
        f"**Transfers**: "
        + (
            "every one arrived intact (sizes and md5 checked)."
            if not failed
            else f"{len(failed)} row(s) failed: "
            + "; ".join(f"{r.tool}: {r.errors[0]}" for r in failed)
        )
    )
    return rss_ok and not failed, text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--size-mib", type=int, default=256, help="file size in MiB (default 256)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per transfer; best kept (3)")
    ap.add_argument("--out", type=Path, help="append the Markdown report to this file")
    ap.add_argument("--tmpdir", type=Path, help="where the files go (default: system tmp)")
    args = ap.parse_args(argv)
    if args.size_mib < 1 or args.repeat < 1:
        ap.error("--size-mib and --repeat must be at least 1")

    curl = shutil.which("curl")
    if not curl:
        print("curl is needed as the reference; install it (apt-get install curl)", file=sys.stderr)
        return 2
    base = Path(args.tmpdir or tempfile.gettempdir())
    need = 5 * args.size_mib * MIB + 256 * MIB
    free = shutil.disk_usage(base).free
    if free < need:
        print(
            f"not enough disk in {base}: {free / 2**30:.1f} GiB free, need about "
            f"{need / 2**30:.1f} GiB (5x the file size)",
            file=sys.stderr,
        )
        return 2

    work = Path(tempfile.mkdtemp(prefix="hpcbridge-bench-data-", dir=base))
    proc: subprocess.Popen[bytes] | None = None
    pid: int | None = None
    ok = False
    try:
        src_dir = work / "src"
        src_dir.mkdir()
        src = src_dir / NAME
        print(f"generating {args.size_mib} MiB in {src} ...", flush=True)
        src_md5 = make_file(src, args.size_mib)
        proc, info, _ = start_server(work)
        pid = int(info["pid"])
        print(f"sandbox pid {pid} at {info['url']}", flush=True)
        bench = Bench(info, work, src, src_md5, curl)
        bench.setup()
        for i in range(1, args.repeat + 1):
            print(f"round {i} of {args.repeat}", flush=True)
            bench.round()
        ok, text = verdict(bench.rows)
        stamp = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
        report = (
            f"### {args.size_mib} MiB file, best of {args.repeat} ({stamp})\n\n"
            f"Machine: {machine_line(curl)}\n\nPeak RSS: {rss_method()}.\n\n"
            f"{table(list(bench.rows.values()), float(args.size_mib))}\n\n{text}\n"
        )
        print()
        print(report)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "a") as fh:
                fh.write(report + "\n")
        return 0 if ok else 1
    except (BenchFailure, requests.RequestException, OSError) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        stop_server(proc, pid)
        log_path = work / "server.log"
        if not ok and log_path.exists():
            print(
                "--- end of the sandbox's log ---\n"
                + _tail(log_path.read_text(errors="replace"), 2000),
                file=sys.stderr,
            )
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
