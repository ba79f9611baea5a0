"""The documentation site builds, and its links, paths, snippets and tables match the code.

- ``mkdocs build --strict`` fails on a page missing from the nav, a link to a missing page or
  a missing heading anchor (mkdocs's own slugs, as the site has them);
- our own checker follows every relative link of docs/*.md and README.md (which mkdocs does not
  build) to an existing file, and every ``#anchor`` to a heading with GitHub's slug, so links work
  both on the site and on GitHub; docs pages link only within docs/ (the site has nothing else);
- a path of the repository written as code (`tests/cluster/README.md`) must exist;
- config snippets load as hpcbridge config files; the key and command tables are complete;
- the messages quoted in docs/troubleshooting.md are messages the code can print.

External (http, https) links are never fetched: the suite has no network. They are few.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

from hpcbridge.cli import main
from hpcbridge.config import DEFAULTS, read_config_file

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
CHECKED = [*PAGES, ROOT / "README.md"]

_FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
_LINK = re.compile(r"(?<!!)\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_REPO_PATH = re.compile(r"^(?:docs|tests|examples|hpcbridge|templates|\.ci)/[\w./-]*$")


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the lines outside fenced code blocks."""
    out, fence = [], None
    for n, line in enumerate(path.read_text().splitlines(), 1):
        m = _FENCE.match(line)
        if m and (fence is None or m.group(1).startswith(fence)):
            fence = None if fence else m.group(1)
            continue
        if fence is None:
            out.append((n, line))
    return out


def without_code(line: str) -> str:
    return _CODE_SPAN.sub("", line)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading (github-slugger): lower case, punctuation dropped,
    each space a hyphen."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links keep their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = re.sub(r"(\*\*|__|\*)", "", text)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    for _, line in prose_lines(path):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = github_slug(m.group(1))
            n, candidate = 0, slug
            while candidate in found:
                n += 1
                candidate = f"{slug}-{n}"
            found.add(candidate)
    return found


def links(path: Path) -> list[tuple[int, str]]:
    out = []
    for n, line in prose_lines(path):
        text = without_code(line)
        out += [(n, m.group(1)) for m in _LINK.finditer(text)]
        ref = _REF_DEF.match(text)
        if ref:
            out.append((n, ref.group(1)))
    return out


# --- the site ----------------------------------------------------------------------------------


def test_site_builds_strictly(tmp_path: Path) -> None:
    if importlib.util.find_spec("mkdocs") is None:
        message = "mkdocs is not installed (pip install -e '.[test]')"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + ", but CI=true requires it")
        pytest.skip(message)
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for page in PAGES:
        built = site / ("index.html" if page.stem == "index" else f"{page.stem}/index.html")
        assert built.is_file(), f"{page.name} was not built into the site"


def test_every_page_is_in_the_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    missing = [p.name for p in PAGES if not re.search(rf":\s*{re.escape(p.name)}\s*$", nav, re.M)]
    assert missing == []


# --- links ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CHECKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(path: Path) -> None:
    problems = []
    for n, target in links(path):
        where = f"{path.relative_to(ROOT)}:{n}: {target}"
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            if not target.startswith(("https://", "mailto:")):
                problems.append(f"{where}: only https links to the outside")
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{where}: no such file")
            continue
        if path.parent == DOCS and DOCS not in (dest, *dest.parents):
            problems.append(f"{where}: the site has only docs/; name the file as `code` instead")
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: no heading with that anchor")
    assert problems == []


def test_external_links_are_few() -> None:
    outside = {t for p in CHECKED for _, t in links(p) if t.startswith(("http://", "https://"))}
    assert len(outside) <= 10, sorted(outside)


@pytest.mark.parametrize("path", CHECKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_repository_paths_named_in_the_docs_exist(path: Path) -> None:
    missing = []
    for n, line in prose_lines(path):
        for m in _CODE_SPAN.finditer(line):
            text = m.group(2).strip()
            if _REPO_PATH.match(text) and not (ROOT / text).exists():
                missing.append(f"{path.relative_to(ROOT)}:{n}: {text}")
    assert missing == []


def test_anchor_slugs_match_github() -> None:
    assert github_slug("Job chains: transfers on the cluster") == (
        "job-chains-transfers-on-the-cluster"
    )
    assert github_slug("NFS home directories and `ledger_mode`") == (
        "nfs-home-directories-and-ledger_mode"
    )
    assert github_slug("Where recipes are found, and overriding built-ins") == (
        "where-recipes-are-found-and-overriding-built-ins"
    )


# --- snippets and tables match the code ------------------------------------------------------


def _fenced(path: Path, lang: str) -> list[str]:
    return re.findall(rf"^\s*```{lang}\n(.*?)^\s*```", path.read_text(), re.S | re.M)


def test_config_snippets_are_valid_config_files(tmp_path: Path) -> None:
    checked = 0
    for page in CHECKED:
        for i, snippet in enumerate(_fenced(page, "toml")):
            if "[profiles." not in snippet:
                continue
            file = tmp_path / f"{page.stem}-{i}.toml"
            file.write_text(snippet)
            read_config_file(file)  # raises ConfigError on unknown keys or bad TOML
            checked += 1
    assert checked >= 3


def test_configuration_page_lists_every_key() -> None:
    text = (DOCS / "configuration.md").read_text()
    missing = [k for k in DEFAULTS if f"| `{k}` |" not in text]
    assert missing == []


def _commands() -> list[str]:
    names = []

    def walk(group: click.Group, prefix: str) -> None:
        for name, cmd in sorted(group.commands.items()):
            names.append(f"{prefix}{name}")
            if isinstance(cmd, click.Group):
                walk(cmd, f"{prefix}{name} ")

    walk(main, "")
    return names


def test_command_reference_lists_every_command() -> None:
    text = (DOCS / "commands.md").read_text()
    missing = [c for c in _commands() if f"hpcbridge {c}" not in text]
    assert missing == []


def _source_text() -> str:
    """Every string of the package as one text: adjacent literals joined as Python joins them."""
    text = "\n".join(p.read_text() for p in sorted((ROOT / "hpcbridge").rglob("*.py")))
    return re.sub(r"\"\s*\n\s*f?\"", "", text)


def _quoted_messages() -> list[tuple[int, str]]:
    """The messages in the first column of docs/troubleshooting.md's tables."""
    out = []
    for n, line in prose_lines(DOCS / "troubleshooting.md"):
        cell = line.split("|")[1].strip() if line.startswith("|") else ""
        m = _CODE_SPAN.fullmatch(cell)
        if m and not cell.startswith("`exit code"):
            out.append((n, m.group(2).strip()))
    return out


def test_troubleshooting_quotes_real_messages() -> None:
    """Each literal piece (between the … of names and numbers, and before a hint's bracket) of a
    quoted message must occur in the code, so the page cannot drift from what users see."""
    source = _source_text()
    quoted = _quoted_messages()
    assert len(quoted) >= 50
    problems = []
    for n, message in quoted:
        for piece in re.split(r"…| \(", message):
            piece = piece.strip().strip("()").strip()
            if len(piece) >= 12 and piece not in source:
                problems.append(f"docs/troubleshooting.md:{n}: {piece!r}")
    assert problems == []
