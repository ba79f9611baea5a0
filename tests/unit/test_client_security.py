"""The XNAT client keeps credentials on the configured origin, refuses unsafe URLs, and gives
requests the TLS setting it was told (requests-mock: hosts and schemes a loopback test cannot
have; tests/integration/test_http_security.py has the same against real servers)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import requests_mock

from hpcbridge.errors import ConfigError, XnatError, XnatServerError
from hpcbridge.xnat import Secret, XnatClient

URL = "https://xnat.example.org"
PASSWORD = "pw-Sup3rSecret"
SESSION = "SID-0123456789ABCDEF"
LISTING = {"ResultSet": {"Result": [{"ID": "P1"}]}}


def _client(url: str = URL, **kwargs) -> XnatClient:
    return XnatClient(url, Secret("alice", PASSWORD, "environment"), backoff=0, **kwargs)


def _login(m: requests_mock.Mocker, url: str = URL) -> None:
    m.post(f"{url}/data/JSESSION", text=SESSION, cookies={"JSESSIONID": SESSION})
    m.delete(f"{url}/data/JSESSION", text="")


def _assert_clean(text: str) -> None:
    assert PASSWORD not in text and SESSION not in text
    assert all(c.isprintable() for c in text)


@pytest.mark.parametrize(
    "location",
    [
        "http://xnat.example.org/data/projects",
        "http://xnat.example.org:443/data/projects",
        "http://evil.example/data/projects",
    ],
)
def test_https_to_http_is_refused(location: str) -> None:
    with requests_mock.Mocker() as m, _client() as client:
        _login(m)
        m.get(f"{URL}/data/projects", status_code=302, headers={"Location": location})
        m.get(location, json=LISTING)
        with pytest.raises(XnatError) as caught:
            client.get_json("/data/projects", "the projects")
        sent = [r.url for r in m.request_history]
    assert caught.value.message == (
        f"XNAT at {URL} redirected GET /data/projects to {location}: from https to plain http; "
        "refusing to follow it with your credentials"
    )
    assert caught.value.hint == (
        "a server or proxy that sends https requests to plain http is misconfigured: tell the "
        "XNAT administrators"
    )
    assert not any(u.startswith("http://") for u in sent)


def test_a_login_redirected_to_http_never_sends_the_password() -> None:
    with requests_mock.Mocker() as m, _client() as client:
        m.post(
            f"{URL}/data/JSESSION",
            status_code=307,
            headers={"Location": "http://xnat.example.org/data/JSESSION"},
        )
        m.post("http://xnat.example.org/data/JSESSION", text=SESSION)
        with pytest.raises(XnatError, match="from https to plain http"):
            client.login()
        assert [r.url for r in m.request_history] == [f"{URL}/data/JSESSION"]


@pytest.mark.parametrize(
    ("location", "shown"),
    [
        (
            "https://xnat.example.org:8443/data/projects",
            "https://xnat.example.org:8443/data/projects",
        ),
        ("https://xnat.example.org.evil.example/x", "https://xnat.example.org.evil.example/x"),
        ("//evil.example/x", "https://evil.example/x"),
        (f"https://alice:{PASSWORD}@evil.example/x?token={SESSION}", "https://***@evil.example/x"),
        (f"https://evil.example/x#{SESSION}", "https://evil.example/x"),
        ("https://xnat.example.org:99999/x", "https://xnat.example.org:99999/x"),
        # A Location is the server's text: escape sequences must not reach the terminal.
        (
            "https://evil.example/x\x1b]0;owned\x07\x1b[2J",
            "https://evil.example/x\\x1b]0;owned\\x07\\x1b[2J",
        ),
    ],
)
def test_another_https_origin_is_refused_and_its_url_masked(location: str, shown: str) -> None:
    with requests_mock.Mocker() as m, _client() as client:
        _login(m)
        m.get(f"{URL}/data/projects", status_code=301, headers={"Location": location})
        with pytest.raises(XnatError) as caught:
            client.get_json("/data/projects", "the projects")
        assert len(m.request_history) == 2
    message = str(caught.value)
    _assert_clean(message)
    assert f"to {shown}: another origin; refusing to follow it with your credentials" in message
    root = "/".join(shown.split("/")[:3])
    if ":99999" in root:  # no such origin: nothing to suggest moving to
        assert caught.value.hint == "tell the XNAT administrators"
        return
    assert caught.value.hint == (
        f'if the XNAT administrators say the server has moved there, set xnat = "{root}" in the '
        "profile"
    )


@pytest.mark.parametrize(
    "path",
    [
        "@evil.example/data/projects",
        ".evil.example/data/projects",
        ":8443/data/projects",
        # urlsplit reads evil.example as the host, requests xnat.example.org: both are checked.
        "\\@evil.example/data/projects",
    ],
)
def test_a_path_that_moves_the_host_is_never_sent(path: str) -> None:
    with requests_mock.Mocker() as m, _client() as client:
        _login(m)
        m.get(requests_mock.ANY, json=LISTING)
        with pytest.raises(XnatServerError, match="it is not on XNAT at https://xnat.example.org"):
            client.request("GET", path, "a listed path")
        assert all(r.hostname == "xnat.example.org" for r in m.request_history)
        assert all(r.port == 443 for r in m.request_history)


def test_a_303_after_an_upload_becomes_a_get_without_body() -> None:
    with requests_mock.Mocker() as m, _client() as client:
        _login(m)
        m.put(f"{URL}/data/x", status_code=303, headers={"Location": "/data/x/done"})
        m.get(f"{URL}/data/x/done", text="ok")
        client.request("PUT", "/data/x", "uploading x", data=b"payload", params={"a": "1"})
        last = m.request_history[-1]
    assert (last.method, last.url, last.body) == ("GET", f"{URL}/data/x/done", None)


def test_the_tls_setting_is_given_on_every_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On the session alone, requests would let REQUESTS_CA_BUNDLE replace False or a CA file.
    site = tmp_path / "site.pem"
    site.write_text("x")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(site))
    for verify, sent in [(False, False), ("/own/ca.pem", "/own/ca.pem"), (True, str(site))]:
        with requests_mock.Mocker() as m, _client(verify=verify) as client:
            _login(m)
            m.get(f"{URL}/data/projects", json=LISTING)
            client.get_json("/data/projects", "the projects")
            assert {r.verify for r in m.request_history} == {sent}


@pytest.mark.parametrize(
    "url",
    [
        f"https://alice:{PASSWORD}@xnat.example.org",
        f"https://{PASSWORD}@xnat.example.org",
        f"https://alice:{PASSWORD}/x@xnat.example.org",
    ],
)
def test_a_client_refuses_credentials_in_its_url(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _client(url)
    _assert_clean(str(caught.value))
    assert "alice" not in str(caught.value)
    assert caught.value.message == "the XNAT URL https://***@xnat.example.org contains credentials"


def test_plain_http_to_another_host_needs_the_opt_in_and_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = "http://xnat.example.org"
    with pytest.raises(ConfigError, match="would carry your password and token in clear text"):
        _client(url)
    caplog.set_level(logging.WARNING, logger="hpcbridge")
    with requests_mock.Mocker() as m, _client(url, allow_insecure_http=True) as client:
        _login(m, url)
        m.get(f"{url}/data/projects", json=LISTING)
        client.get_json("/data/projects", "the projects")
        client.get_json("/data/projects", "the projects")
        client.login()  # a second login in the same client (an expired session) warns no more
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "http://xnat.example.org sends your password, token and XNAT session in clear text: "
        "anyone on the network path can read and reuse them (allow_insecure_http is set; use "
        "https if the server offers it)"
    ]


def test_loopback_http_neither_needs_the_opt_in_nor_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="hpcbridge")
    for url in ("http://127.0.0.1:8080", "http://localhost:8080", "http://[::1]:8080"):
        with requests_mock.Mocker() as m, _client(url) as client:
            _login(m, url)
            client.login()
    assert caplog.records == []
