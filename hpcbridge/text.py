"""Strings from XNAT, schedulers and job logs made safe to show on a terminal.

A label, scan type, file name, error body or log line is data, and a terminal would obey any
control sequence inside it: clear the screen, retitle the window, hide text, move the cursor,
or rewrite a line with ``\\r``. :func:`printable` turns every such character into the escape a
Python string literal would use (``\\x1b``, ``\\x9b``, ``\\u202e``...), so it stays visible and
harmless, and leaves everything else alone, non-ASCII letters included.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

# Fast path: most strings are plain printable ASCII and need no per-character look-up.
_NOT_PLAIN = re.compile(r"[^\x20-\x7e]")

# Cc: C0 controls, DEL and C1 controls (U+0080-U+009F, which some terminals act on as ESC
# sequences: U+009B is CSI). Cf: invisible format characters, among them the bidi embeddings,
# overrides and isolates that show text in another order than it is stored, zero-width spaces
# and the tag characters that smuggle invisible text. Zl/Zp: line and paragraph separators,
# which some terminals and viewers break lines at. Cs: lone surrogates (from JSON \ud800),
# which cannot even be encoded for output.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
# Zero-width (non-)joiners are Cf too, but ordinary text needs them: Persian and Indic words,
# emoji sequences. They hide nothing.
_JOINERS = frozenset({"\u200c", "\u200d"})
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


@lru_cache(maxsize=1024)
def _escaped(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    if unicodedata.category(ch) not in _UNSAFE_CATEGORIES or ch in _JOINERS:
        return ch
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _one(match: re.Match[str]) -> str:
    return _escaped(match.group())


def _keeping_lines(match: re.Match[str]) -> str:
    ch = match.group()
    return ch if ch in "\n\t" else _escaped(ch)


def printable(text: object, *, multiline: bool = False) -> str:
    """``text`` (or ``str(text)``) with every terminal control character escaped.

    Escaped: C0 controls, DEL, C1 controls, lone surrogates, line/paragraph separators and
    invisible format characters (bidi overrides and isolates, zero-width spaces...), written
    as ``\\t``, ``\\n``, ``\\r``, ``\\xNN``, ``\\uNNNN`` or ``\\UNNNNNNNN``. Backslashes are
    left as they are, so ordinary text (``C:\\data``) reads unchanged.

    ``multiline=True`` is for text that is made of lines, such as a job log's tail: newlines
    and tabs stay (they cannot overwrite or hide anything), ``\\r\\n`` becomes ``\\n``, and
    everything else is escaped as above. Without it the result is always one line, as a table
    cell or an error message must be.
    """
    string = text if isinstance(text, str) else str(text)
    if not _NOT_PLAIN.search(string):
        return string
    if multiline:
        return _NOT_PLAIN.sub(_keeping_lines, string.replace("\r\n", "\n"))
    return _NOT_PLAIN.sub(_one, string)
