"""printable(): terminal control characters from servers are shown escaped, text is unchanged."""

from __future__ import annotations

import ast
import logging
import re
import sys
from pathlib import Path

import pytest

import hpcbridge.cli
from hpcbridge.cli.output import PrintableFormatter
from hpcbridge.text import printable

HOSTILE = {
    "clear screen": ("\x1b[2J\x1b[H", "\\x1b[2J\\x1b[H"),
    "window title (OSC)": ("\x1b]0;pwned\x07", "\\x1b]0;pwned\\x07"),
    "OSC 8 link, ST-terminated": ("\x1b]8;;http://x\x1b\\", "\\x1b]8;;http://x\\x1b\\"),
    "hidden text": ("T1\x1b[8msecret\x1b[0m", "T1\\x1b[8msecret\\x1b[0m"),
    "carriage return": ("ok\rFAILED", "ok\\rFAILED"),
    "backspace": ("T1\x08\x082", "T1\\x08\\x082"),
    "C1 CSI": ("\x9b2J", "\\x9b2J"),
    "C1 OSC": ("\x9d0;pwned\x9c", "\\x9d0;pwned\\x9c"),
    "DEL": ("a\x7fb", "a\\x7fb"),
    "NUL and BEL": ("a\x00b\x07", "a\\x00b\\x07"),
    "RTL override": ("scan\u202egpj.exe", "scan\\u202egpj.exe"),
    "bidi isolates": ("\u2066a\u2067b\u2068c\u2069", "\\u2066a\\u2067b\\u2068c\\u2069"),
    "bidi marks and embeddings": (
        "\u200f\u202a\u202b\u202c\u202d",
        "\\u200f\\u202a\\u202b\\u202c\\u202d",
    ),
    "zero-width space": ("T\u200b1", "T\\u200b1"),
    "line separator": ("a\u2028b\u2029c", "a\\u2028b\\u2029c"),
    "tag characters": ("ok\U000e0041\U000e0042", "ok\\U000e0041\\U000e0042"),
    "lone surrogate": ("a\ud800b", "a\\ud800b"),
    "BOM": ("\ufeffT1", "\\ufeffT1"),
}


@pytest.mark.parametrize(("raw", "shown"), HOSTILE.values(), ids=HOSTILE.keys())
def test_controls_are_escaped_visibly(raw: str, shown: str) -> None:
    assert printable(raw) == shown
    assert printable(raw).isprintable()
    assert printable(raw, multiline=True) == shown  # none of these is a newline or tab


@pytest.mark.parametrize(
    "text",
    [
        "Ax 3D T1",
        "Haofei01_MR1",
        "séance Müller Øre",
        "日本語のラベル",
        "مرحبا",
        "emoji 🧠 and a family 👨\u200d👩\u200d👧",  # zero-width joiners hold emoji together
        "می\u200cخواهم",  # Persian needs the zero-width non-joiner
        "C:\\data\\x1b is a literal backslash",
        "non\u00a0breaking and\u3000ideographic spaces",
        "",
    ],
)
def test_ordinary_text_is_unchanged(text: str) -> None:
    assert printable(text) == text
    assert printable(text, multiline=True) == text


def test_one_line_escapes_newlines_and_tabs() -> None:
    assert printable("a\tb\nc") == "a\\tb\\nc"
    assert printable("a\r\nb") == "a\\r\\nb"


def test_multiline_keeps_lines_and_tabs_but_nothing_else() -> None:
    tail = "line 1\r\n\tat org.nrg.Foo\nok\rFAILED\x1b[2K\n"
    assert printable(tail, multiline=True) == "line 1\n\tat org.nrg.Foo\nok\\rFAILED\\x1b[2K\n"


def test_non_strings_are_shown_as_str() -> None:
    assert printable(12) == "12"
    assert printable(None) == "None"


def test_escaping_is_idempotent() -> None:
    for raw, shown in HOSTILE.values():
        assert printable(shown) == shown
        assert printable(printable(raw, multiline=True)) == printable(raw)


def test_log_records_are_escaped_and_stay_one_line() -> None:
    formatter = PrintableFormatter("hpcbridge: %(levelname)s: %(message)s")
    record = logging.LogRecord(
        "hpcbridge.x", logging.WARNING, __file__, 1, "renaming %s\n%s", ("\x1b]0;t\x07", "x"), None
    )
    assert formatter.format(record) == "hpcbridge: warning: renaming \\x1b]0;t\\x07\\nx"


def test_tracebacks_in_log_records_keep_their_lines() -> None:
    formatter = PrintableFormatter("%(message)s")
    try:
        raise ValueError("body: \x1b[2J\u202e")
    except ValueError:
        record = logging.LogRecord("h", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    text = formatter.format(record)
    assert "\x1b" not in text and "\u202e" not in text
    assert "ValueError: body: \\x1b[2J\\u202e" in text
    assert text.count("\n") >= 3  # "failed", "Traceback...", a frame, the error


def _direct_writes(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        if name in ("print", "click.echo", "click.secho", "click.echo_via_pager") or re.fullmatch(
            r"(sys\.(stdout|stderr)(\.buffer)?\.write|traceback\.print_\w+|os\.write)", name
        ):
            found.append(f"line {node.lineno}: {name}")
    return found


def test_commands_print_only_through_the_output_module() -> None:
    """A command that printed with click.echo would show server text raw: none may."""
    cli = Path(hpcbridge.cli.__file__).parent
    offenders = {}
    for path in sorted(cli.glob("*.py")):
        if path.name in {"output.py"}:
            continue
        found = _direct_writes(ast.parse(path.read_text(), str(path)))
        if found:
            offenders[path.name] = found
    assert not offenders, f"print with hpcbridge.cli.output.echo/emit_*/warn instead: {offenders}"
    assert _direct_writes(ast.parse("import click\nclick.echo('x')\nprint(1)\n")) == [
        "line 2: click.echo",
        "line 3: print",
    ]


def test_a_rendered_script_is_escaped_on_a_terminal_and_exact_when_redirected(
    monkeypatch, capsys
) -> None:
    from hpcbridge.cli import output

    script = "#!/bin/bash\ndcm2niix -f 'T1\x1b]0;pwned\x07\u202e' in\n"
    monkeypatch.setattr(output.sys.stdout, "isatty", lambda: True, raising=False)
    output.emit_document(script)
    shown = capsys.readouterr().out
    assert "\x1b" not in shown and "\u202e" not in shown
    assert "T1\\x1b]0;pwned\\x07\\u202e" in shown and shown.count("\n") == 2
    monkeypatch.setattr(output.sys.stdout, "isatty", lambda: False, raising=False)
    output.emit_document(script)
    assert capsys.readouterr().out == script
