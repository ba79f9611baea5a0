#!/usr/bin/env python3
"""Benchmark: does the sandbox XNAT stream bodies, keeping its memory flat?

The sandbox claims that request and response bodies flow in fixed-size chunks, so a 2 GiB
upload or download does not grow the server's resident memory. This script checks that claim
against the real ``hpcbridge sandbox serve`` process and compares its throughput with curl in
the same run:

    python tests/benchmarks/bench_sandbox_streaming.py                 # 256 MiB, quick
    python tests/benchmarks/bench_sandbox_streaming.py --size-mib 2048 --out results.md

For every step it reports wall seconds, MiB/s and the server's RSS growth (peak RSS during the
step minus RSS just before it, sampled every ~50 ms with psutil). The verdict fails (exit 1)
when any step grows the server by more than ``--bound-mib`` (a bound that does not scale with
the file) or any transfer comes back wrong (md5 or size mismatch). It is a measurement run on
demand, not part of the test suite (pyproject's testpaths do not include tests/benchmarks).

It needs about 3x ``--size-mib`` of free disk in ``--tmpdir`` (the source file plus the two
stored copies in the server's archive). Everything is removed at the end and the server is
stopped by its PID.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import requests
from sandbox_process import BenchFailure, start_server, stop_server

MIB = 1024 * 1024
SAMPLE_INTERVAL = 0.05


# -- memory sampling --------------------------------------------------------------------------
class RssSampler:
    """Samples the RSS of a few processes every ~50 ms and keeps a resettable peak per process."""

    def __init__(self, procs: dict[str, psutil.Process], interval: float = SAMPLE_INTERVAL) -> None:
        self._procs = procs
        self._interval = interval
        self._lock = threading.Lock()
        self._peak = {name: 0 for name in procs}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self.samples = 0

    def rss(self, name: str) -> int:
        try:
            return int(self._procs[name].memory_info().rss)
        except psutil.Error:
            return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            readings = {name: self.rss(name) for name in self._procs}
            with self._lock:
                for name, value in readings.items():
                    self._peak[name] = max(self._peak[name], value)
                self.samples += 1
            self._stop.wait(self._interval)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def begin(self) -> dict[str, int]:
        """RSS of every process now; resets the peaks to these readings."""
        now = {name: self.rss(name) for name in self._procs}
        with self._lock:
            self._peak.update(now)
        return now

    def end(self) -> dict[str, int]:
        """The peak RSS of every process since ``begin`` (including a final reading)."""
        now = {name: self.rss(name) for name in self._procs}
        with self._lock:
            for name, value in now.items():
                self._peak[name] = max(self._peak[name], value)
            return dict(self._peak)


# -- results ----------------------------------------------------------------------------------
@dataclass
class Step:
    step: str
    tool: str
    mib: float
    seconds: float
    server_growth: int
    client_growth: int | None  # our own python process; None for curl steps
    ok: bool
    note: str = ""

    @property
    def rate(self) -> float:
        return self.mib / self.seconds if self.seconds > 0 else float("inf")


def _mib(n: int) -> str:
    return f"{n / MIB:.1f}"


# -- the source file --------------------------------------------------------------------------
def make_file(path: Path, size_mib: int) -> str:
    """Write ``size_mib`` MiB of cheap pseudo-random bytes in 1 MiB chunks; return their md5."""
    block = os.urandom(MIB)
    md5 = hashlib.md5()
    with open(path, "wb") as fh:
        for i in range(size_mib):
            chunk = i.to_bytes(8, "little") + block[8:]  # every MiB differs; no compressible runs
            fh.write(chunk)
            md5.update(chunk)
    return md5.hexdigest()


# -- the server -------------------------------------------------------------------------------
# -- the benchmark ----------------------------------------------------------------------------
class Bench:
    def __init__(
        self,
        url: str,
        user: str,
        password: str,
        work: Path,
        src: Path,
        size_mib: int,
        src_md5: str,
        sampler: RssSampler,
        curl: str | None,
    ) -> None:
        self.url = url.rstrip("/")
        self.user, self.password = user, password
        self.work = work
        self.src = src
        self.size = size_mib * MIB
        self.size_mib = size_mib
        self.src_md5 = src_md5
        self.sampler = sampler
        self.curl = curl
        self.timeout = 120.0 + size_mib * 0.5  # generous; a hung transfer must still end
        self.steps: list[Step] = []
        self.session = requests.Session()
        self.expt_id = ""
        self.netrc: Path | None = None

    # set-up ---------------------------------------------------------------------------------
    def login(self) -> None:
        r = self.session.post(
            f"{self.url}/data/JSESSION", auth=(self.user, self.password), timeout=30
        )
        r.raise_for_status()
        sid = r.text.strip()
        if not sid:
            raise BenchFailure("POST /data/JSESSION returned no session id")
        if self.session.cookies.get("JSESSIONID") != sid:
            self.session.cookies.set("JSESSIONID", sid)
        # From here on the session cookie alone authenticates (no Basic header).

    def create_objects(self) -> None:
        s, u = self.session, self.url
        for path in (
            "/data/projects/BENCH?xsiType=xnat:projectData",
            "/data/projects/BENCH/subjects/S1",
        ):
            s.put(u + path, timeout=30).raise_for_status()
        r = s.put(
            u + "/data/projects/BENCH/subjects/S1/experiments/E1?xsiType=xnat:mrSessionData",
            timeout=30,
        )
        r.raise_for_status()
        self.expt_id = r.text.strip()
        if not self.expt_id:
            raise BenchFailure("PUT experiment returned no accession id")
        s.put(
            f"{u}/data/experiments/{self.expt_id}/scans/1?xsiType=xnat:mrScanData&type=T1",
            timeout=30,
        ).raise_for_status()

    def write_netrc(self) -> None:
        host = self.url.split("://", 1)[1].split("/", 1)[0].split(":")[0]
        self.netrc = self.work / "netrc"
        fd = os.open(self.netrc, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"machine {host} login {self.user} password {self.password}\n")

    def res_url(self, suffix: str = "") -> str:
        return f"{self.url}/data/experiments/{self.expt_id}/scans/1/resources/BIG/files{suffix}"

    # measurement ----------------------------------------------------------------------------
    def measure(
        self,
        step: str,
        tool: str,
        mib: float | None,
        action: Callable[[], tuple[float | None, str]],
    ) -> Step:
        """Run ``action`` (returns MiB moved when not known up front, and a note) and record it."""
        before = self.sampler.begin()
        t0 = time.perf_counter()
        ok, note, moved = True, "", mib
        try:
            got, note = action()
            if got is not None:
                moved = got
        except (
            BenchFailure,
            requests.RequestException,
            subprocess.SubprocessError,
            OSError,
        ) as exc:
            ok, note = False, f"FAILED: {exc}"
        seconds = time.perf_counter() - t0
        peak = self.sampler.end()
        result = Step(
            step,
            tool,
            moved if moved is not None else 0.0,
            seconds,
            peak["server"] - before["server"],
            None if tool == "curl" else peak["client"] - before["client"],
            ok,
            note,
        )
        self.steps.append(result)
        client = (
            ""
            if result.client_growth is None
            else f", client RSS +{_mib(result.client_growth)} MiB"
        )
        print(
            f"  {step:<22} {tool:<8} {result.seconds:8.2f} s {result.rate:9.1f} MiB/s  "
            f"server RSS +{_mib(result.server_growth)} MiB{client}"
            f"{'  ' + note if note else ''}",
            flush=True,
        )
        return result

    def _curl(self, *args: str) -> str:
        assert self.curl and self.netrc
        argv = [self.curl, "-sS", "-f", "--netrc-file", str(self.netrc), *args]
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=self.timeout, check=False
        )
        if done.returncode != 0:
            raise BenchFailure(f"curl exited {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def _check_stored(self, name: str) -> None:
        """The server's own record of an uploaded file must match the source size and md5."""
        r = self.session.get(self.res_url(), params={"format": "json"}, timeout=30)
        r.raise_for_status()
        rows = {row["Name"]: row for row in r.json()["ResultSet"]["Result"]}
        row = rows.get(name)
        if row is None:
            raise BenchFailure(f"{name} is not listed after the upload")
        if int(row["Size"]) != self.size or row["digest"] != self.src_md5:
            raise BenchFailure(
                f"{name} stored as {row['Size']} bytes md5 {row['digest']}, "
                f"sent {self.size} bytes md5 {self.src_md5}"
            )

    def upload_curl(self) -> tuple[None, str]:
        self._curl("-T", str(self.src), "-o", os.devnull, self.res_url("/curl.bin?inbody=true"))
        self._check_stored("curl.bin")
        return None, "stored md5 ok"

    def upload_requests(self) -> tuple[None, str]:
        with open(self.src, "rb") as fh:
            r = self.session.put(
                self.res_url("/requests.bin"),
                params={"inbody": "true"},
                data=fh,
                timeout=self.timeout,
            )
        r.raise_for_status()
        self._check_stored("requests.bin")
        return None, "stored md5 ok"

    def download_curl(self) -> tuple[None, str]:
        out = self._curl("-o", os.devnull, "-w", "%{size_download}", self.res_url("/curl.bin"))
        got = int(float(out.strip() or 0))
        if got != self.size:
            raise BenchFailure(f"curl received {got} bytes, expected {self.size}")
        return None, "size ok"

    def download_requests(self) -> tuple[None, str]:
        md5, got = hashlib.md5(), 0
        with self.session.get(self.res_url("/curl.bin"), stream=True, timeout=self.timeout) as r:
            r.raise_for_status()
            for chunk in r.iter_content(MIB):
                md5.update(chunk)
                got += len(chunk)
        if got != self.size or md5.hexdigest() != self.src_md5:
            raise BenchFailure(
                f"received {got} bytes md5 {md5.hexdigest()}, expected "
                f"{self.size} bytes md5 {self.src_md5}"
            )
        return None, "md5 ok"

    def zip_curl(self) -> tuple[float, str]:
        out = self._curl("-o", os.devnull, "-w", "%{size_download}", self.res_url("?format=zip"))
        got = int(float(out.strip() or 0))
        if got <= 2 * self.size:
            raise BenchFailure(f"zip of {got} bytes is not larger than 2 x {self.size}")
        return got / MIB, f"zip {got} B"

    def zip_requests(self) -> tuple[float, str]:
        got, tail = 0, b""
        with self.session.get(
            self.res_url(), params={"format": "zip"}, stream=True, timeout=self.timeout
        ) as r:
            r.raise_for_status()
            if "chunked" not in r.headers.get("Transfer-Encoding", "").lower():
                raise BenchFailure("the zip was not sent with chunked transfer encoding")
            for chunk in r.iter_content(MIB):
                got += len(chunk)
                tail = (tail + chunk)[-(64 * 1024) :]
        if got <= 2 * self.size:
            raise BenchFailure(f"zip of {got} bytes is not larger than 2 x {self.size}")
        if b"PK\x05\x06" not in tail:
            raise BenchFailure("the zip has no end-of-central-directory record")
        return got / MIB, f"zip {got} B, EOCD ok"

    def run(self) -> None:
        m = float(self.size_mib)
        if self.curl:
            self.write_netrc()
            self.measure("upload (inbody)", "curl", m, self.upload_curl)
        self.measure("upload (inbody)", "requests", m, self.upload_requests)
        if not self.curl:
            # the downloads need a curl.bin; store one with requests instead
            with open(self.src, "rb") as fh:
                self.session.put(
                    self.res_url("/curl.bin"),
                    params={"inbody": "true"},
                    data=fh,
                    timeout=self.timeout,
                ).raise_for_status()
        if self.curl:
            self.measure("download file", "curl", m, self.download_curl)
        self.measure("download file", "requests", m, self.download_requests)
        if self.curl:
            self.measure("download zip (2 files)", "curl", None, self.zip_curl)
        self.measure("download zip (2 files)", "requests", None, self.zip_requests)


