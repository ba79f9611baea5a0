"""Numeric options refuse what no wait, interval or limit can mean: nan, inf, huge, negative."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from hpcbridge.cli import main

# (argv before the value, a value that must pass) for every float option of the CLI.
OPTIONS = [
    (["jobs", "--wait", "--interval"], "2"),
    (["jobs", "--wait", "--timeout"], "2"),
    (["run", "dcm2niix", "P", "--wait", "--interval"], None),
    (["sync", "--watch", "--interval"], None),
    (["demo", "--interval"], None),
    (["stage-in", "P/S/E/1", "--max-ratio"], None),
    (["sandbox", "serve", "--latency"], None),
    (["sandbox", "serve", "--session-timeout"], None),
]
HOSTILE = ["nan", "NaN", "inf", "-inf", "1e300", "-1", "abc", ""]


@pytest.mark.parametrize("argv", [o[0] for o in OPTIONS], ids=lambda a: " ".join(a))
@pytest.mark.parametrize("value", HOSTILE)
def test_a_hostile_number_is_a_usage_error_naming_the_option(
    argv: list[str], value: str, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("HPCBRIDGE_HOME", str(tmp_path))
    result = CliRunner().invoke(main, [*argv, value])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert f"Invalid value for '{argv[-1]}'" in result.output
    assert "Traceback" not in result.output


def test_an_ordinary_number_still_works(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HPCBRIDGE_HOME", str(tmp_path))
    result = CliRunner().invoke(main, ["jobs", "--wait", "--interval", "0.5", "--timeout", "1"])
    assert result.exit_code == 0, result.output
    assert "no jobs" in result.output
