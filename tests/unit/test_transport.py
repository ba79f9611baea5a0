"""LocalTransport: argv commands with timeouts, and atomic file moves."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hpcbridge.errors import TransportError
from hpcbridge.transport import LocalTransport, Result, remote_path


@pytest.fixture()
def local() -> LocalTransport:
    return LocalTransport()


def test_run_returns_exit_code_and_output(local: LocalTransport) -> None:
    ok = local.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (ok.exit_code, ok.stdout, ok.stderr) == (3, "out\n", "err\n")
    assert local.run(["cat"], stdin="fed").stdout == "fed"


def test_argv_is_never_a_shell_string(local: LocalTransport, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    result = local.run(["echo", f"a b'c$(touch {marker})`touch {marker}`"])
    assert result.stdout == f"a b'c$(touch {marker})`touch {marker}`\n"
    assert not marker.exists()


def test_check_names_the_command_and_the_end_of_stderr() -> None:
    failed = Result(("qsub", "job.sh"), 1, "", "qsub: line 1\nqsub: Invalid resource request\n")
    with pytest.raises(TransportError) as err:
        failed.check("submitting job.sh")
    assert err.value.message == (
        "submitting job.sh: `qsub job.sh` exited 1: qsub: line 1 qsub: Invalid resource request"
    )
    assert Result(("true",), 0, "", "").check("x").ok


def test_timeout_and_missing_command_are_clear(local: LocalTransport) -> None:
    with pytest.raises(TransportError, match=r"^`sleep 5` did not finish within 0.2 s$"):
        local.run(["sleep", "5"], timeout=0.2)
    with pytest.raises(TransportError, match="^no-such-qsub: command not found on this machine$"):
        local.run(["no-such-qsub", "-V"])


def test_writes_are_atomic_with_the_mode_asked(local: LocalTransport, tmp_path: Path) -> None:
    target = tmp_path / "jobs" / "run.sh"
    local.write_text(str(target), "#!/bin/bash\n", mode=0o755)
    assert target.read_text() == "#!/bin/bash\n"
    assert oct(target.stat().st_mode & 0o777) == "0o755"
    assert [p.name for p in target.parent.iterdir()] == ["run.sh"]  # no .part left
    assert local.read_text(str(target)) == "#!/bin/bash\n"
    assert local.read_text(str(tmp_path / "missing")) is None


def test_put_get_and_makedirs(local: LocalTransport, tmp_path: Path) -> None:
    src = tmp_path / "a.txt"
    src.write_text("data")
    local.makedirs(str(tmp_path / "x" / "y"))
    local.put(src, str(tmp_path / "x" / "y" / "b.txt"), mode=0o600)
    assert oct(os.stat(tmp_path / "x" / "y" / "b.txt").st_mode & 0o777) == "0o600"
    local.get(str(tmp_path / "x" / "y" / "b.txt"), tmp_path / "c.txt")
    assert (tmp_path / "c.txt").read_text() == "data"


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("relative/job.sh", "'relative/job.sh' is not an absolute path"),
        ("/scratch/../etc/passwd", "'/scratch/../etc/passwd' must not contain '..'"),
    ],
)
def test_remote_paths_are_absolute(path: str, message: str) -> None:
    with pytest.raises(TransportError) as err:
        remote_path(path)
    assert err.value.message == message


def test_files_in_lists_regular_files_only_and_remove_forgets_missing_ones(
    local: LocalTransport, tmp_path: Path
) -> None:
    (tmp_path / "b.json").write_text("{}")
    (tmp_path / "a.nii.gz").write_bytes(b"\x1f\x8b")
    (tmp_path / "sub").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "a.nii.gz")
    assert local.files_in(str(tmp_path)) == ["a.nii.gz", "b.json"]
    assert local.files_in(str(tmp_path / "missing")) == []
    local.remove(str(tmp_path / "b.json"))
    local.remove(str(tmp_path / "b.json"))  # already gone: nothing to do
    assert local.files_in(str(tmp_path)) == ["a.nii.gz"]
