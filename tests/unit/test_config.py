"""Settings resolution: defaults < config file < HPCBRIDGE_* environment < flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpcbridge.config import load_settings
from hpcbridge.errors import ConfigError

CONFIG = """
default_profile = "artemis"

[profiles.artemis]
xnat = "https://xnat.example.org"
user = "alice"
timeout = 30

[profiles.other]
xnat = "https://other.example.org"
"""


@pytest.fixture()
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG)
    return path


def test_defaults_without_any_config(tmp_path: Path) -> None:
    s = load_settings(config_path=tmp_path / "missing.toml", environ={})
    assert s.xnat is None and s.scheduler == "local" and s.timeout == 60.0
    assert s.profile == "default"


def test_file_default_profile_applies(config: Path) -> None:
    s = load_settings(config_path=config, environ={})
    assert (s.profile, s.xnat, s.user, s.timeout) == (
        "artemis",
        "https://xnat.example.org",
        "alice",
        30.0,
    )
    assert s.sources["xnat"] == f"file {config}"


def test_environment_beats_file_and_flags_beat_environment(config: Path) -> None:
    env = {"HPCBRIDGE_USER": "bob", "HPCBRIDGE_TIMEOUT": "5"}
    s = load_settings(config_path=config, environ=env)
    assert (s.user, s.timeout) == ("bob", 5.0)
    assert s.sources["user"] == "environment HPCBRIDGE_USER"
    s = load_settings(config_path=config, environ=env, flags={"user": "carol", "timeout": None})
    assert (s.user, s.timeout) == ("carol", 5.0)
    assert s.sources["user"] == "flag"


def test_profile_chosen_by_flag_or_environment(config: Path) -> None:
    assert (
        load_settings(config_path=config, profile="other", environ={}).xnat
        == "https://other.example.org"
    )
    env = {"HPCBRIDGE_PROFILE": "other"}
    assert load_settings(config_path=config, environ=env).xnat == "https://other.example.org"


def test_builtin_sandbox_profile(tmp_path: Path) -> None:
    s = load_settings(config_path=tmp_path / "none.toml", profile="sandbox", environ={})
    assert (s.xnat, s.scheduler) == ("sandbox", "local")
    assert s.sources["xnat"] == "builtin profile"


def test_unknown_profile_is_a_clear_error(config: Path) -> None:
    with pytest.raises(ConfigError, match="no profile named 'nope'") as err:
        load_settings(config_path=config, profile="nope", environ={})
    assert "artemis" in str(err.value.hint) and "sandbox" in str(err.value.hint)


def test_unknown_key_names_file_and_profile(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[profiles.x]\nxnat = "u"\npasword = "oops"\n')
    with pytest.raises(ConfigError, match=r"profile 'x' has unknown key\(s\) pasword"):
        load_settings(config_path=path, environ={})


def test_bad_toml_and_bad_values(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[profiles.x\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(config_path=path, environ={})
    with pytest.raises(
        ConfigError, match="environment HPCBRIDGE_TIMEOUT: timeout must be a number"
    ):
        load_settings(config_path=tmp_path / "none.toml", environ={"HPCBRIDGE_TIMEOUT": "soon"})
    with pytest.raises(ConfigError, match="verify_tls must be true or false"):
        load_settings(config_path=tmp_path / "none.toml", environ={"HPCBRIDGE_VERIFY_TLS": "maybe"})


@pytest.mark.parametrize(
    "value", ["xnat.example.org", "null", "ftp://xnat.example.org", "https://"]
)
def test_an_xnat_that_is_not_a_url_is_a_config_error(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(config_path=tmp_path / "none.toml", environ={"HPCBRIDGE_XNAT": value})
    assert caught.value.message == (
        "environment HPCBRIDGE_XNAT: xnat must be a URL such as https://xnat.example.org "
        f"(or sandbox), not {value!r}"
    )


def test_urls_and_the_sandbox_are_servers(tmp_path: Path) -> None:
    for value in ("https://xnat.example.org/", "http://127.0.0.1:8080", "sandbox"):
        env = {"HPCBRIDGE_XNAT": value}
        assert load_settings(config_path=tmp_path / "none.toml", environ=env).xnat == value


def test_transfer_walltime_is_checked(tmp_path: Path) -> None:
    env = {"HPCBRIDGE_TRANSFER_WALLTIME": "2h"}
    with pytest.raises(ConfigError, match="transfer_walltime must be a walltime like 01:00:00"):
        load_settings(config_path=tmp_path / "none.toml", environ=env)
    env = {"HPCBRIDGE_TRANSFER_WALLTIME": "02:30:00"}
    assert load_settings(config_path=tmp_path / "none.toml", environ=env).transfer_walltime == (
        "02:30:00"
    )


def test_home_moves_state_and_config(tmp_path: Path) -> None:
    env = {"HPCBRIDGE_HOME": str(tmp_path / "state")}
    s = load_settings(environ=env)
    assert s.home == tmp_path / "state"
