"""The sandbox's own controls and discovery routes over real HTTP: /sandbox/stats,
/sandbox/faults and fault injection, unknown paths, and what xnatpy needs to build its model
(xnat-api.md sections 7 and 8).
"""

from __future__ import annotations

import hashlib
import json
import socket
import xml.etree.ElementTree as ET

import pytest
import requests

from hpcbridge.sandbox import Faults, SandboxServer
from hpcbridge.sandbox.server import _Handler

T = 10
BOB = ("bob", "pw")
SCAN_FILES = "/data/experiments/XNAT_E00001/scans/4/resources/DICOM/files"


def admin(server: SandboxServer) -> tuple[str, str]:
    return (server.user, server.password)


def set_faults(
    server: SandboxServer, auth: tuple[str, str] | None = None, **values: object
) -> requests.Response:
    return requests.put(
        server.url + "/sandbox/faults",
        data=json.dumps(values),
        auth=auth or admin(server),
        timeout=T,
    )


# -- /sandbox/stats -------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/sandbox/stats", "/sandbox/faults"])
def test_sandbox_controls_are_admin_only(make_sandbox, path):
    sb = make_sandbox(seed=None)
    sb.add_user("bob", "pw")
    assert requests.get(sb.url + path, timeout=T).status_code == 401
    assert requests.get(sb.url + path, auth=BOB, timeout=T).status_code == 403
    assert requests.put(sb.url + path, data="{}", auth=BOB, timeout=T).status_code == 403
    resp = requests.get(sb.url + path, auth=admin(sb), timeout=T)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("application/json")


def test_stats_count_a_known_sequence_of_requests(make_sandbox):
    sb = make_sandbox(seed=None)
    base = sb.url
    seen: list[requests.Response] = []

    # 1: Basic login (a session), 2: no credentials (401), 3: form login (a second session),
    # 4: log that one out, 5: issue a token with the first session's cookie.
    first = requests.get(base + "/data/auth", auth=admin(sb), timeout=T)
    seen.append(first)
    sid = first.cookies["JSESSIONID"]
    seen.append(requests.get(base + "/data/projects", timeout=T))
    form = requests.put(
        base + "/data/services/auth", data={"username": sb.user, "password": sb.password}, timeout=T
    )
    seen.append(form)
    seen.append(
        requests.delete(base + "/data/JSESSION", cookies={"JSESSIONID": form.text}, timeout=T)
    )
    seen.append(
        requests.get(base + "/data/services/tokens/issue", cookies={"JSESSIONID": sid}, timeout=T)
    )
    assert [r.status_code for r in seen] == [200, 401, 200, 200, 200]

    resp = requests.get(base + "/sandbox/stats", cookies={"JSESSIONID": sid}, timeout=T)
    assert resp.status_code == 200
    stats = resp.json()
    assert stats["requests"] == {"GET": 4, "PUT": 1, "DELETE": 1}  # this request included
    assert stats["statuses"] == {"200": 4, "401": 1}  # this one is not answered yet
    assert stats["bytes_in"] == len(form.request.body)
    assert stats["bytes_out"] == sum(len(r.content) for r in seen)
    assert stats["sessions_created"] == 2
    assert stats["sessions_live"] == 1
    assert stats["tokens_issued"] == 1

    again = requests.get(base + "/sandbox/stats", cookies={"JSESSIONID": sid}, timeout=T).json()
    assert again["requests"]["GET"] == 5
    assert again["statuses"]["200"] == 5
    assert again["bytes_out"] == stats["bytes_out"] + len(resp.content)
    assert again["sessions_created"] == 2


