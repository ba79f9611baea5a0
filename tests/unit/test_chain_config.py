"""A chain's transfer jobs talk to XNAT with the TLS and http policy of the run that made them."""

from __future__ import annotations

from pathlib import Path

from hpcbridge.chain import home_of, install_token
from hpcbridge.config import load_settings
from hpcbridge.credentials import Secret
from hpcbridge.transport import LocalTransport

CA = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def _settings(tmp_path: Path, profile: str):
    config = tmp_path / "config.toml"
    config.write_text(profile)
    return load_settings(profile="lab", config_path=config, environ={})


def _chain_settings(root: Path):
    home = Path(home_of(str(root)))
    return load_settings(config_path=home / "config.toml", environ={})


def test_the_profile_ca_file_is_copied_beside_the_chain_config(tmp_path: Path) -> None:
    ca = tmp_path / "site-ca.pem"
    ca.write_text(CA)
    settings = _settings(
        tmp_path,
        f'[profiles.lab]\nxnat = "https://xnat.example.org"\nca_bundle = "{ca}"\n',
    )
    root = tmp_path / "run-1"
    token = Secret("alias", "s3cret", "token", owner="alice")
    install_token(LocalTransport(), str(root), "https://xnat.example.org", token, settings)
    chain = _chain_settings(root)
    assert chain.ca_bundle and Path(chain.ca_bundle).read_text() == CA
    # A copy inside the chain folder, so a cluster without this machine's path still has it.
    assert Path(chain.ca_bundle).parent == Path(home_of(str(root)))
    assert chain.verify_tls is True


def test_an_opted_in_http_server_stays_usable_by_the_transfer_jobs(tmp_path: Path) -> None:
    settings = _settings(
        tmp_path,
        '[profiles.lab]\nxnat = "http://xnat.lab.internal"\nallow_insecure_http = true\n',
    )
    root = tmp_path / "run-2"
    token = Secret("alias", "s3cret", "token", owner="alice")
    install_token(LocalTransport(), str(root), "http://xnat.lab.internal", token, settings)
    chain = _chain_settings(root)
    assert chain.xnat == "http://xnat.lab.internal"
    assert chain.allow_insecure_http is True
