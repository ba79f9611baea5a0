"""Errors carry facts and a symbolic next step; only the command line names its commands.

The library says *what* to do next (:class:`hpcbridge.errors.Step` and the facts it needs), and
:mod:`hpcbridge.cli.hints` words it, so that no library module has to know the command line's
spelling. These tests hold both halves: no string of the library names a command, and each step
reads, in the error line, exactly as users (and docs/troubleshooting.md) know it.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from hpcbridge.cli import hints, main
from hpcbridge.cli.app import BridgeGroup
from hpcbridge.errors import (
    ConfigError,
    CredentialError,
    HpcBridgeError,
    LedgerError,
    RecipeError,
    SchedulerError,
    Step,
    TransportError,
    XnatNotFoundError,
)
from hpcbridge.transport import Result

PACKAGE = Path(__file__).resolve().parents[2] / "hpcbridge"

#: Strings of the library that may name a command. The workflow entry hpcbridge writes into XNAT
#: names the run by its number ("scan 4, hpcbridge run 12"): a record, not advice. The others are
#: in recipes.py and config.py, which were being split while the rest moved; each goes when its
#: module is converted.
ALLOWED = {
    ", hpcbridge run ",
}


def _docstrings(tree: ast.Module) -> set[int]:
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, kinds) and node.body and isinstance(node.body[0], ast.Expr):
            found.add(id(node.body[0].value))
    return found


def _library_strings() -> list[tuple[str, int, str]]:
    """(module, line, text) of every string constant of the library but docstrings."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).parts[0] in ("cli", "sandbox"):
            continue
        tree = ast.parse(path.read_text())
        docstrings = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if id(node) not in docstrings:
                    out.append((str(path.relative_to(PACKAGE)), node.lineno, node.value))
    return out


def _names_a_command(text: str) -> bool:
    """``hpcbridge sync 5``, or a subcommand in backticks (`` `retry` ``, `` `ls P` ``)."""
    names = "|".join(re.escape(n) for n in sorted(main.commands, key=len, reverse=True))
    return re.search(rf"hpcbridge ({names})\b|`({names})[` ]", text) is not None


def test_no_library_module_names_a_command() -> None:
    found = [
        f"hpcbridge/{module}:{line}: {text!r}"
        for module, line, text in _library_strings()
        if _names_a_command(text) and text not in ALLOWED
    ]
    assert found == []


def test_the_scan_sees_what_it_looks_for() -> None:
    texts = {text for _module, _line, text in _library_strings()}
    assert ALLOWED <= texts  # an entry converted since is to be dropped from ALLOWED
    assert all(_names_a_command(text) for text in ALLOWED)
    assert "not found: " in texts  # f-strings' pieces are scanned too
    assert _names_a_command("then `sync` goes on") and _names_a_command("see `retry 5`")
    assert not _names_a_command("`scheduler` in the profile")


def test_every_step_has_words() -> None:
    assert set(hints.WORDS) == set(Step)