def test_answers_are_sent_without_waiting_for_acks(make_sandbox, monkeypatch):
    # Nagle's algorithm would hold a reply's body until the client's delayed ACK of its
    # headers: about 40 ms per request on a keep-alive connection, as one XNAT session uses.
    seen: list[int] = []
    handle = _Handler.handle

    def recording(self: _Handler) -> None:
        seen.append(self.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        handle(self)

    monkeypatch.setattr(_Handler, "handle", recording)
    sb = make_sandbox(seed=None)
    with requests.Session() as http:
        http.auth = admin(sb)
        for _ in range(3):
            assert http.get(sb.url + "/data/auth", timeout=T).status_code == 200
    assert requests.get(sb.url + "/data/auth", auth=admin(sb), timeout=T).status_code == 200
    assert len(seen) == 2 and all(seen), seen  # one keep-alive connection, then a fresh one


# -- fault injection ------------------------------------------------------------------------------
def test_fail_every_second_request_answers_503(make_sandbox):
    sb = make_sandbox(seed=None, faults=Faults(fail_every=2))
    with requests.Session() as http:
        http.auth = admin(sb)
        answers = [http.get(sb.url + "/data/auth", timeout=T) for _ in range(6)]
    assert [r.status_code for r in answers] == [200, 503] * 3
    assert all(r.text == "User 'admin' is logged in" for r in answers[::2])
    assert all(r.text.lower().startswith("<!doctype html>") for r in answers[1::2])


def test_latency_fault_still_answers_correctly(make_sandbox):
    sb = make_sandbox(seed=None, faults=Faults(latency=0.3))
    resp = requests.get(sb.url + "/data/auth", auth=admin(sb), timeout=T)
    assert resp.status_code == 200
    assert resp.text == "User 'admin' is logged in"
    # Only a lower bound, to show the fault is applied (not a performance assertion).
    assert resp.elapsed.total_seconds() >= 0.25
    assert (
        requests.get(sb.url + "/sandbox/faults", auth=admin(sb), timeout=T).json()["latency"] == 0.3
    )


def test_faults_are_changed_at_runtime(make_sandbox):
    sb = make_sandbox(seed=None)
    resp = set_faults(sb, fail_every=2, latency=0)
    assert resp.status_code == 200
    assert resp.json()["fail_every"] == 2
    codes = [
        requests.get(sb.url + "/data/auth", auth=admin(sb), timeout=T).status_code for _ in range(4)
    ]
    assert sorted(codes) == [200, 200, 503, 503]

    for _ in range(3):  # the PUT itself may be one of the failing requests
        if set_faults(sb, fail_every=0).status_code == 200:
            break
    codes = [
        requests.get(sb.url + "/data/auth", auth=admin(sb), timeout=T).status_code for _ in range(4)
    ]
    assert codes == [200] * 4


@pytest.mark.parametrize(
    "body",
    [
        '{"bogus": 1}',
        '{"latency": 1, "bogus": 1}',
        '{"fail_every": "often"}',
        '{"fail_every": -1}',
        "[1]",
        "not json",
    ],
)
def test_bad_faults_are_400_and_change_nothing(make_sandbox, body):
    sb = make_sandbox(seed=None)
    before = requests.get(sb.url + "/sandbox/faults", auth=admin(sb), timeout=T).json()
    resp = requests.put(sb.url + "/sandbox/faults", data=body, auth=admin(sb), timeout=T)
    assert resp.status_code == 400
    after = requests.get(sb.url + "/sandbox/faults", auth=admin(sb), timeout=T)
    assert after.status_code == 200
    assert after.json() == before


def test_dropped_download_cannot_be_received_whole_and_server_keeps_serving(make_sandbox):
    sb = make_sandbox(faults=Faults(drop_every=1, drop_after=1000))
    listing = requests.get(
        sb.url + SCAN_FILES, params={"format": "json"}, auth=admin(sb), timeout=T
    )
    assert listing.status_code == 200
    row = listing.json()["ResultSet"]["Result"][0]
    size = int(row["Size"])
    assert size > 1000

    try:
        cut = requests.get(sb.url + row["URI"], auth=admin(sb), timeout=T)
    except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError):
        pass
    else:
        assert len(cut.content) < size

    assert requests.get(sb.url + "/data/auth", auth=admin(sb), timeout=T).status_code == 200
    assert set_faults(sb, drop_every=0).status_code == 200
    whole = requests.get(sb.url + row["URI"], auth=admin(sb), timeout=T)
    assert whole.status_code == 200
    assert len(whole.content) == size
    assert hashlib.md5(whole.content).hexdigest() == row["digest"]


def test_dropped_zip_download_is_not_a_valid_whole_zip(make_sandbox):
    sb = make_sandbox(faults=Faults(drop_every=1, drop_after=1000))
    try:
        cut = requests.get(sb.url + SCAN_FILES, params={"format": "zip"}, auth=admin(sb), timeout=T)
    except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError):
        pass
    else:
        pytest.fail(f"a cut chunked download ended cleanly ({len(cut.content)} bytes)")
    assert requests.get(sb.url + "/data/auth", auth=admin(sb), timeout=T).status_code == 200


