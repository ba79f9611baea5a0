"""XNAT's listing ("table") representation: filters, ``columns=``, sorting, paging and formats.

Rows come in as dicts of every column the sandbox knows for that listing; this module picks the
default or requested columns, turns every value into a string (XNAT's ``XFTTable.toJSON`` does
``o.toString()``, null becoming ``""``), and wraps them in the ResultSet envelope.
"""

from __future__ import annotations

import csv
import fnmatch
import html
import io
import json
from collections.abc import Iterable, Mapping
from typing import Any
from xml.sax.saxutils import escape

# Query parameters that steer the representation rather than filter rows.
CONTROL_PARAMS = {
    "format",
    "columns",
    "sortBy",
    "sortOrder",
    "limit",
    "offset",
    "xsiType",
    "file_stats",
    "cache_file_stats",
    "all",
    "accept-not-found",
    "locator",
    "recursive",
    "structure",
    "compression",
    "_",
    "CSRF",
    "XNAT_CSRF",
    "includeRootPath",
    "index",
    "projectIncludedInPath",
    "subjectIncludedInPath",
    "req_format",
    "includeHistory",
    "allDataOverride",
    "restrict",
    "file_format",
    "file_content",
}


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _matches(value: str, wanted: str) -> bool:
    """XNAT filter semantics: comma = OR, ``*`` or ``%`` makes a LIKE."""
    for alt in wanted.split(","):
        if "*" in alt or "%" in alt:
            if fnmatch.fnmatchcase(value.lower(), alt.replace("%", "*").lower()):
                return True
        elif value == alt:
            return True
    return False


def filter_rows(rows: list[dict[str, Any]], query: Mapping[str, str]) -> list[dict[str, Any]]:
    """Apply query parameters that name a known column as filters."""
    for key, wanted in query.items():
        if key in CONTROL_PARAMS or not rows:
            continue
        column = _find_column(rows[0], key)
        if column is not None:
            rows = [r for r in rows if _matches(_text(r.get(column)), wanted)]
    return rows


def _find_column(row: Mapping[str, Any], name: str) -> str | None:
    if name in row:
        return name
    lowered = name.lower()
    for key in row:
        if key.lower() == lowered:
            return key
    return None


def select_columns(
    rows: list[dict[str, Any]], defaults: list[str], requested: str | None, available: Iterable[str]
) -> tuple[list[str], list[dict[str, str]]]:
    """Pick the output keys: defaults, or the known requested ones; ``URI`` always when known.

    Requested xpaths come back keyed by the lower-cased xpath, as XNAT does; unknown names are
    ignored (XNAT logs them and carries on).
    """
    known = list(available)
    if requested:
        keys: list[str] = []
        for name in requested.split(","):
            name = name.strip()
            match = _find_column(dict.fromkeys(known), name)
            if match is None:
                continue
            key = match.lower() if ":" in match else match
            if key not in keys:
                keys.append(key)
        if "URI" in known and "URI" not in keys:
            keys.append("URI")
    else:
        keys = list(defaults)
    out = []
    for row in rows:
        lowered = {k.lower(): v for k, v in row.items()}
        out.append({k: _text(row[k] if k in row else lowered.get(k.lower())) for k in keys})
    return keys, out


def sort_and_page(
    rows: list[dict[str, str]], query: Mapping[str, str]
) -> tuple[list[dict[str, str]], bool]:
    sort_by = query.get("sortBy")
    if sort_by:
        cols = [c for c in sort_by.split(",") if rows and _find_column(rows[0], c)]
        rows = sorted(
            rows,
            key=lambda r: [r[_find_column(r, c) or c] for c in cols],
            reverse=query.get("sortOrder", "").upper() == "DESC",
        )
    paged = "limit" in query or "offset" in query
    if paged:
        try:
            offset = int(query.get("offset", "0"))
            limit = int(query["limit"]) if "limit" in query else None
        except ValueError:
            offset, limit = 0, None
        rows = rows[offset : offset + limit if limit is not None else None]
    return rows, paged


def render_table(
    rows: list[dict[str, Any]],
    *,
    defaults: list[str],
    query: Mapping[str, str],
    meta: Mapping[str, Any] | None = None,
    columns_meta: list[dict[str, str]] | None = None,
    total_meta: bool = True,
    available: Iterable[str] | None = None,
) -> tuple[bytes, str]:
    """Render a listing in the requested format; returns (body, content type)."""
    rows = filter_rows(rows, query)
    avail = list(available) if available is not None else (list(rows[0]) if rows else defaults)
    keys, out = select_columns(rows, defaults, query.get("columns"), avail)
    out, paged = sort_and_page(out, query)
    fmt = (query.get("format") or "json").lower()
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
        writer.writeheader()
        writer.writerows(out)
        return buf.getvalue().encode(), "text/csv"
    if fmt == "xml":
        return _xml_table(keys, out), "text/xml"
    if fmt == "html":
        return _html_table(keys, out, str((meta or {}).get("title", ""))), "text/html"
    result: dict[str, Any] = {}
    if columns_meta is not None:
        result["Columns"] = columns_meta
    result["Result"] = out
    for key, value in (meta or {}).items():
        result[key] = _text(value)
    if total_meta and not paged:
        result["totalRecords"] = str(len(out))
    return json.dumps({"ResultSet": result}).encode(), "application/json"


def _xml_table(keys: list[str], rows: list[dict[str, str]]) -> bytes:
    parts = ['<?xml version="1.0" encoding="UTF-8"?>\n<ResultSet>\n<results>\n<columns>\n']
    parts += [f"<column>{escape(k)}</column>\n" for k in keys]
    parts.append("</columns>\n<rows>\n")
    for row in rows:
        parts.append("<row>")
        parts += [f"<cell>{escape(row[k])}</cell>" for k in keys]
        parts.append("</row>\n")
    parts.append("</rows>\n</results>\n</ResultSet>\n")
    return "".join(parts).encode()


def _html_table(keys: list[str], rows: list[dict[str, str]], title: str) -> bytes:
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(r[k])}</td>" for k in keys) + "</tr>" for r in rows
    )
    return (
        f"<html><head><title>{html.escape(title)}</title></head><body>"
        f"<table><tr>{head}</tr>{body}</table></body></html>"
    ).encode()
