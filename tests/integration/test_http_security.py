"""What the XNAT client sends, and to whom, against real HTTP(S) servers on loopback.

Two tiny servers play the parts: ``xnat`` (answers logins and listings, and redirects where a
test says so) and ``elsewhere`` (another origin that records whatever reaches it). The session
cookie and the login's Authorization header must reach ``xnat`` only: a redirect to another
origin, or from https to http, is refused with one clear line, and ``elsewhere`` hears nothing.

The TLS tests run the same server behind certificates made here (a CA of the test's own, an
expired one, one for another name) and check that each failure is told whole, and that
``ca_bundle`` (or REQUESTS_CA_BUNDLE) makes a site CA work.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from hpcbridge.cli import main
from hpcbridge.config import load_settings
from hpcbridge.errors import XnatConnectionError, XnatError
from hpcbridge.xnat import Secret, XnatClient, connect

PASSWORD = "pw-Sup3rSecret"
SESSION = "SID-0123456789ABCDEF"
PROJECTS = b'{"ResultSet": {"Result": [{"ID": "P1", "name": "P1"}], "totalRecords": "1"}}'

Route = tuple[int, dict[str, str], bytes]


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeServer

    def _any(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.seen.append(Seen(self.command, self.path, dict(self.headers), body))
        route = self.server.route(self.command, self.path.split("?")[0])
        status, headers, payload = route if route else (404, {}, b"not found")
        self.send_response(status)
        for name, value in {"Content-Length": str(len(payload)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _any

    def log_message(self, format: str, *args: Any) -> None:
        pass


class FakeServer(ThreadingHTTPServer):
    """A recording HTTP(S) server on 127.0.0.1 whose answers are a table a test fills in."""

    daemon_threads = True

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.seen: list[Seen] = []
        self.routes: dict[tuple[str, str], Route | Callable[[], Route]] = {}
        self.scheme = "https" if tls else "http"
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        self.thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server_port}"

    def route(self, method: str, path: str) -> Route | None:
        found = self.routes.get((method, path)) or self.routes.get(("*", path))
        return found() if callable(found) else found

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hangs up on a certificate it refuses is the point of some tests

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def _as_xnat(server: FakeServer) -> FakeServer:
    """Answer as XNAT does to what the client asks first."""
    cookie = {"Set-Cookie": f"JSESSIONID={SESSION}; Path=/; HttpOnly"}
    server.routes[("POST", "/data/JSESSION")] = (200, cookie, SESSION.encode())
    server.routes[("DELETE", "/data/JSESSION")] = (200, {}, b"")
    server.routes[("GET", "/data/auth")] = (200, {}, b"User 'alice' is logged in")
    server.routes[("GET", "/data/projects")] = (
        200,
        {"Content-Type": "application/json"},
        PROJECTS,
    )
    return server


@pytest.fixture()
def xnat() -> Iterator[FakeServer]:
    server = _as_xnat(FakeServer())
    yield server
    server.stop()


@pytest.fixture()
def elsewhere() -> Iterator[FakeServer]:
    server = FakeServer()
    server.routes[("*", "/steal")] = (200, {"Content-Type": "application/json"}, PROJECTS)
    yield server
    server.stop()


def _client(url: str, **kwargs: Any) -> XnatClient:
    return XnatClient(url, Secret("alice", PASSWORD, "environment"), backoff=0, **kwargs)


def _no_secrets(seen: list[Seen]) -> None:
    for request in seen:
        text = repr(request).lower()
        assert SESSION.lower() not in text and "authorization" not in text


def _redirect(to: str, status: int = 302) -> Route:
    return (status, {"Location": to}, b"")


# -- redirects ----------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_redirect_to_another_origin_is_refused_and_nothing_reaches_it(
    xnat: FakeServer, elsewhere: FakeServer, status: int, host: str
) -> None:
    target = f"http://{host}:{elsewhere.server_port}/steal?x=1"
    xnat.routes[("GET", "/data/projects")] = _redirect(target, status)
    with _client(xnat.url) as client, pytest.raises(XnatError) as caught:
        client.get_json("/data/projects", "the projects")
    assert caught.value.message == (
        f"XNAT at {xnat.url} redirected GET /data/projects to "
        f"http://{host}:{elsewhere.server_port}/steal: another origin; refusing to follow it "
        "with your credentials"
    )
    assert caught.value.hint == "tell the XNAT administrators"
    assert elsewhere.seen == []
    assert xnat.seen[-1].headers.get("Cookie") == f"JSESSIONID={SESSION}"


@pytest.mark.parametrize("status", [302, 307, 308])
def test_a_redirected_login_sends_the_password_nowhere_else(
    xnat: FakeServer, elsewhere: FakeServer, status: int
) -> None:
    xnat.routes[("POST", "/data/JSESSION")] = _redirect(f"{elsewhere.url}/steal", status)
    with _client(xnat.url) as client, pytest.raises(XnatError, match="another origin; refusing"):
        client.login()
    assert elsewhere.seen == []
    assert xnat.seen[0].headers["Authorization"].startswith("Basic ")


def test_a_redirect_chain_that_leaves_later_is_refused(
    xnat: FakeServer, elsewhere: FakeServer
) -> None:
    xnat.routes[("GET", "/data/projects")] = _redirect("/data/projects/")
    xnat.routes[("GET", "/data/projects/")] = _redirect(f"//127.0.0.1:{elsewhere.server_port}/x")
    with _client(xnat.url) as client, pytest.raises(XnatError) as caught:
        client.get_json("/data/projects", "the projects")
    assert f"to http://127.0.0.1:{elsewhere.server_port}/x: another origin" in caught.value.message
    assert elsewhere.seen == []


def test_same_origin_redirects_are_followed_with_the_session(xnat: FakeServer) -> None:
    # Tomcat's trailing-slash redirect, absolute or relative.
    xnat.routes[("GET", "/data/projects")] = _redirect(f"{xnat.url}/data/projects/?format=json")
    xnat.routes[("GET", "/data/projects/")] = (
        200,
        {"Content-Type": "application/json"},
        PROJECTS,
    )
    with _client(xnat.url) as client:
        assert client.listing("/data/projects", "the projects")[0]["ID"] == "P1"
    gets = [s for s in xnat.seen if s.method == "GET"]
    assert [s.path for s in gets] == ["/data/projects?format=json", "/data/projects/?format=json"]
    assert all(s.headers.get("Cookie") == f"JSESSIONID={SESSION}" for s in gets)
    assert all("Authorization" not in s.headers for s in gets)


def test_a_307_repeats_an_upload_whole_on_the_same_server(xnat: FakeServer, tmp_path: Path) -> None:
    xnat.routes[("PUT", "/data/files/a.txt")] = _redirect("/xnat/data/files/a.txt", 307)
    xnat.routes[("PUT", "/xnat/data/files/a.txt")] = (200, {}, b"")
    payload = tmp_path / "a.txt"
    payload.write_bytes(b"x" * 100_000)
    with _client(xnat.url) as client, open(payload, "rb") as fh:
        client.request("PUT", "/data/files/a.txt", "uploading a.txt", data=fh)
    puts = [s for s in xnat.seen if s.method == "PUT"]
    assert [len(s.body) for s in puts] == [100_000, 100_000]


def test_a_redirect_loop_ends(xnat: FakeServer) -> None:
    xnat.routes[("GET", "/data/projects")] = _redirect("/data/projects")
    with _client(xnat.url) as client, pytest.raises(XnatError, match="more than 5 times"):
        client.get_json("/data/projects", "the projects")


def test_ending_a_cached_session_follows_no_redirect_elsewhere(
    xnat: FakeServer, elsewhere: FakeServer
) -> None:
    xnat.routes[("DELETE", "/data/JSESSION")] = _redirect(f"{elsewhere.url}/steal", 307)
    with _client(xnat.url) as client, pytest.raises(XnatError, match="could not end a session"):
        client.end_session("SID-OF-A-CHAIN-JOB")
    assert elsewhere.seen == []
    assert xnat.seen[-1].headers["Cookie"] == "JSESSIONID=SID-OF-A-CHAIN-JOB"


def test_netrc_adds_no_password_to_requests_after_the_login(
    xnat: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login alice password {PASSWORD}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    with _client(xnat.url) as client:
        client.get_json("/data/projects", "the projects")
        client.whoami()
    assert [s.method for s in xnat.seen if "Authorization" in s.headers] == ["POST"]


def test_the_cli_says_it_in_one_line_and_leaks_nothing(
    xnat: FakeServer, elsewhere: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    xnat.routes[("GET", "/data/projects")] = _redirect(f"{elsewhere.url}/steal")
    monkeypatch.setenv("HPCBRIDGE_XNAT", xnat.url)
    monkeypatch.setenv("HPCBRIDGE_USER", "alice")
    monkeypatch.setenv("HPCBRIDGE_PASSWORD", PASSWORD)
    result = CliRunner().invoke(main, ["ls"])
    assert result.exit_code == 1, result.output
    assert result.stderr == (
        f"hpcbridge: error: XNAT at {xnat.url} redirected GET /data/projects to "
        f"{elsewhere.url}/steal: another origin; refusing to follow it with your credentials "
        "(tell the XNAT administrators)\n"
    )
    assert PASSWORD not in result.output and SESSION not in result.output
    assert elsewhere.seen == []
    _no_secrets(elsewhere.seen)


# -- TLS ---------------------------------------------------------------------------------------


@dataclass
class Pki:
    """A CA of the test's own, and leaf certificates it (or nobody) signed, as PEM files."""

    folder: Path
    ca_key: Any = None
    ca_cert: Any = None
    made: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ca_key, self.ca_cert = self._cert("hpcbridge test CA", None, ca=True)
        self.ca = self._write("ca.pem", self.ca_cert)

    def _cert(
        self,
        name: str,
        issuer: tuple[Any, Any] | None,
        *,
        ca: bool = False,
        dns: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
        days: tuple[int, int] = (-1, 30),
    ) -> tuple[Any, Any]:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        signer_key, signer = issuer if issuer else (key, None)
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(signer.subject if signer else subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now + datetime.timedelta(days=days[0]))
            .not_valid_after(now + datetime.timedelta(days=days[1]))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            builder = builder.add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            builder = builder.add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
        else:
            names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
            names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        if signer is not None:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()),
                critical=False,
            )
        return key, builder.sign(signer_key, hashes.SHA256())

    def _write(self, name: str, *certs: Any, key: Any = None) -> Path:
        from cryptography.hazmat.primitives import serialization

        path = self.folder / name
        pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
        if key is not None:
            pem = (
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
                + pem
            )
        path.write_bytes(pem)
        return path

    def server(
        self,
        *,
        signed: bool = True,
        chain: bool = True,
        dns: tuple[str, ...] = ("localhost",),
        ips: tuple[str, ...] = ("127.0.0.1",),
        days: tuple[int, int] = (-1, 30),
    ) -> FakeServer:
        """A fake XNAT over https with a leaf certificate as asked (sent with the CA when
        ``chain``, as most servers send their intermediate)."""
        issuer = (self.ca_key, self.ca_cert) if signed else None
        key, cert = self._cert("xnat", issuer, dns=dns, ips=ips, days=days)
        certs = (cert, self.ca_cert) if signed and chain else (cert,)
        pem = self._write(f"leaf-{len(self.made)}.pem", *certs, key=key)
        self.made[pem.name] = pem
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pem)
        return _as_xnat(FakeServer(tls=context))


