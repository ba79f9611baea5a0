"""Settings refuse what would crash later or leak: bad numbers and booleans, credentials inside
the XNAT URL, plain http to another machine, a CA bundle that is not there.

Every refusal is one ConfigError line that names the key and where it came from, and never
quotes a secret.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from hpcbridge.cli import hints
from hpcbridge.config import display_url, load_settings
from hpcbridge.errors import ConfigError

SECRET = "s3cr3t-Pa55"


def _load(tmp_path: Path, env: dict[str, str] | None = None, toml: str | None = None):
    path = tmp_path / "config.toml"
    if toml is not None:
        name = re.search(r"\[profiles\.(\w+)\]", toml)
        path.write_text(f'default_profile = "{name.group(1)}"\n{toml}' if name else toml)
    return load_settings(config_path=path, environ=env or {})


def _refused(tmp_path: Path, env: dict[str, str] | None = None, toml: str | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, env, toml)
    # The line the command line prints: a next step that names a command is worded there.
    text = hints.line(caught.value)
    assert "\n" not in text
    return text


# -- numbers ----------------------------------------------------------------------------------

BAD_SECONDS = ["nan", "NaN", "-1", "0", "-0.0", "inf", "-inf", "1e309", "1e400", "abc", "9" * 400]


@pytest.mark.parametrize("key", ["timeout", "poll_interval"])
@pytest.mark.parametrize("value", BAD_SECONDS)
def test_bad_seconds_from_the_environment_are_one_line(
    tmp_path: Path, key: str, value: str
) -> None:
    var = f"HPCBRIDGE_{key.upper()}"
    text = _refused(tmp_path, {var: value})
    assert text == (
        f"environment {var}: {key} must be a number of seconds above 0 and at most 86400, "
        f"not {value!r}"
    )


@pytest.mark.parametrize(
    "value", ["nan", "inf", "-5", "0", "1e12", '""', '"abc"', "true", "[1]", "{a = 1}"]
)
def test_bad_seconds_in_the_config_file_name_file_and_profile(tmp_path: Path, value: str) -> None:
    # TOML itself has nan and inf; a bool is an int to Python but never a timeout.
    text = _refused(tmp_path, toml=f"[profiles.lab]\ntimeout = {value}\n", env={})
    assert text.startswith(f"{tmp_path / 'config.toml'} [profiles.lab]: timeout must be a number")
    assert "above 0 and at most 86400" in text


@pytest.mark.parametrize("key", ["local_max_jobs", "max_queued"])
@pytest.mark.parametrize(
    "value", ["0", "-3", "2.5", "1e3", "abc", "nan", "99999999999", "9" * 5000]
)
def test_bad_whole_numbers_are_refused_with_their_range(
    tmp_path: Path, key: str, value: str
) -> None:
    var = f"HPCBRIDGE_{key.upper()}"
    text = _refused(tmp_path, {var: value})
    high = 1024 if key == "local_max_jobs" else 100000
    assert text.startswith(f"environment {var}: {key} must be a whole number from 1 to {high}")


@pytest.mark.parametrize("value", ["2.5", "true", "0", "inf", "1e9"])
def test_whole_numbers_in_toml_are_whole(tmp_path: Path, value: str) -> None:
    text = _refused(tmp_path, toml=f"[profiles.lab]\nmax_queued = {value}\n")
    assert "max_queued must be a whole number from 1 to 100000" in text


def test_good_numbers_still_load(tmp_path: Path) -> None:
    env = {
        "HPCBRIDGE_TIMEOUT": " 15 ",
        "HPCBRIDGE_POLL_INTERVAL": "0.2",
        "HPCBRIDGE_LOCAL_MAX_JOBS": "4",
        "HPCBRIDGE_MAX_QUEUED": "100000",
        "HPCBRIDGE_TRANSFER_WALLTIME": "48:00:00",
    }
    s = _load(tmp_path, env)
    assert (s.timeout, s.poll_interval, s.local_max_jobs, s.max_queued) == (15.0, 0.2, 4, 100000)
    assert s.transfer_walltime == "48:00:00"
    s = _load(tmp_path, toml="[profiles.x]\nmax_queued = 20.0\ntimeout = 86400\n")
    assert (s.max_queued, s.timeout) == (20, 86400.0)


@pytest.mark.parametrize("value", ["99999999999:00:00", "8761:00:00", "00:00:00", "2h", "3600"])
def test_transfer_walltime_has_a_range(tmp_path: Path, value: str) -> None:
    text = _refused(tmp_path, {"HPCBRIDGE_TRANSFER_WALLTIME": value})
    assert "transfer_walltime must be a walltime like 01:00:00, above zero and at most 8760" in text


def test_an_integer_walltime_in_toml_is_refused(tmp_path: Path) -> None:
    text = _refused(tmp_path, toml="[profiles.x]\ntransfer_walltime = 3600\n")
    assert "transfer_walltime must be a walltime like 01:00:00" in text


def test_an_empty_environment_variable_counts_as_unset(tmp_path: Path) -> None:
    assert _load(tmp_path, {"HPCBRIDGE_TIMEOUT": "", "HPCBRIDGE_MAX_QUEUED": ""}).timeout == 60.0


# -- booleans ---------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["verify_tls", "allow_insecure_http"])
@pytest.mark.parametrize("value", ["maybe", "2", "tru", "yes please", "-1", "nan"])
def test_bad_booleans_are_refused(tmp_path: Path, key: str, value: str) -> None:
    var = f"HPCBRIDGE_{key.upper()}"
    assert _refused(tmp_path, {var: value}) == (
        f"environment {var}: {key} must be true or false, not {value!r}"
    )


@pytest.mark.parametrize("value", ["2", '"maybe"', "1.5", "[]"])
def test_bad_booleans_in_toml_are_refused(tmp_path: Path, value: str) -> None:
    text = _refused(tmp_path, toml=f"[profiles.x]\nverify_tls = {value}\n")
    assert "[profiles.x]: verify_tls must be true or false" in text


# -- credentials in the XNAT URL ----------------------------------------------------------------

CREDENTIAL_URLS = [
    f"https://alice:{SECRET}@xnat.example.org",
    f"https://alice:{SECRET}@xnat.example.org/xnat/",
    "https://alice@xnat.example.org",
    f"https://:{SECRET}@xnat.example.org",
    # '@', '/', '?' and '#' in the password move a URL parser's idea of the host.
    f"https://alice:{SECRET}@/x@xnat.example.org",
    f"https://alice:{SECRET}/x@xnat.example.org",
    f"https://alice:{SECRET}?#@xnat.example.org",
    f"alice:{SECRET}@xnat.example.org",
    f"ftp://alice:{SECRET}@xnat.example.org",
    f"HTTPS://ALICE:{SECRET}@XNAT.EXAMPLE.ORG",
]


@pytest.mark.parametrize("url", CREDENTIAL_URLS)
@pytest.mark.parametrize("var", ["HPCBRIDGE_XNAT", "XNAT_HOST"])
def test_credentials_in_the_url_are_refused_without_quoting_them(
    tmp_path: Path, url: str, var: str
) -> None:
    text = _refused(tmp_path, {var: url})
    assert SECRET not in text and SECRET.lower() not in text.lower()
    assert "alice" not in text.lower()
    assert text.startswith(f"environment {var}: the XNAT URL ")
    assert "contains credentials (give the user name with --user" in text
    assert "`hpcbridge login`" in text


@pytest.mark.parametrize("url", CREDENTIAL_URLS[:4])
def test_credentials_in_the_config_file_are_refused(tmp_path: Path, url: str) -> None:
    text = _refused(tmp_path, toml=f'[profiles.lab]\nxnat = "{url}"\n')
    assert text.startswith(f"{tmp_path / 'config.toml'} [profiles.lab]: the XNAT URL https://***@")
    assert SECRET not in text and "alice" not in text


@pytest.mark.parametrize(
    "url",
    [f"https://xnat.example.org/?token={SECRET}", f"https://xnat.example.org/xnat#{SECRET}"],
)
def test_a_query_or_fragment_is_refused_without_quoting_it(tmp_path: Path, url: str) -> None:
    text = _refused(tmp_path, {"HPCBRIDGE_XNAT": url})
    assert SECRET not in text
    assert "has a query or fragment" in text


def test_display_url_masks_everything_before_the_last_at() -> None:
    assert display_url(f"https://a:{SECRET}@h.org/x?t={SECRET}") == "https://***@h.org/x"
    assert display_url(f"https://a:p@{SECRET}@h.org") == "https://***@h.org"
    assert display_url("https://h.org/xnat") == "https://h.org/xnat"


# -- plain http ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://xnat.example.org",
        "HTTP://XNAT.EXAMPLE.ORG:8080/xnat",
        "http://127.0.0.1.evil.example",
        "http://localhost.evil.example",
        "http://10.0.0.7:8080",
        "http://0.0.0.0:8080",
        "http://[::ffff:7f00:1]:8080",
        "http://[fe80::1]:8080",
    ],
)
def test_plain_http_to_another_machine_needs_the_opt_in(tmp_path: Path, url: str) -> None:
    text = _refused(tmp_path, {"HPCBRIDGE_XNAT": url})
    assert text.lower().startswith(f"environment hpcbridge_xnat: {url.lower()} ")
    assert "would carry your password and token in clear text" in text
    assert "set allow_insecure_http = true in the profile" in text
    s = _load(tmp_path, {"HPCBRIDGE_XNAT": url, "HPCBRIDGE_ALLOW_INSECURE_HTTP": "true"})
    assert s.xnat == url and s.allow_insecure_http is True


def test_the_opt_in_is_a_profile_key(tmp_path: Path) -> None:
    toml = '[profiles.old]\nxnat = "http://xnat.example.org"\nallow_insecure_http = true\n'
    assert _load(tmp_path, toml=toml).allow_insecure_http is True
    text = _refused(tmp_path, toml='[profiles.old]\nxnat = "http://xnat.example.org"\n')
    assert text.startswith(f"{tmp_path / 'config.toml'} [profiles.old]: http://xnat.example.org")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080",
        "http://127.5.6.7",
        "http://localhost:1",
        "http://LOCALHOST.:8080/xnat",
        "http://[::1]:8080",
        "https://xnat.example.org",
        "sandbox",
    ],
)
def test_loopback_http_and_https_need_no_opt_in(tmp_path: Path, url: str) -> None:
    assert _load(tmp_path, {"HPCBRIDGE_XNAT": url}).xnat == url


# -- TLS settings ---------------------------------------------------------------------------------


def test_ca_bundle_must_exist_and_be_readable(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "ca.pem"
    text = _refused(tmp_path, {"HPCBRIDGE_CA_BUNDLE": str(missing)})
    assert text == (
        "environment HPCBRIDGE_CA_BUNDLE: ca_bundle must be a readable PEM file of CA "
        f"certificates, or a folder of them: {missing} does not exist"
    )
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    if os.geteuid() != 0:  # root reads anything
        ca.chmod(0)
        assert "is not readable by you" in _refused(tmp_path, {"HPCBRIDGE_CA_BUNDLE": str(ca)})
        ca.chmod(0o644)
    s = _load(tmp_path, toml=f'[profiles.x]\nca_bundle = "{ca}"\n')
    assert s.ca_bundle == str(ca) and s.tls_verify == str(ca)


def test_requests_ca_bundle_is_honoured_below_the_profile(tmp_path: Path) -> None:
    site, own = tmp_path / "site.pem", tmp_path / "own.pem"
    site.write_text("x")
    own.write_text("x")
    s = _load(tmp_path, {"REQUESTS_CA_BUNDLE": str(site)})
    assert s.tls_verify == str(site) and s.sources["ca_bundle"] == "environment REQUESTS_CA_BUNDLE"
    s = _load(tmp_path, {"CURL_CA_BUNDLE": str(site)})
    assert s.tls_verify == str(site)
    s = _load(
        tmp_path, {"REQUESTS_CA_BUNDLE": str(site)}, toml=f'[profiles.x]\nca_bundle = "{own}"\n'
    )
    assert s.tls_verify == str(own)
    (tmp_path / "config.toml").unlink()
    # verify_tls = false means no check at all, whatever requests' variables say.
    s = _load(tmp_path, {"REQUESTS_CA_BUNDLE": str(site), "HPCBRIDGE_VERIFY_TLS": "false"})
    assert s.tls_verify is False
    text = _refused(tmp_path, {"REQUESTS_CA_BUNDLE": str(tmp_path / "gone.pem")})
    assert text.startswith("environment REQUESTS_CA_BUNDLE: ca_bundle must be a readable PEM")
    assert _load(tmp_path).tls_verify is True


# -- through the command line --------------------------------------------------------------------


def _cli(*args: str, env: dict[str, str] | None = None, input: str | None = None):
    from click.testing import CliRunner

    from hpcbridge.cli import main

    return CliRunner().invoke(main, list(args), env=env, input=input)


def _one_line_usage_error(result, *must: str, prompted: bool = False) -> str:
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert prompted or result.stdout == ""  # the runner echoes what a prompt was answered
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpcbridge: error: "), result.stderr
    for text in must:
        assert text in lines[0]
    return lines[0]


SERVER = {"HPCBRIDGE_XNAT": "https://xnat.invalid", "HPCBRIDGE_USER": "alice"}


@pytest.mark.parametrize(
    ("var", "value", "key"),
    [
        ("HPCBRIDGE_TIMEOUT", "nan", "timeout"),
        ("HPCBRIDGE_TIMEOUT", "-1", "timeout"),
        ("HPCBRIDGE_TIMEOUT", "0", "timeout"),
        ("HPCBRIDGE_TIMEOUT", "inf", "timeout"),
        ("HPCBRIDGE_TIMEOUT", "1e300", "timeout"),
        ("HPCBRIDGE_TIMEOUT", "abc", "timeout"),
        ("HPCBRIDGE_POLL_INTERVAL", "nan", "poll_interval"),
        ("HPCBRIDGE_LOCAL_MAX_JOBS", "0", "local_max_jobs"),
        ("HPCBRIDGE_MAX_QUEUED", "-5", "max_queued"),
        ("HPCBRIDGE_TRANSFER_WALLTIME", "99999999999:00:00", "transfer_walltime"),
        ("HPCBRIDGE_VERIFY_TLS", "maybe", "verify_tls"),
        ("HPCBRIDGE_ALLOW_INSECURE_HTTP", "sure", "allow_insecure_http"),
    ],
)
@pytest.mark.parametrize("command", [["ls"], ["config", "show"]])
def test_a_bad_setting_is_one_line_and_exit_2(
    var: str, value: str, key: str, command: list[str]
) -> None:
    result = _cli(*command, env={**SERVER, var: value, "HPCBRIDGE_PASSWORD": SECRET})
    _one_line_usage_error(result, f"environment {var}: {key} must be ", repr(value))


@pytest.mark.parametrize("value", ["nan", "-1", '""', "true"])
def test_a_bad_setting_in_the_file_is_one_line_and_exit_2(tmp_path: Path, value: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f'[profiles.lab]\nxnat = "https://xnat.invalid"\ntimeout = {value}\n')
    result = _cli("--config", str(path), "--profile", "lab", "ls")
    _one_line_usage_error(result, f"{path} [profiles.lab]: timeout must be a number of seconds")


@pytest.mark.parametrize("url", CREDENTIAL_URLS[:3] + [f"https://x.example.org/?t={SECRET}"])
@pytest.mark.parametrize(
    "how",
    ["HPCBRIDGE_XNAT", "XNAT_HOST", "file", "config init", "config init (asked)", "login"],
)
def test_a_url_with_credentials_is_refused_everywhere_it_is_read(
    tmp_path: Path, url: str, how: str
) -> None:
    config = tmp_path / "config.toml"
    env = {"HPCBRIDGE_CONFIG": str(config), "HPCBRIDGE_PASSWORD": SECRET}
    if how in ("HPCBRIDGE_XNAT", "XNAT_HOST"):
        result = _cli("config", "show", env={**env, how: url})
    elif how == "file":
        config.write_text(f'default_profile = "lab"\n[profiles.lab]\nxnat = "{url}"\n')
        result = _cli("config", "show", env=env)
    elif how == "config init":
        result = _cli("config", "init", "--xnat", url, env=env)
    elif how == "config init (asked)":
        with pytest.MonkeyPatch.context() as mp:
            # What config init asks of the terminal; the runner's stdin answers the prompt.
            terminal = SimpleNamespace(stdin=SimpleNamespace(isatty=lambda: True))
            mp.setattr("hpcbridge.cli.config.sys", terminal)
            result = _cli("config", "init", "--user", "bob", env=env, input=f"{url}\n")
    else:
        result = _cli("login", "--xnat", url, "--password-stdin", env=env, input=SECRET + "\n")
    asked = how == "config init (asked)"
    line = _one_line_usage_error(result, prompted=asked)
    shown = result.stderr if asked else result.output
    assert SECRET not in shown and "alice" not in shown
    assert "contains credentials" in line or "has a query or fragment" in line
    if how.startswith("config init"):
        assert not config.exists() or "xnat" not in config.read_text()


def test_a_stored_login_server_with_credentials_is_refused(isolated_home: Path) -> None:
    from hpcbridge.credentials import TokenStore

    # What `hpcbridge login --xnat https://alice:...@host` stored before it was refused.
    store = TokenStore.under(isolated_home)
    store.put(f"https://alice:{SECRET}@xnat.example.org", user="alice", alias="a", secret="s",
              expires=None)  # fmt: skip
    result = _cli("whoami")
    line = _one_line_usage_error(result)
    assert line == (
        f"hpcbridge: error: {store.path} (the server of the last login): the XNAT URL "
        "https://***@xnat.example.org contains credentials (give the user name with --user or "
        "the profile's `user`, and the password to `hpcbridge login`, which asks for it)"
    )


@pytest.mark.parametrize("url", ["http://xnat.example.org", "http://10.1.2.3:8080/xnat"])
def test_plain_http_is_refused_by_login_and_config_init(tmp_path: Path, url: str) -> None:
    env = {"HPCBRIDGE_CONFIG": str(tmp_path / "c.toml")}
    for args in (["login", "--xnat", url, "--password-stdin"], ["config", "init", "--xnat", url]):
        result = _cli(*args, env=env, input=SECRET + "\n")
        _one_line_usage_error(
            result, f"option --xnat: {url} would carry your password and token in clear text"
        )
    result = _cli("config", "init", "--xnat", url, "--allow-insecure-http", env=env)
    assert result.exit_code == 0, result.output
    assert "allow_insecure_http = true" in (tmp_path / "c.toml").read_text()
    shown = _cli("config", "show", env=env)
    assert shown.exit_code == 0 and url in shown.stdout


# -- SSH destinations: keys only, so a password in one is refused unquoted ---------------------

SSH_WITH_PASSWORD = [
    f"ssh://alice:{SECRET}@login.example.org",
    f"ssh://alice:{SECRET}@login.example.org:2222",
    f"alice:{SECRET}@login.example.org",
    f"alice:{SECRET}@[::1]:22",
    f"ssh://alice:{SECRET}/x@login.example.org",
]


@pytest.mark.parametrize("host", SSH_WITH_PASSWORD)
def test_a_password_in_the_ssh_destination_is_refused_without_quoting_it(
    tmp_path: Path, host: str
) -> None:
    text = _refused(tmp_path, {"HPCBRIDGE_HOST": host})
    assert SECRET not in text
    assert text.startswith("environment HPCBRIDGE_HOST: the SSH destination ")
    assert "contains a password" in text
    text = _refused(tmp_path, toml=f'[profiles.lab]\nhost = "{host}"\n')
    assert SECRET not in text and "[profiles.lab]" in text


@pytest.mark.parametrize(
    "host", ["login.example.org", "alice@login.example.org:22", "ssh://alice@h:2222", "[::1]:22"]
)
def test_ssh_destinations_without_a_password_still_load(tmp_path: Path, host: str) -> None:
    assert _load(tmp_path, {"HPCBRIDGE_HOST": host}).host == host


def test_config_show_never_prints_an_ssh_password() -> None:
    result = _cli(
        "--profile", "sandbox", "config", "show", env={"HPCBRIDGE_HOST": SSH_WITH_PASSWORD[0]}
    )
    assert result.exit_code == 2
    assert SECRET not in result.output
