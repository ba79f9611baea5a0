"""Which errors a run waits out and which fail a scan (docs/runs.md's table), and the backoff."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from hpcbridge.config import Settings
from hpcbridge.errors import (
    ConfigError,
    HostKeyError,
    SchedulerError,
    SshConnectionError,
    StageError,
    TransportError,
    XnatAuthError,
    XnatConflictError,
    XnatConnectionError,
    XnatError,
    XnatNotFoundError,
    XnatPermissionError,
    XnatServerError,
)
from hpcbridge.runs import Trouble, backoff, trouble_of
from hpcbridge.xnat.client import raise_for_response, retry_after

HOST = "alice@login.example.org"


@pytest.mark.parametrize(
    ("error", "trouble"),
    [
        (XnatConnectionError("cannot reach XNAT"), Trouble("XNAT", True)),
        (XnatAuthError("the token expired", status=401), Trouble("XNAT", True)),
        (XnatServerError("busy", status=429, retry_after=60), Trouble("XNAT", True, 60)),
        (XnatServerError("timeout", status=408), Trouble("XNAT", True)),
        (XnatServerError("maintenance", status=503), Trouble("XNAT", True)),
        (XnatServerError("a bug", status=500), Trouble("XNAT", False)),
        (SshConnectionError("cannot reach the host"), Trouble(HOST, True)),
        (HostKeyError("the key changed"), Trouble(HOST, True)),
        (TransportError("`sbatch` did not finish within 60 s"), Trouble(HOST, True)),
        (
            SchedulerError("sbatch refused the job: Unable to contact slurm controller"),
            Trouble("the scheduler", True),
        ),
        (
            SchedulerError("qsub refused the job: cannot connect to server"),
            Trouble("the scheduler", True),
        ),
    ],
)
def test_passing_trouble_is_waited_out(error: Exception, trouble: Trouble) -> None:
    assert trouble_of(error, HOST) == trouble  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "error",
    [
        XnatPermissionError("not allowed", status=403),
        XnatNotFoundError("not found", status=404),
        XnatConflictError("conflict", status=409),
        XnatServerError("XNAT answered 400", status=400),
        XnatServerError("refusing to send GET http://evil.example/: it is not on XNAT"),
        XnatError("redirected to another origin", status=302),
        StageError("the job wrote no output matching *.nii.gz"),
        SchedulerError("sbatch refused the job: invalid partition specified: gpu"),
        ConfigError("no work_root"),
    ],
)
def test_causes_that_retrying_will_not_cure_are_not_waited_out(error: Exception) -> None:
    assert trouble_of(error, HOST) is None  # type: ignore[arg-type]


def test_the_backoff_doubles_up_to_its_cap_and_honours_retry_after(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, config_path=tmp_path / "c.toml", profile="default")
    assert [backoff(settings, n) for n in range(1, 9)] == [30, 60, 120, 240, 480, 960, 1800, 1800]
    assert backoff(settings, 1, retry_after=600) == 600
    assert backoff(settings, 7, retry_after=600) == 1800  # never shorter than our own
    assert backoff(settings, 1, retry_after=10**9) == 24 * 3600  # nor absurdly long


def _answer(status: int, headers: dict[str, str]) -> requests.Response:
    resp = requests.Response()
    resp.status_code = status
    resp.headers.update(headers)
    resp.url = "https://xnat.example.org/data/projects"
    resp._content = b""
    return resp


def test_a_503_or_429_carries_its_retry_after() -> None:
    for status in (429, 503):
        with pytest.raises(XnatServerError) as err:
            raise_for_response(_answer(status, {"Retry-After": "120"}), "the projects")
        assert err.value.status == status and err.value.retry_after == 120
    dated = _answer(503, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})
    assert retry_after(dated) == 0  # a date in the past: at once
    assert retry_after(_answer(503, {"Retry-After": "soon"})) is None
    assert retry_after(_answer(503, {})) is None
