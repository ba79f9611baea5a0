"""Where credentials come from, in order, and the private files that hold them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from hpcbridge.credentials import SessionCache, TokenStore, resolve, server_key
from hpcbridge.errors import CredentialError

URL = "https://XNAT.example.org/xnat/"


@pytest.fixture()
def netrc_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "netrc"
    path.write_text("machine xnat.example.org login nina password from-netrc\n")
    path.chmod(0o600)
    monkeypatch.setenv("NETRC", str(path))
    return path


def test_server_key_is_one_spelling() -> None:
    assert (
        server_key(URL)
        == server_key("https://xnat.example.org/xnat")
        == ("https://xnat.example.org/xnat")
    )


def test_order_token_then_environment_then_netrc(tmp_path: Path, netrc_file: Path) -> None:
    env = {"HPCBRIDGE_PASSWORD": "from-env"}
    assert resolve(URL, user=None, home=tmp_path, environ=env).source == "netrc"
    assert resolve(URL, user="eve", home=tmp_path, environ=env).secret == "from-env"
    assert resolve(URL, user="eve", home=tmp_path, environ={"XNAT_PASS": "x"}).secret == "x"
    TokenStore.under(tmp_path).put(URL, user="eve", alias="a-1", secret="tok", expires=None)
    found = resolve(URL, user="eve", home=tmp_path, environ=env)
    assert (found.source, found.user, found.secret, found.owner) == ("token", "a-1", "tok", "eve")
    # A token stored for another user is not used for this one.
    assert resolve(URL, user="bob", home=tmp_path, environ=env).secret == "from-env"


def test_netrc_user_must_match(tmp_path: Path, netrc_file: Path) -> None:
    assert resolve(URL, user="nina", home=tmp_path, environ={}).secret == "from-netrc"
    assert resolve(URL, user="other", home=tmp_path, environ={}) is None


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_readable_files_are_refused(tmp_path: Path, netrc_file: Path, mode: int) -> None:
    netrc_file.chmod(mode)
    with pytest.raises(CredentialError, match=f"mode {mode:04o}") as err:
        resolve(URL, user=None, home=tmp_path, environ={})
    assert err.value.hint == f"run `chmod 600 {netrc_file}`"
    store = TokenStore.under(tmp_path)
    store.put(URL, user="eve", alias="a", secret="s", expires=1)
    store.path.chmod(mode)
    with pytest.raises(CredentialError, match="readable by other users"):
        store.get(URL)


def test_files_are_written_private_and_atomically(tmp_path: Path) -> None:
    home = tmp_path / "home"
    store = TokenStore.under(home)
    store.put(URL, user="eve", alias="a", secret="s", expires=123)
    assert oct(store.path.stat().st_mode & 0o777) == "0o600"
    assert oct(home.stat().st_mode & 0o777) == "0o700"
    assert json.loads(store.path.read_text())["default"] == server_key(URL)
    assert store.default_server() == server_key(URL)
    assert not list(home.glob(".*part"))
    cache = SessionCache.under(home)
    cache.put(URL, "eve", "ABCDEF")
    assert cache.get(URL, "eve") == "ABCDEF" and cache.get(URL, "bob") is None
    files = list((home / "sessions").iterdir())
    assert len(files) == 1 and oct(files[0].stat().st_mode & 0o777) == "0o600"
    assert store.delete(URL) and store.get(URL) is None and store.default_server() is None


def test_token_expiry_is_known(tmp_path: Path) -> None:
    store = TokenStore.under(tmp_path)
    store.put(
        URL, user="eve", alias="a", secret="tok-SECRET-9", expires=int((time.time() - 5) * 1000)
    )
    token = store.get(URL)
    assert token is not None and token.expired()
    assert "tok-SECRET-9" not in repr(token)