LINES = [
    (
        CredentialError("no credentials for https://x.org", step=Step.LOGIN, url="https://x.org"),
        "no credentials for https://x.org (run `hpcbridge login`)",
    ),
    (
        CredentialError(
            "no credentials for https://x.org", step=Step.LOGIN_AT, url="https://x.org"
        ),
        "no credentials for https://x.org (run `hpcbridge login --xnat https://x.org`, set "
        "HPCBRIDGE_USER and HPCBRIDGE_PASSWORD, or add the host to ~/.netrc)",
    ),
    (
        CredentialError("cannot issue a token", step=Step.LOGIN_FOR_CHAINS),
        "cannot issue a token (run `hpcbridge login` (it stores a token the chains can use))",
    ),
    (
        CredentialError("a stage-out after it expires fails", step=Step.LOGIN_THEN_RETRY),
        "a stage-out after it expires fails (`hpcbridge login` again, then `hpcbridge retry`)",
    ),
    (
        ConfigError("no XNAT server configured", step=Step.CHOOSE_SERVER),
        "no XNAT server configured (run `hpcbridge login --xnat URL`, use `--profile sandbox` "
        "after `hpcbridge sandbox start`, or set HPCBRIDGE_XNAT)",
    ),
    (
        HpcBridgeError("not allowed: P", step=Step.WHOAMI),
        "not allowed: P (`hpcbridge whoami` shows who you are logged in as; ask the project's "
        "owner for access)",
    ),
    (
        HpcBridgeError("cannot reach XNAT at https://x.org: refused", step=Step.CHECK_URL),
        "cannot reach XNAT at https://x.org: refused (check the URL with `hpcbridge config "
        "show`, and that this machine can reach the server)",
    ),
    (LedgerError.no_run(42), "no run 42 (`hpcbridge runs` lists the runs)"),
    (
        ConfigError("run 3: fails", hint="install it there", step=Step.SYNC_AFTER, run_id=3),
        "run 3: fails (install it there; then `hpcbridge sync 3` goes on)",
    ),
    (
        HpcBridgeError("no scan below P matches x*", step=Step.LS, address="P"),
        "no scan below P matches x* (`hpcbridge ls P` shows what is there)",
    ),
    (
        XnatNotFoundError("not found: P/S/E/9", step=Step.LS_ABOVE, address="P/S/E"),
        "not found: P/S/E/9 (`hpcbridge ls P/S/E` lists what is there)",
    ),
    (
        XnatNotFoundError("not found: Q (no project 'Q')", step=Step.LS_TOP, address="Q"),
        "not found: Q (no project 'Q') (`hpcbridge ls` lists what is there)",
    ),
    (
        SchedulerError("job.sh does not start with #!", step=Step.RENDER),
        "job.sh does not start with #! (render job scripts with `hpcbridge render`)",
    ),
    (
        SchedulerError("work folder /w belongs to job 7", step=Step.WAIT_FOR_JOB, native_id="7"),
        "work folder /w belongs to job 7 (wait for it (`hpcbridge jobs 7`), cancel it, or render "
        "into another folder)",
    ),
    (
        SchedulerError("unknown job id(s): 9", step=Step.LIST_JOBS),
        "unknown job id(s): 9 (`hpcbridge jobs` lists the jobs this profile submitted)",
    ),
    (
        SchedulerError("jobs still running after 5 s: 7", step=Step.CHECK_JOBS_LATER),
        "jobs still running after 5 s: 7 (they keep running; check later with `hpcbridge jobs`)",
    ),
    (
        ConfigError("the XNAT URL https://***@x contains credentials", step=Step.LOGIN_ASKS),
        "the XNAT URL https://***@x contains credentials (give the user name with --user or the "
        "profile's `user`, and the password to `hpcbridge login`, which asks for it)",
    ),
    (
        ConfigError("no profile named 'lab' in /c.toml", step=Step.CONFIG_INIT),
        "no profile named 'lab' in /c.toml (run `hpcbridge config init`)",
    ),
    (
        RecipeError("no recipe named 'x'", hint="known: dcm2niix", step=Step.LIST_RECIPES),
        "no recipe named 'x' (known: dcm2niix; see `hpcbridge recipes list`)",
    ),
    (
        HpcBridgeError("skipped 2 broken recipes (a, b)", step=Step.RECIPES_WHY),
        "skipped 2 broken recipes (a, b) (`hpcbridge recipes list` shows why)",
    ),
    (
        TransportError("lost the connection", step=Step.CHECK_JOBS_FIRST),
        "lost the connection (check with `hpcbridge jobs` before submitting again)",
    ),
]


@pytest.mark.parametrize(("error", "line"), LINES, ids=[e.step.name for e, _ in LINES])
def test_the_cli_words_each_step(error: HpcBridgeError, line: str) -> None:
    assert hints.line(error) == line
    assert "hpcbridge " not in str(error)  # the library's own text names no command


def test_every_step_is_worded_by_a_test() -> None:
    assert {error.step for error, _ in LINES} == set(Step)


def test_an_error_without_a_step_keeps_its_own_hint() -> None:
    assert hints.hint(HpcBridgeError("m")) is None
    assert hints.line(HpcBridgeError("m", hint="h")) == "m (h)"


def test_the_error_line_of_the_command_line_words_the_step() -> None:
    @click.group(cls=BridgeGroup)
    @click.option("-v", "--verbose", count=True)
    def group(verbose: int) -> None:
        pass

    @group.command()
    def show() -> None:
        raise LedgerError.no_run(5)

    done = CliRunner().invoke(group, ["show"])
    assert done.exit_code == 1
    assert done.stderr == "hpcbridge: error: no run 5 (`hpcbridge runs` lists the runs)\n"


def test_a_reworded_error_keeps_its_class_step_and_facts() -> None:
    error = CredentialError("no credentials for u", step=Step.LOGIN_AT, url="u")
    again = dataclasses.replace(error, message=f"no chains submitted: {error.message}")
    assert type(again) is CredentialError
    assert (again.step, again.url) == (Step.LOGIN_AT, "u")
    assert hints.line(again).startswith("no chains submitted: no credentials for u (run ")


def test_a_failed_command_travels_with_its_error() -> None:
    result = Result(("qstat", "-x", "7"), 2, "", "qstat: cannot connect to server\n")
    failed = SchedulerError.failed(result)
    assert failed.message == "qstat failed: qstat: cannot connect to server"
    assert failed.result is result
    looked = SchedulerError.failed(result, "could not look up jobs named j")
    assert looked.message == "qstat could not look up jobs named j: qstat: cannot connect to server"
    with pytest.raises(TransportError) as caught:
        result.check("polling")
    assert caught.value.result is result
