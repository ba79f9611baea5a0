"""Browsing edge cases that a live server does not easily produce (requests-mock)."""

from __future__ import annotations

import pytest
import requests_mock
from click.testing import CliRunner

from hpcbridge.cli import main
from hpcbridge.cli.app import fit_widths
from hpcbridge.xnat import Secret, XnatClient
from hpcbridge.xnat.browse import project_scans

URL = "https://xnat.example.org"
LOGIN_PAGE = "<html><head><title>XNAT Login</title></head><body><form>password</form></body></html>"


def rs(rows: list[dict]) -> dict:
    return {"ResultSet": {"Result": rows}}


def test_project_scans_falls_back_when_columns_are_ignored() -> None:
    with requests_mock.Mocker() as m:
        m.post(f"{URL}/data/JSESSION", text="S", cookies={"JSESSIONID": "S"})
        m.delete(f"{URL}/data/JSESSION", text="")
        # A server that ignores columns= answers one plain row per session.
        m.get(
            f"{URL}/data/experiments",
            json=rs(
                [
                    {"ID": "E1", "label": "A_MR1", "subject_label": "A", "project": "P"},
                    {"ID": "E2", "label": "B_MR1", "subject_label": "B", "project": "P"},
                ]
            ),
        )
        m.get(f"{URL}/data/experiments/E1/scans", json=rs([{"ID": "4", "type": "T1"}]))
        m.get(
            f"{URL}/data/experiments/E2/scans",
            json=rs([{"ID": "4", "type": "T1"}, {"ID": "5", "type": "BOLD"}]),
        )
        with XnatClient(URL, Secret("u", "p", "environment")) as client:
            refs = project_scans(client, "P")
        posts = [r for r in m.request_history if r.method == "POST"]
    assert [r.address for r in refs] == ["P/A/A_MR1/4", "P/B/B_MR1/4", "P/B/B_MR1/5"]
    assert len(posts) == 1  # one server session for the whole walk
    assert m.request_history[-1].method == "DELETE"  # and it is ended


def test_html_login_page_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPCBRIDGE_XNAT", URL)
    monkeypatch.setenv("HPCBRIDGE_USER", "u")
    monkeypatch.setenv("HPCBRIDGE_PASSWORD", "p")
    with requests_mock.Mocker() as m:
        m.post(f"{URL}/data/JSESSION", text="S", cookies={"JSESSIONID": "S"})
        m.get(f"{URL}/data/projects", text=LOGIN_PAGE, headers={"Content-Type": "text/html"})
        result = CliRunner().invoke(main, ["ls"])
    assert result.exit_code == 1
    assert result.output == (
        "hpcbridge: error: XNAT refused the session or credentials "
        "(the project list) (run `hpcbridge login`)\n"
    )
    # It logged in again once before giving up, not in a loop.
    assert sum(1 for r in m.request_history if r.method == "POST") == 2


def test_fit_widths_shrinks_the_widest_column() -> None:
    assert fit_widths([10, 40, 8], 80) == [10, 40, 8]
    assert fit_widths([10, 40, 8], 40) == [10, 18, 8]
    assert sum(fit_widths([30, 30, 30], 20)) >= 18  # never below the floor
