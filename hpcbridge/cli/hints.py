"""The next steps of library errors in the command line's words: the library names a step
(:class:`~hpcbridge.errors.Step`) and the facts it needs; only here is it a command to run."""

from __future__ import annotations

from ..errors import HpcBridgeError, Step

#: Each step's words, which replace the error's hint (``{e.hint}`` keeps it); ``{e}`` is the
#: error, whose facts fill them in.
WORDS = {
    Step.LOGIN: "run `hpcbridge login`",
    Step.LOGIN_AT: "run `hpcbridge login --xnat {e.url}`, set HPCBRIDGE_USER and "
    "HPCBRIDGE_PASSWORD, or add the host to ~/.netrc",
    Step.LOGIN_FOR_CHAINS: "run `hpcbridge login` (it stores a token the chains can use)",
    Step.LOGIN_THEN_RETRY: "`hpcbridge login` again, then `hpcbridge retry`",
    Step.CHOOSE_SERVER: "run `hpcbridge login --xnat URL`, use `--profile sandbox` after "
    "`hpcbridge sandbox start`, or set HPCBRIDGE_XNAT",
    Step.WHOAMI: "`hpcbridge whoami` shows who you are logged in as; ask the project's owner "
    "for access",
    Step.CHECK_URL: "check the URL with `hpcbridge config show`, and that this machine can reach "
    "the server",
    Step.LIST_RUNS: "`hpcbridge runs` lists the runs",
    Step.SYNC_AFTER: "{e.hint}; then `hpcbridge sync {e.run_id}` goes on",
    Step.LS: "`hpcbridge ls {e.address}` shows what is there",
    Step.LS_ABOVE: "`hpcbridge ls {e.address}` lists what is there",
    Step.LS_TOP: "`hpcbridge ls` lists what is there",
    Step.RENDER: "render job scripts with `hpcbridge render`",
    Step.WAIT_FOR_JOB: "wait for it (`hpcbridge jobs {e.native_id}`), cancel it, or render into "
    "another folder",
    Step.LIST_JOBS: "`hpcbridge jobs` lists the jobs this profile submitted",
    Step.CHECK_JOBS_LATER: "they keep running; check later with `hpcbridge jobs`",
    Step.LOGIN_ASKS: "give the user name with --user or the profile's `user`, and the password to "
    "`hpcbridge login`, which asks for it",
    Step.CONFIG_INIT: "run `hpcbridge config init`",
    Step.LIST_RECIPES: "{e.hint}; see `hpcbridge recipes list`",
    Step.RECIPES_WHY: "`hpcbridge recipes list` shows why",
    Step.CHECK_JOBS_FIRST: "check with `hpcbridge jobs` before submitting again",
}


def hint(error: HpcBridgeError) -> str | None:
    """What to do next: the error's step in words, else its hint."""
    return error.hint if error.step is None else WORDS[error.step].format(e=error)


def line(error: HpcBridgeError) -> str:
    """The error on one line: its message, then what to do in brackets."""
    said = hint(error)
    return f"{error.message} ({said})" if said else error.message