@pytest.fixture()
def pki(tmp_path: Path) -> Pki:
    pytest.importorskip("cryptography", reason="the TLS tests make certificates with it")
    folder = tmp_path / "pki"
    folder.mkdir()
    return Pki(folder)


@pytest.fixture()
def servers() -> Iterator[list[FakeServer]]:
    started: list[FakeServer] = []
    yield started
    for server in started:
        server.stop()


def _tls_failure(url: str, **kwargs: Any) -> XnatConnectionError:
    with _client(url, **kwargs) as client, pytest.raises(XnatConnectionError) as caught:
        client.whoami()
    assert "\n" not in str(caught.value)
    return caught.value


UNTRUSTED_HINT = (
    "set ca_bundle in the profile to your site's CA file; see docs/troubleshooting.md#tls"
)


def test_a_site_ca_is_named_whole_and_ca_bundle_fixes_it(
    pki: Pki, servers: list[FakeServer]
) -> None:
    server = pki.server()
    servers.append(server)
    host = f"127.0.0.1:{server.server_port}"
    error = _tls_failure(server.url)
    assert error.message == (
        f"cannot verify the TLS certificate of {host}: self-signed certificate in certificate chain"
    )
    assert error.hint == UNTRUSTED_HINT
    with _client(server.url, verify=str(pki.ca)) as client:
        assert client.whoami() == "alice"


