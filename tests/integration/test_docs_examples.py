"""Every command example in docs/ runs, so the documentation cannot rot.

Each ```bash block of docs/*.md is run by bash (``set -euo pipefail``) and must exit 0, or the
exit status its page states. A page's blocks run in document order and share one working
folder, so a later example may use what an earlier one made; every page starts afresh with:

- a fresh seeded sandbox XNAT (the ``sandbox`` fixture: project PTV000, subjects Haofei01..03);
- an empty ``HPCBRIDGE_HOME`` and an empty ``HOME`` (``~`` in an example is that folder);
- a default profile ``lab`` whose ``xnat`` is that sandbox (user ``admin``), and a 0600
  ``~/.netrc`` entry for it: the situation of a user whose profile points at their XNAT;
- the local scheduler (the default), with ``poll_interval`` 0.5 s so ``--wait`` returns quickly;
- the ``hpcbridge`` and ``dcm2niix`` installed beside this Python first on ``PATH``.

The conventions a page may use (docs/architecture.md, "Documentation", says the same):

- ``<!-- not-run: REASON -->`` on the line before a ```bash block: the block is not run; the
  reason (a real cluster, a real XNAT, a terminal...) is required;
- ``<!-- exit: N -->`` before a block: it must end with exit status N (an example of an error);
- ``<!-- file: PATH -->`` before any fenced block: its text is written to PATH (relative to the
  page's folder, ``~/`` under its HOME) when the page reaches it;
- ```console and ```text blocks are shown, never run; ```python blocks are run like bash ones.

Every process an example leaves behind (the background sandbox, local jobs) is stopped at the
end of its page, by its own id.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hpcbridge.sandbox import SandboxServer

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
BLOCK_TIMEOUT = 180  # seconds one block may take before the test fails (and kills it)
#: Fence languages that are shell commands: bash blocks run; console and text never do.
SHELL_LANGS = {"bash", "sh", "shell", "zsh", "console", "text", "shell-session"}
#: Pages allowed another shell fence than bash/console/text, and why.
OTHER_SHELL_OK = {
    # its ```sh blocks run the benchmarks, which take minutes and gigabytes by design
    "performance.md",
}
_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)[^\n]*$")
_DIRECTIVE = re.compile(r"^\s*<!--\s*(?P<key>not-run|exit|file)\s*:\s*(?P<value>.*?)\s*-->\s*$")


@dataclass
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    not_run: str | None = None  # the reason, when marked not-run
    exit: int = 0
    file: str | None = None

    @property
    def where(self) -> str:
        return (
            f"{self.page}:{self.line}"
            if self.page == "README.md"
            else f"docs/{self.page}:{self.line}"
        )

    @property
    def runs(self) -> bool:
        return self.lang in ("bash", "python") and self.not_run is None


def parse_blocks(page: Path) -> list[Block]:
    """The fenced blocks of a Markdown page, with the directives on the lines before each."""
    lines = page.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent = m.group("fence"), len(m.group("indent"))
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not (
            lines[j].strip().startswith(fence) and set(lines[j].strip()) == {fence[0]}
        ):
            line = lines[j]
            body.append(line[indent:] if line[:indent].strip() == "" else line.lstrip())
            j += 1
        block = Block(page.name, i + 1, m.group("lang").lower(), "\n".join(body) + "\n")
        k = i - 1
        while k >= 0 and (d := _DIRECTIVE.match(lines[k])):
            key, value = d.group("key"), d.group("value")
            if key == "not-run":
                block.not_run = value
            elif key == "exit":
                block.exit = int(value)
            else:
                block.file = value
            k -= 1
        blocks.append(block)
        i = j + 1
    return blocks


def readme_tour() -> list[Block]:
    """README.md's short tour, a ```console block (the README's ```bash blocks are CI's own
    commands): its ``$ `` lines, run like a page's bash block."""
    section = (ROOT / "README.md").read_text().split("\n## A short tour\n", 1)[1]
    console = re.search(r"```console\n(.*?)```", section, re.S)
    assert console, "README.md's short tour has no ```console block"
    commands, more = [], False
    for line in console.group(1).splitlines():
        if line.startswith("$ ") or more:
            commands.append(line[2:] if line.startswith("$ ") else line)
            more = line.rstrip().endswith("\\")
    return [Block("README.md", 0, "bash", "\n".join(commands) + "\n")]


PAGES = sorted(DOCS.glob("*.md"))
ALL_BLOCKS = [b for page in PAGES for b in parse_blocks(page)]
RUN_PAGES = [*sorted({b.page for b in ALL_BLOCKS if b.runs}), "README.md"]


