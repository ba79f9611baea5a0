"""Mapping of XNAT answers to typed errors; error paths a live server cannot easily produce."""

from __future__ import annotations

import pytest
import requests_mock

from hpcbridge.errors import (
    XnatAuthError,
    XnatConflictError,
    XnatConnectionError,
    XnatNotFoundError,
    XnatPermissionError,
    XnatServerError,
)
from hpcbridge.xnat import Secret, XnatClient

URL = "https://xnat.example.org/xnat"
LOGIN_PAGE = "<html><body><form action='/login'>password</form></body></html>"


@pytest.fixture()
def client() -> XnatClient:
    return XnatClient(URL, Secret("alice", "s3cret-value", "environment"), backoff=0)


def _login(m: requests_mock.Mocker) -> None:
    m.post(f"{URL}/data/JSESSION", text="ABC", cookies={"JSESSIONID": "ABC"})


@pytest.mark.parametrize(
    ("status", "body", "error", "message"),
    [
        (
            403,
            "<h3>Specified user account has insufficient privileges</h3>",
            XnatPermissionError,
            "not allowed: the thing: Specified user account has insufficient privileges",
        ),
        (404, "", XnatNotFoundError, "not found: the thing"),
        (
            409,
            "<h3>Specified resource already exists.</h3>",
            XnatConflictError,
            "conflict: the thing: Specified resource already exists.",
        ),
        (
            500,
            "<html><body><h3>NullPointerException</h3></body></html>",
            XnatServerError,
            "XNAT answered 500 for the thing: NullPointerException",
        ),
    ],
)
def test_statuses_map_to_typed_errors(
    client: XnatClient, status: int, body: str, error: type, message: str
) -> None:
    with requests_mock.Mocker() as m:
        _login(m)
        m.get(f"{URL}/data/projects", status_code=status, text=body)
        with pytest.raises(error) as exc:
            client.get_json("/data/projects", "the thing")
    assert exc.value.message == message
    assert exc.value.status == status
    assert "s3cret" not in str(exc.value)


def test_login_page_with_200_is_an_auth_error(client: XnatClient) -> None:
    with requests_mock.Mocker() as m:
        m.post(f"{URL}/data/JSESSION", text=LOGIN_PAGE, headers={"Content-Type": "text/html"})
        with pytest.raises(XnatAuthError, match="refused the credentials"):
            client.login()


def test_expired_session_logs_in_again_once(client: XnatClient) -> None:
    with requests_mock.Mocker() as m:
        _login(m)
        m.get(
            f"{URL}/data/projects", [{"status_code": 401}, {"json": {"ResultSet": {"Result": []}}}]
        )
        assert client.listing("/data/projects", "projects") == []
        assert [r.method for r in m.request_history] == ["POST", "GET", "POST", "GET"]


def test_get_is_retried_on_503_but_put_is_not(client: XnatClient) -> None:
    with requests_mock.Mocker() as m:
        _login(m)
        m.get(
            f"{URL}/data/projects", [{"status_code": 503}, {"json": {"ResultSet": {"Result": []}}}]
        )
        assert client.listing("/data/projects", "projects") == []
        m.put(f"{URL}/data/projects/P", status_code=503)
        with pytest.raises(XnatServerError) as exc:
            client.request("PUT", "/data/projects/P", "create P")
        assert str(exc.value) == "XNAT is unavailable (503 for create P) (try again later)"
        assert sum(1 for r in m.request_history if r.method == "PUT") == 1


def test_unreachable_server(client: XnatClient) -> None:
    import requests

    with requests_mock.Mocker() as m:
        m.post(f"{URL}/data/JSESSION", exc=requests.ConnectionError("Connection refused"))
        with pytest.raises(
            XnatConnectionError, match="cannot reach XNAT at https://xnat.example.org/xnat"
        ):
            client.login()


def test_listing_turns_string_numbers_into_ints(client: XnatClient) -> None:
    rows = [{"Name": "1.dcm", "Size": "153512", "cat_ID": "12", "digest": "00ab"}]
    with requests_mock.Mocker() as m:
        _login(m)
        m.get(f"{URL}/data/experiments/E/scans/1/files", json={"ResultSet": {"Result": rows}})
        got = client.listing("/data/experiments/E/scans/1/files", "files")
    assert got == [{"Name": "1.dcm", "Size": 153512, "cat_ID": 12, "digest": "00ab"}]


def test_credentials_repr_hides_secret() -> None:
    assert "s3cret" not in repr(Secret("alice", "s3cret", "environment"))


def test_answer_cut_off_mid_body_is_a_broken_connection(client: XnatClient) -> None:
    # The fault soak saw it: XNAT dropped the connection halfway through a chunked answer.
    import requests

    cut = requests.exceptions.ChunkedEncodingError("Connection broken: IncompleteRead")
    with requests_mock.Mocker() as m:
        _login(m)
        m.get(f"{URL}/data/projects", [{"exc": cut}, {"json": {"ResultSet": {"Result": []}}}])
        assert client.listing("/data/projects", "projects") == []
        m.put(f"{URL}/data/projects/P", exc=cut)
        with pytest.raises(XnatConnectionError, match="cannot reach XNAT at"):
            client.request("PUT", "/data/projects/P", "create P")
        assert sum(1 for r in m.request_history if r.method == "PUT") == 1