def test_a_leaf_without_its_chain_and_a_self_signed_one(
    pki: Pki, servers: list[FakeServer]
) -> None:
    servers += [pki.server(chain=False), pki.server(signed=False)]
    first, second = (_tls_failure(s.url) for s in servers)
    assert first.message.endswith(": unable to get local issuer certificate")
    assert second.message.endswith(f":{servers[1].server_port}: self-signed certificate")
    assert first.hint == second.hint == UNTRUSTED_HINT


def test_a_certificate_for_another_name(pki: Pki, servers: list[FakeServer]) -> None:
    server = pki.server(dns=("xnat.example.org",), ips=())
    servers.append(server)
    port = server.server_port
    by_ip = _tls_failure(server.url, verify=str(pki.ca))
    assert by_ip.message == (
        f"cannot verify the TLS certificate of 127.0.0.1:{port}: the certificate is not for "
        "that name (IP address mismatch, certificate is not valid for '127.0.0.1')"
    )
    by_name = _tls_failure(f"https://localhost:{port}", verify=str(pki.ca))
    assert by_name.message.endswith("(Hostname mismatch, certificate is not valid for 'localhost')")
    assert by_name.hint == (
        "use the host name the certificate names in the XNAT URL; see docs/troubleshooting.md#tls"
    )


