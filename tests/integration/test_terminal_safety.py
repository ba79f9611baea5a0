"""Terminal control sequences in what XNAT or a job says never reach the terminal raw.

A sandbox holds labels, scan types, descriptions, resource labels and file names with escape
sequences in them (set over its REST API, or straight in its store where the API refuses such a
label, as a careless or hostile server would not). Real commands list them, stage them, fail on
them and log them; their output must show each control escaped and visible (``\\x1b[2J``), and
``--json`` must still carry the original value.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
import requests_mock
from click.testing import CliRunner, Result

from hpcbridge.cli import main
from hpcbridge.sandbox import SandboxServer

# (raw, as shown) for each trick: clear the screen, retitle the window (OSC ended by BEL), hide
# what follows, return to the line start and overwrite it, back up over it, the 8-bit CSI, and
# the right-to-left override that shows text reversed.
TRICKS = [
    ("\x1b[2J", "\\x1b[2J"),
    ("\x1b]0;pwned\x07", "\\x1b]0;pwned\\x07"),
    ("\x1b[8m", "\\x1b[8m"),
    ("\r", "\\r"),
    ("\x08", "\\x08"),
    ("\x9b", "\\x9b"),
    ("\u202e", "\\u202e"),
]
# Anything a terminal acts on, but a newline: C0 but \n, DEL, C1, bidi controls.
RAW = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
SESSION = "PTV000/Haofei01/Haofei01_MR1"


def hostile(name: str) -> str:
    """``name`` with every trick in it, and a letter that must come out unchanged."""
    return f"{name}-" + "|".join(raw for raw, _ in TRICKS) + "-é"


def shown(name: str) -> str:
    return f"{name}-" + "|".join(seen for _, seen in TRICKS) + "-é"


def assert_safe(*texts: str) -> None:
    for text in texts:
        found = RAW.search(text)
        assert found is None, f"raw {found.group()!r} in {text!r}"


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def xnat(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxServer]:
    """A seeded sandbox whose metadata carries control sequences everywhere it can."""
    with SandboxServer(tmp_path_factory.mktemp("hostile"), seed="demo") as server:
        with requests.Session() as http:
            http.auth = (server.user, server.password)
            project = f"{server.url}/data/projects"
            put = http.put(
                f"{project}/EVIL", params={"name": hostile("N"), "description": hostile("D")}
            )
            assert put.status_code == 200, put.text
            session = f"{project}/PTV000/subjects/Haofei01/experiments/Haofei01_MR1"
            fields = {"xsiType": "xnat:mrScanData", "type": hostile("T1")}
            fields["xnat:mrScanData/series_description"] = hostile("SD")
            assert http.put(f"{session}/scans/4", params=fields).status_code == 200
            resource = f"{session}/scans/4/resources/{quote(hostile('R'), safe='')}"
            put = http.put(resource, params={"format": hostile("F")})
            assert put.status_code == 200, put.text
            put = http.put(
                f"{resource}/files/{quote(hostile('f') + '.txt', safe='')}",
                params={"inbody": "true"},
                data=b"not DICOM",
            )
            assert put.status_code == 200, put.text
            dicom = f"{session}/scans/4/resources/DICOM/files"
            first = http.get(f"{dicom}/0001.dcm")
            put = http.put(
                f"{dicom}/{quote(hostile('i') + '.dcm', safe='')}",
                params={"inbody": "true"},
                data=first.content,
            )
            assert put.status_code == 200, put.text
        # XNAT's REST API refuses such subject and session labels; a server need not.
        store = server.store
        store.create_subject("PTV000", hostile("S"), server.user)
        subject = store.subject("Haofei01", "PTV000")
        assert subject is not None
        store.create_experiment(
            "PTV000", subject["id"], hostile("E"), "xnat:mrSessionData", server.user, "2024-02-03"
        )
        yield server


@pytest.fixture()
def env(xnat: SandboxServer, monkeypatch: pytest.MonkeyPatch) -> SandboxServer:
    monkeypatch.setenv("HPCBRIDGE_XNAT", xnat.url)
    monkeypatch.setenv("HPCBRIDGE_USER", xnat.user)
    monkeypatch.setenv("HPCBRIDGE_PASSWORD", xnat.password)
    return xnat


@pytest.mark.parametrize(
    ("args", "names", "rows"),
    [
        (["ls"], ["N", "D"], 3),
        (["ls", "PTV000"], ["S"], 5),
        (["ls", "PTV000/Haofei01"], ["E"], 3),
        (["ls", SESSION], ["T1", "SD"], 5),
        (["ls", "PTV000", "--scans"], ["T1", "SD"], None),
        (["ls", f"{SESSION}/4"], ["R", "F", "f"], None),
    ],
    ids=["projects", "subjects", "sessions", "scans", "project-scans", "resources-and-files"],
)
def test_ls_tables_show_controls_escaped(
    env: SandboxServer, args: list[str], names: list[str], rows: int | None
) -> None:
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert_safe(result.stdout, result.stderr)
    for name in names:
        assert shown(name) in result.stdout, result.stdout
    if rows is not None:  # a newline or return in a cell would have broken its row in two
        assert len(result.stdout.splitlines()) == rows, result.stdout


def test_a_table_stays_aligned_around_an_escaped_cell(env: SandboxServer) -> None:
    lines = run("ls", SESSION).stdout.splitlines()
    header, t1 = lines[0], next(line for line in lines if line.startswith("4 "))
    start = header.index("SERIES DESCRIPTION")
    assert t1[start:].startswith(shown("SD"))
    assert t1[header.index("TYPE") :].startswith(shown("T1"))


def test_json_output_keeps_the_original_values_and_no_raw_control(env: SandboxServer) -> None:
    result = run("--json", "ls", SESSION)
    assert result.exit_code == 0
    assert result.stdout.isascii()  # json's \uXXXX escapes: C1 and bidi included
    t1 = next(s for s in json.loads(result.stdout) if s["ID"] == "4")
    assert t1["type"] == hostile("T1") and t1["series_description"] == hostile("SD")
    files = json.loads(run("--json", "ls", f"{SESSION}/4").stdout)
    evil = next(r for r in files if r["label"] == hostile("R"))
    assert evil["format"] == hostile("F")
    assert [f["Name"] for f in evil["files"]] == [hostile("f") + ".txt"]


def test_dry_run_plan_and_script_show_the_scan_type_escaped(env: SandboxServer) -> None:
    result = run("run", "dcm2niix", SESSION, "--scan", "4", "--dry-run")
    assert result.exit_code == 0, result.output
    assert_safe(result.stdout, result.stderr)
    assert shown("T1") in result.stdout


# An HTML page's message is quoted as it is; a plain body has its whitespace (\r and \n too)
# folded into single spaces by the client, so only the other tricks are left in it.
FOLDED = shown("B").replace("\\r", " ")
ERROR_BODIES = [
    (
        "<html><body><h3>failed: " + hostile("B") + "\nsecond</h3></body></html>",
        "failed: " + shown("B") + "\\nsecond",
    ),
    ("plain failure: " + hostile("B"), "plain failure: " + FOLDED),
    ("multi\nline\r\nfailure " + hostile("B") + "\n", "multi line failure " + FOLDED),
]


@pytest.mark.parametrize(
    ("body", "quoted"), ERROR_BODIES, ids=["restlet-h3", "plain", "multi-line"]
)
@pytest.mark.parametrize("verbose", [[], ["-v"]], ids=["quiet", "verbose"])
def test_an_error_quoting_the_server_is_one_escaped_line(
    monkeypatch: pytest.MonkeyPatch, body: str, quoted: str, verbose: list[str]
) -> None:
    url = "https://xnat.example.org"
    monkeypatch.setenv("HPCBRIDGE_XNAT", url)
    monkeypatch.setenv("HPCBRIDGE_USER", "alice")
    monkeypatch.setenv("HPCBRIDGE_PASSWORD", "s3cret-value")
    with requests_mock.Mocker() as m:
        m.post(f"{url}/data/JSESSION", text="ABC", cookies={"JSESSIONID": "ABC"})
        m.delete(f"{url}/data/JSESSION", text="")
        m.get(f"{url}/data/projects", status_code=500, text=body)
        result = run(*verbose, "ls")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert_safe(result.stderr)
    last = result.stderr.splitlines()[-1]
    assert last == f"hpcbridge: error: XNAT answered 500 for the project list: {quoted}"
    if verbose:
        assert "Traceback" in result.stderr
        assert "XnatServerError: XNAT answered 500 for the project list: " in result.stderr
    else:
        assert len(result.stderr.splitlines()) == 1


def test_stage_in_lines_and_a_failed_scans_error_body_are_escaped(
    env: SandboxServer, tmp_path: Path
) -> None:
    failing = re.compile(r".*/scans/5/resources/DICOM/files.*")
    with requests_mock.Mocker(real_http=True) as m:
        m.get(
            failing,
            status_code=500,
            text=hostile("B"),
            additional_matcher=lambda request: "format=zip" in request.url,
        )
        result = run("stage-in", SESSION, "--scan", "4", "--scan", "5", "--dest", str(tmp_path))
    assert result.exit_code == 3, result.output
    assert_safe(result.stdout, result.stderr)
    assert re.fullmatch(r"scan 4: 13 files, .* -> \S+/4-T1_\w+/resources/DICOM\n", result.stdout)
    assert result.stderr == (
        f"scan 5: failed: XNAT answered 500 for files of {SESSION}/5: {FOLDED}\n"
        "hpcbridge: error: 1 of 2 scans failed\n"
    )
    staged = json.loads(
        run("--json", "stage-in", SESSION, "--scan", "4", "--dest", str(tmp_path)).stdout
    )
    assert staged[0]["type"] == hostile("T1") and staged[0]["status"] == "skipped"


def test_verbose_log_lines_show_file_names_escaped(env: SandboxServer, tmp_path: Path) -> None:
    """dcm2niix names outputs after the series description, which comes from the server."""
    out = tmp_path / "out"
    out.mkdir()
    (out / (hostile("out") + ".txt")).write_text("result\n")
    spec = tmp_path / "spec.json"
    outputs = [{"glob": "*.txt", "resource": "RESULT"}]
    spec.write_text(json.dumps({"outputs": outputs, "provenance": {"recipe": "t"}}))
    result = run("-vv", "stage-out", f"{SESSION}/5", "--spec", str(spec), str(out))
    assert result.exit_code == 0, result.output
    assert_safe(result.stdout, result.stderr)
    assert f"hpcbridge: info: renaming output {shown('out')}.txt to " in result.stderr


def test_job_log_tails_in_jobs_and_status_are_escaped(
    env: SandboxServer, tmp_path: Path, no_local_jobs_left: None
) -> None:
    """A failing job's log tail, in `jobs` and in a run's `status`, keeps its lines only."""
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    # printf turns \033 into ESC; \302\233 is U+009B in UTF-8, \342\200\256 U+202E.
    noise = r"\033[2J\033]0;pwned\007\033[8mhidden\r\010\302\233\342\200\256"
    (recipes / "noisy.toml").write_text(
        'name = "noisy"\n[inputs]\nresource = "DICOM"\n'
        '[[outputs]]\nglob = "*.txt"\nresource = "RESULT"\n'
        f"[run]\ncommand = '''\nprintf 'line one\\n\\tindented\\n{noise}\\n' >&2\nexit 3\n'''\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "hpcbridge", "run", "noisy", SESSION, "--scan", "4"]
        + ["--recipes", str(recipes), "--wait", "--interval", "0.2"],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
    )
    assert done.returncode == 3, done.stderr
    assert_safe(done.stdout, done.stderr)
    # The tail is read as lines, so the lone \r has already become a line break there.
    expected = "line one\n\tindented\n\\x1b[2J\\x1b]0;pwned\\x07\\x1b[8mhidden\n\\x08\\x9b\\u202e\n"

    status = run("status")
    assert status.exit_code == 0
    assert_safe(status.stdout, status.stderr.replace("\t", ""))
    assert expected in status.stderr, status.stderr

    jobs = run("jobs", "--all")
    assert jobs.exit_code == 0, jobs.output
    assert_safe(jobs.stdout, jobs.stderr.replace("\t", ""))
    assert "failed; last lines of its log:\n" in jobs.stderr
    assert expected in jobs.stderr, jobs.stderr

    raw = json.loads(run("--json", "status").stdout)["jobs"][0]["log_tail"]
    assert "\x1b[2J" in raw and "\u202e" in raw  # the record keeps what the job wrote


def _on_a_terminal(args: list[str], timeout: float = 60) -> str:
    """What ``hpcbridge ARGS`` writes to a real (pseudo-)terminal, where click strips nothing."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpcbridge", *args],
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
        env={**os.environ, "COLUMNS": "400", "TERM": "xterm"},
    )
    os.close(follower)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the command ended and closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(leader)
        proc.wait(timeout=10)
    return b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs a Linux pty")
def test_on_a_real_terminal_nothing_raw_gets_through(env: SandboxServer, tmp_path: Path) -> None:
    listing = _on_a_terminal(["ls", SESSION]).replace("\r\n", "\n")
    assert_safe(listing)
    assert shown("T1") in listing
    files = _on_a_terminal(["ls", f"{SESSION}/4"]).replace("\r\n", "\n")
    assert_safe(files)
    assert shown("f") in files
    # The progress bar redraws its line with \r: the one control of our own.
    staged = _on_a_terminal(["stage-in", f"{SESSION}/4", "--dest", str(tmp_path)])
    staged = re.sub(r"\rstage-in: ", "stage-in: ", staged.replace("\r\n", "\n"))
    assert_safe(staged)
    assert "scan 4: 13 files" in staged