def test_dropped_upload_is_not_stored(make_sandbox):
    sb = make_sandbox(faults=Faults(drop_every=1, drop_after=1000))
    target = sb.url + SCAN_FILES + "/partial.bin"
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.put(target, params={"inbody": "true"}, data=b"x" * 5000, auth=admin(sb), timeout=T)
    listing = requests.get(
        sb.url + SCAN_FILES, params={"format": "json"}, auth=admin(sb), timeout=T
    )
    assert listing.status_code == 200
    assert "partial.bin" not in {r["Name"] for r in listing.json()["ResultSet"]["Result"]}


# -- unknown paths and discovery ------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/data/nonsense", "/REST/nonsense", "/data/archive/nonsense"])
def test_unknown_data_path_is_restlet_404(demo_sandbox, path):
    resp = requests.get(demo_sandbox.url + path, auth=admin(demo_sandbox), timeout=T)
    assert resp.status_code == 404
    assert "<title>Status page</title>" in resp.text


def test_unknown_top_level_path_is_404(demo_sandbox):
    assert requests.get(demo_sandbox.url + "/nonsense", timeout=T).status_code == 404
    assert (
        requests.get(
            demo_sandbox.url + "/nonsense", auth=admin(demo_sandbox), timeout=T
        ).status_code
        == 404
    )


def test_data_version_is_not_200(demo_sandbox):
    # xnatpy takes a 200 body of /data/version as the XNAT version string
    resp = requests.get(demo_sandbox.url + "/data/version", auth=admin(demo_sandbox), timeout=T)
    assert resp.status_code != 200


@pytest.mark.parametrize("params", [{}, {"format": "json"}])
def test_build_info_is_open_json_with_version(demo_sandbox, params):
    resp = requests.get(demo_sandbox.url + "/xapi/siteConfig/buildInfo", params=params, timeout=T)
    assert resp.status_code == 200
    info = resp.json()
    assert isinstance(info["version"], str)
    assert info["version"].startswith("1.8")  # not 1.6, which switches xnatpy to old paths


def test_schemas_are_listed_and_served_as_xsd(demo_sandbox):
    auth = admin(demo_sandbox)
    names = requests.get(
        demo_sandbox.url + "/xapi/schemas", params={"format": "json"}, auth=auth, timeout=T
    )
    assert names.status_code == 200
    assert {"xnat", "xdat"} <= set(names.json())

    for name in ("xnat", "xdat"):
        resp = requests.get(f"{demo_sandbox.url}/xapi/schemas/{name}", auth=auth, timeout=T)
        assert resp.status_code == 200, name
        root = ET.fromstring(resp.content)
        assert root.tag == "{http://www.w3.org/2001/XMLSchema}schema"
    xnat = ET.fromstring(
        requests.get(demo_sandbox.url + "/xapi/schemas/xnat", auth=auth, timeout=T).content
    )
    assert xnat.get("targetNamespace") == "http://nrg.wustl.edu/xnat"
    types = {t.get("name") for t in xnat.iter("{http://www.w3.org/2001/XMLSchema}complexType")}
    assert {"projectData", "mrSessionData", "mrScanData", "resourceCatalog"} <= types
    assert (
        requests.get(demo_sandbox.url + "/xapi/schemas/nope", auth=auth, timeout=T).status_code
        == 404
    )


def test_search_elements_list_element_names(demo_sandbox):
    auth = admin(demo_sandbox)
    resp = requests.get(
        demo_sandbox.url + "/data/search/elements", params={"format": "json"}, auth=auth, timeout=T
    )
    assert resp.status_code == 200
    rows = resp.json()["ResultSet"]["Result"]
    assert rows and all(isinstance(r["ELEMENT_NAME"], str) for r in rows)
    assert "xnat:mrSessionData" in {r["ELEMENT_NAME"] for r in rows}

    fields = requests.get(
        demo_sandbox.url + "/data/search/elements/xnat:mrSessionData",
        params={"format": "json"},
        auth=auth,
        timeout=T,
    )
    assert fields.status_code == 200
    assert all("FIELD_ID" in r for r in fields.json()["ResultSet"]["Result"])
    assert (
        requests.get(
            demo_sandbox.url + "/data/search/elements", params={"format": "json"}, timeout=T
        ).status_code
        == 401
    )