def test_an_expired_certificate(pki: Pki, servers: list[FakeServer]) -> None:
    server = pki.server(days=(-30, -1))
    servers.append(server)
    error = _tls_failure(server.url, verify=str(pki.ca))
    assert error.message.endswith(f":{server.server_port}: certificate has expired")
    assert error.hint == (
        "the XNAT administrators must renew it, or this machine's clock is wrong; "
        "see docs/troubleshooting.md#tls"
    )


def test_https_to_a_plain_http_port(xnat: FakeServer) -> None:
    url = xnat.url.replace("http://", "https://")
    error = _tls_failure(url)
    assert error.message.startswith(f"the TLS handshake with 127.0.0.1:{xnat.server_port} failed: ")
    assert "_ssl.c" not in error.message and "[SSL" not in error.message
    assert error.hint and "speaks https at that port" in error.hint


def _settings_env(monkeypatch: pytest.MonkeyPatch, url: str, **more: str) -> None:
    monkeypatch.setenv("HPCBRIDGE_XNAT", url)
    monkeypatch.setenv("HPCBRIDGE_USER", "alice")
    monkeypatch.setenv("HPCBRIDGE_PASSWORD", PASSWORD)
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(var, raising=False)
    for var, value in more.items():
        monkeypatch.setenv(var, value)


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_ca_bundle_from_the_profile_or_requests_variable(
    pki: Pki, servers: list[FakeServer], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    server = pki.server()
    servers.append(server)
    (tmp_path / "other").mkdir()
    other = Pki(tmp_path / "other").ca  # a CA that did not sign the server
    for env, works in [
        ({"HPCBRIDGE_CA_BUNDLE": str(pki.ca)}, True),
        ({"REQUESTS_CA_BUNDLE": str(pki.ca)}, True),
        ({"CURL_CA_BUNDLE": str(pki.ca)}, True),
        # The profile's CA wins over a site-wide REQUESTS_CA_BUNDLE (requests would let the
        # variable override a session's CA bundle).
        ({"HPCBRIDGE_CA_BUNDLE": str(pki.ca), "REQUESTS_CA_BUNDLE": str(other)}, True),
        # ...and over verify_tls = false (requests would turn the check back on).
        ({"HPCBRIDGE_VERIFY_TLS": "false", "REQUESTS_CA_BUNDLE": str(other)}, True),
        ({"REQUESTS_CA_BUNDLE": str(other)}, False),
    ]:
        _settings_env(monkeypatch, server.url, **env)
        for var in {"HPCBRIDGE_CA_BUNDLE", "HPCBRIDGE_VERIFY_TLS"} - set(env):
            monkeypatch.delenv(var, raising=False)
        with connect(load_settings(), cache_session=False) as client:
            if works:
                assert client.whoami() == "alice", env
            else:
                with pytest.raises(XnatConnectionError, match="cannot verify the TLS"):
                    client.whoami()


def test_the_cli_prints_the_whole_reason(
    pki: Pki, servers: list[FakeServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = pki.server()
    servers.append(server)
    _settings_env(monkeypatch, server.url)
    result = CliRunner().invoke(main, ["ls"])
    assert result.exit_code == 1
    assert result.stderr == (
        f"hpcbridge: error: cannot verify the TLS certificate of 127.0.0.1:{server.server_port}: "
        f"self-signed certificate in certificate chain ({UNTRUSTED_HINT})\n"
    )
    monkeypatch.setenv("HPCBRIDGE_CA_BUNDLE", str(pki.ca))
    result = CliRunner().invoke(main, ["ls"])
    assert result.exit_code == 0, result.output
    assert "P1" in result.stdout


def test_a_proxy_failure_is_told_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = FakeServer()  # answers CONNECT with 501, as a proxy that refuses tunnels
    try:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        with _client("https://xnat.example.org", retries=0) as client:
            with pytest.raises(XnatConnectionError) as caught:
                client.whoami()
    finally:
        proxy.stop()
    assert caught.value.message == (
        "cannot reach XNAT at https://xnat.example.org: Tunnel connection failed: "
        "501 Unsupported method ('CONNECT')"
    )