# --- the conventions ---------------------------------------------------------------------------


def test_every_shell_block_is_run_or_says_why_not() -> None:
    problems = []
    for b in ALL_BLOCKS:
        if b.not_run is not None and (b.lang != "bash" or len(b.not_run) < 10):
            problems.append(f"{b.where}: not-run needs a ```bash block and a reason")
        if b.lang in SHELL_LANGS - {"bash", "console", "text"} and b.page not in OTHER_SHELL_OK:
            problems.append(f"{b.where}: ```{b.lang}: use ```bash (run) or ```console (shown)")
        if b.lang == "" and re.search(r"^\s*(\$ )?hpcbridge ", b.text, re.M):
            problems.append(f"{b.where}: a command in a block without a language: ```bash")
    assert problems == []


def test_directives_stand_right_before_a_block() -> None:
    """A directive that no block follows would silently do nothing."""
    problems = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        for n, line in enumerate(lines):
            if not _DIRECTIVE.match(line):
                continue
            following = next((x for x in lines[n + 1 :] if not _DIRECTIVE.match(x)), "")
            if not _FENCE.match(following):
                problems.append(f"docs/{page.name}:{n + 1}: {line.strip()} is not before a block")
    assert problems == []


def test_most_examples_run() -> None:
    """A guard against a runner that finds nothing: the docs have dozens of runnable blocks."""
    running = [b for b in ALL_BLOCKS if b.runs]
    assert len(running) >= 30, [b.where for b in running]


# --- running a page ----------------------------------------------------------------------------


@pytest.fixture()
def page_env(
    sandbox: SandboxServer,
    isolated_home: Path,
    tmp_path: Path,
    stop_local_jobs: Callable[[Path], None],
) -> Iterator[tuple[dict[str, str], Path]]:
    """The environment and working folder of one page's examples (see the module docstring)."""
    home = tmp_path / "home"
    work = tmp_path / "work"
    home.mkdir()
    work.mkdir()
    netrc = home / ".netrc"
    netrc.write_text(f"machine {sandbox.host} login {sandbox.user} password {sandbox.password}\n")
    netrc.chmod(0o600)
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "config.toml").write_text(
        f'default_profile = "lab"\n\n[profiles.lab]\nxnat = "{sandbox.url}"\n'
        f'user = "{sandbox.user}"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))}
    env.update(
        HOME=str(home),
        USER=env.get("USER", "alice"),
        HPCBRIDGE_HOME=str(isolated_home),
        HPCBRIDGE_POLL_INTERVAL="0.5",
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    )
    env.pop("NETRC", None)
    yield env, work
    _stop_sandbox(env, isolated_home)
    stop_local_jobs(isolated_home / "local-jobs")


def _stop_sandbox(env: dict[str, str], home: Path) -> None:
    """Stop the background sandbox a page's examples started."""
    if (home / "sandbox" / "ready.json").exists():
        subprocess.run(
            [sys.executable, "-m", "hpcbridge", "sandbox", "stop"],
            env=env,
            capture_output=True,
            timeout=60,
        )


def _write_file(block: Block, env: dict[str, str], work: Path) -> None:
    assert block.file is not None
    name = block.file
    path = Path(env["HOME"]) / name[2:] if name.startswith("~/") else work / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(block.text)


def _run(block: Block, env: dict[str, str], work: Path) -> subprocess.CompletedProcess[str]:
    if block.lang == "bash":
        argv = ["bash", "-c", "set -euo pipefail\n" + block.text]
    else:
        argv = [sys.executable, "-c", block.text]
    # Its own process group, so a block that hangs is killed with everything it started.
    proc = subprocess.Popen(
        argv,
        cwd=work,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=BLOCK_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"{block.where} did not finish within {BLOCK_TIMEOUT} s\n{block.text}{err}")
    finally:
        # A command the block put in the background (`serve &`) and left behind when it
        # failed half-way is still in the block's process group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@pytest.mark.parametrize("page", RUN_PAGES)
def test_page_examples_run(page: str, page_env: tuple[dict[str, str], Path]) -> None:
    env, work = page_env
    blocks = readme_tour() if page == "README.md" else parse_blocks(DOCS / page)
    for block in blocks:
        if block.file is not None:
            _write_file(block, env, work)
        if not block.runs:
            continue
        done = _run(block, env, work)
        assert done.returncode == block.exit, (
            f"{block.where} exited {done.returncode}, expected {block.exit}\n"
            f"--- block\n{block.text}--- stdout\n{done.stdout[-3000:]}\n"
            f"--- stderr\n{done.stderr[-3000:]}"
        )