# -- reporting --------------------------------------------------------------------------------
def machine_line(curl: str | None) -> str:
    curl_version = "curl not found"
    if curl:
        out = subprocess.run(
            [curl, "--version"], capture_output=True, text=True, check=False
        ).stdout
        curl_version = out.splitlines()[0].split(" (")[0] if out else "curl ?"
    return (
        f"{os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.1f} GiB RAM, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
        f"requests {requests.__version__}, {curl_version}"
    )


def table(steps: list[Step]) -> str:
    lines = [
        (
            "| step | tool | MiB | seconds | MiB/s | server RSS growth MiB "
            "| client RSS growth MiB | check |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for s in steps:
        client = "–" if s.client_growth is None else _mib(s.client_growth)
        check = s.note if s.ok else f"**{s.note}**"
        lines.append(
            f"| {s.step} | {s.tool} | {s.mib:.0f} | {s.seconds:.2f} | {s.rate:.1f} "
            f"| {_mib(s.server_growth)} | {client} | {check or 'ok'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size-mib", type=int, default=256, help="file size in MiB (default 256)")
    ap.add_argument(
        "--bound-mib",
        type=float,
        default=64.0,
        help="largest server RSS growth allowed on any step (default 64 MiB)",
    )
    ap.add_argument("--out", type=Path, help="append the Markdown table to this file")
    ap.add_argument(
        "--tmpdir",
        type=Path,
        default=None,
        help="where the source file and the server's archive go (default: system tmp)",
    )
    args = ap.parse_args(argv)
    if args.size_mib < 1:
        ap.error("--size-mib must be at least 1")

    base = Path(args.tmpdir or tempfile.gettempdir())
    need = 3 * args.size_mib * MIB + 256 * MIB
    free = shutil.disk_usage(base).free
    if free < need:
        print(
            f"not enough disk in {base}: {free / 2**30:.1f} GiB free, need about "
            f"{need / 2**30:.1f} GiB (3x the file size)",
            file=sys.stderr,
        )
        return 2

    curl = shutil.which("curl")
    if not curl:
        print(
            "curl is not installed: running the python (requests) steps only, "
            "without the curl reference",
            file=sys.stderr,
        )

    work = Path(tempfile.mkdtemp(prefix="hpcbridge-bench-", dir=base))
    proc: subprocess.Popen[bytes] | None = None
    pid: int | None = None
    sampler: RssSampler | None = None
    verdict_ok = False
    try:
        print(f"generating {args.size_mib} MiB in {work} ...", flush=True)
        src = work / "source.bin"
        t0 = time.perf_counter()
        src_md5 = make_file(src, args.size_mib)
        print(f"  done in {time.perf_counter() - t0:.1f} s, md5 {src_md5}", flush=True)

        proc, info, command = start_server(work)
        pid = int(info["pid"])
        server = psutil.Process(pid)
        sampler = RssSampler({"server": server, "client": psutil.Process(os.getpid())}).start()
        start_rss = sampler.rss("server")
        print(
            f"sandbox ({' '.join(command)}) pid {pid} at {info['url']}, RSS {_mib(start_rss)} MiB",
            flush=True,
        )

        bench = Bench(
            str(info["url"]),
            str(info["user"]),
            str(info["password"]),
            work,
            src,
            args.size_mib,
            src_md5,
            sampler,
            curl,
        )
        bench.login()
        bench.create_objects()
        bench.run()
        end_rss = sampler.rss("server")
        sampler.stop()

        failed = [s for s in bench.steps if not s.ok]
        over = [s for s in bench.steps if s.server_growth > args.bound_mib * MIB]
        worst = max(bench.steps, key=lambda s: s.server_growth)
        client_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        verdict_ok = not failed and not over
        verdict = (
            f"**Verdict: {'PASS' if verdict_ok else 'FAIL'}** — file {args.size_mib} MiB; "
            f"largest server RSS growth {_mib(worst.server_growth)} MiB "
            f"({worst.step}, {worst.tool}) against a bound of {args.bound_mib:g} MiB; "
            f"server RSS {_mib(start_rss)} MiB at start, {_mib(end_rss)} MiB at end; "
            f"benchmark process peak RSS {_mib(client_peak)} MiB"
            + (f"; {len(over)} step(s) over the bound" if over else "")
            + (f"; {len(failed)} transfer(s) failed or wrong" if failed else "")
            + ("" if curl else "; curl not found, python steps only")
            + "."
        )
        stamp = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
        report = (
            f"### {args.size_mib} MiB file ({stamp})\n\n"
            f"Machine: {machine_line(curl)}\n\n{table(bench.steps)}\n\n{verdict}\n"
        )
        print()
        print(report)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "a") as fh:
                fh.write(report + "\n")
        return 0 if verdict_ok else 1
    except (BenchFailure, requests.RequestException) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if sampler is not None:
            sampler.stop()
        stop_server(proc, pid)
        log_path = work / "server.log"
        if not verdict_ok and log_path.exists():
            print(
                "--- end of the sandbox's log ---\n" + log_path.read_text(errors="replace")[-2000:],
                file=sys.stderr,
            )
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
