"""SshTransport against a real OpenSSH sshd on loopback, started by this module.

The daemon runs in the foreground (``-D``) as a child of the test process, on a free port, with
its own host key, client key and authorized_keys in a temporary folder, so it is stopped by PID
and never touches the system's sshd. Dropped connections are simulated by killing the
per-connection sshd processes (children of the listener), found with psutil.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from hpcbridge.cli import hints
from hpcbridge.errors import (
    ConfigError,
    HostKeyError,
    SshAuthError,
    SshConnectionError,
    TransportError,
)
from hpcbridge.ssh import SshTransport

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "/usr/bin/ssh-keygen"
SSH_AGENT = "/usr/bin/ssh-agent"
SSH_ADD = "/usr/bin/ssh-add"
IN_CI = os.environ.get("CI", "").lower() == "true"
USER = getpass.getuser()


def _require_sshd() -> None:
    """Skip without the OpenSSH tools or root; fail instead under CI=true (CI must have them)."""
    missing = [
        tool for tool in (SSHD, SSH_KEYGEN, SSH_AGENT, SSH_ADD) if not os.access(tool, os.X_OK)
    ]
    if missing:
        reason = f"{' and '.join(missing)} not installed (apt-get install openssh-server)"
    elif os.geteuid() != 0:
        reason = "a loopback sshd with privilege separation needs root"
    else:
        return
    if IN_CI:
        pytest.fail(f"{reason}, but CI=true requires it")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _keygen(path: Path, passphrase: str = "") -> Path:
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", passphrase, "-C", "hpcbridge-test"]
        + ["-f", str(path)],
        check=True,
        timeout=10,
    )
    return path


def _fingerprint(pub: Path) -> str:
    """The fingerprint as OpenSSH's own ssh-keygen prints it."""
    out = subprocess.run(
        [SSH_KEYGEN, "-l", "-f", str(pub)], capture_output=True, text=True, check=True
    ).stdout
    return out.split()[1]


@dataclass
class Sshd:
    root: Path
    port: int
    proc: subprocess.Popen[bytes]
    client_key: Path
    known_hosts: Path

    @property
    def log(self) -> Path:
        return self.root / "sshd.log"

    @property
    def host_pub(self) -> Path:
        return self.root / "host_ed25519.pub"

    def accepted(self) -> int:
        """How many logins sshd has accepted so far."""
        return self.log.read_text(errors="replace").count("Accepted publickey")

    def kill_sessions(self) -> int:
        """Kill every per-connection process, as if the network or the node dropped them."""
        sessions = psutil.Process(self.proc.pid).children()
        victims = psutil.Process(self.proc.pid).children(recursive=True)
        for victim in victims:  # parents first, so no session reports its command's death
            try:
                victim.kill()
            except psutil.NoSuchProcess:
                pass
        # only the listener's own children: orphaned commands may wait for a slow init to reap
        psutil.wait_procs(sessions, timeout=5)
        return len(sessions)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.kill_sessions()
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def start_sshd(root: Path) -> Sshd:
    _require_sshd()
    root.mkdir(parents=True, exist_ok=True)
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation chroot
    host_key = _keygen(root / "host_ed25519")
    client_key = _keygen(root / "client_ed25519")
    (root / "authorized_keys").write_text(Path(f"{client_key}.pub").read_text())
    port = _free_port()
    config = root / "sshd_config"
    config.write_text(
        f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
PidFile {root}/sshd.pid
AuthorizedKeysFile {root}/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
AllowTcpForwarding yes
MaxStartups 50
Subsystem sftp internal-sftp
LogLevel VERBOSE
"""
    )
    known_hosts = root / "known_hosts"
    host_line = Path(f"{host_key}.pub").read_text().split()
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_line[0]} {host_line[1]}\n")
    proc = subprocess.Popen([SSHD, "-D", "-f", str(config), "-E", str(root / "sshd.log")])
    server = Sshd(root, port, proc, client_key, known_hosts)
    deadline = time.monotonic() + 10
    while True:
        if proc.poll() is not None:
            log = server.log.read_text(errors="replace") if server.log.exists() else ""
            pytest.fail(f"sshd exited with {proc.returncode}: {log[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            if time.monotonic() > deadline:
                server.stop()
                pytest.fail(f"sshd did not listen on port {port} within 10 s")
            time.sleep(0.02)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@pytest.fixture()
def own_sshd(tmp_path: Path) -> Iterator[Sshd]:
    """A daemon of this test's own, for tests that stop it."""
    server = start_sshd(tmp_path / "own-sshd")
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def user_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No real ~/.ssh or agent: what a test gets is what it sets up."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    return home


def write_config(path: Path, server: Sshd, *, key: Path | None = None, extra: str = "") -> Path:
    path.write_text(
        f"""\
Host loop
  HostName 127.0.0.1
  Port {server.port}
  User {USER}
  IdentityFile {key or server.client_key}
  IdentitiesOnly yes
{extra}"""
    )
    return path


def connect(server: Sshd, tmp_path: Path, **kwargs: Any) -> SshTransport:
    kwargs.setdefault("known_hosts", server.known_hosts)
    kwargs.setdefault("connect_timeout", 5.0)
    config = write_config(tmp_path / "ssh_config", server)
    return SshTransport("loop", ssh_config=config, **kwargs)


@pytest.fixture()
def ssh(sshd: Sshd, tmp_path: Path) -> Iterator[SshTransport]:
    with connect(sshd, tmp_path) as transport:
        yield transport


@pytest.fixture()
def agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An ssh-agent of this test's own, in the foreground so it stops by PID."""
    sock = tmp_path / "agent.sock"
    proc = subprocess.Popen([SSH_AGENT, "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "ssh-agent did not start"
            time.sleep(0.01)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        yield sock
    finally:
        proc.terminate()
        proc.wait(timeout=5)


def ssh_add(key: Path) -> None:
    subprocess.run([SSH_ADD, "-q", str(key)], check=True, timeout=10, capture_output=True)


# -- commands ---------------------------------------------------------------------------------


def test_run_reports_exit_code_and_both_streams(ssh: SshTransport) -> None:
    result = ssh.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (result.exit_code, result.stdout, result.stderr) == (3, "out\n", "err\n")
    assert not result.ok
    assert result.argv == ("sh", "-c", "echo out; echo err >&2; exit 3")
    assert ssh.run(["true"]).ok
    missing = ssh.run(["hpcbridge-no-such-command"])
    assert missing.exit_code == 127 and "not found" in missing.stderr
    # killed by a signal: no exit status, but the connection is fine and nothing is re-run
    assert ssh.run(["sh", "-c", "kill -9 $$"]).exit_code == -1
    assert ssh.connections_opened == 1


def test_argv_arrives_intact_through_the_remote_shell(ssh: SshTransport, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    weird = [
        "a b",
        "it's",
        '"double"',
        f"$(touch {marker})",
        f"`touch {marker}`",
        "*",
        "; echo injected",
        "back\\slash",
        "tab\there",
        "",
        "€uro",
    ]
    result = ssh.run(["printf", "%s\\n", *weird]).check("printf")
    assert result.stdout.split("\n")[:-1] == weird
    assert not marker.exists()


def test_stdin_is_fed(ssh: SshTransport) -> None:
    assert ssh.run(["cat"], stdin="hello\nworld").stdout == "hello\nworld"
    assert ssh.run(["cat"]).stdout == ""  # no stdin means end of input, not a hang


def test_big_output_on_both_streams_and_big_stdin(ssh: SshTransport) -> None:
    script = (
        "head -c 1000000 /dev/zero | tr '\\0' e >&2; "
        "head -c 5000000 /dev/zero | tr '\\0' o; "
        "head -c 1000000 /dev/zero | tr '\\0' e >&2"
    )
    result = ssh.run(["sh", "-c", script], timeout=30).check("big output")
    assert result.stdout == "o" * 5_000_000
    assert result.stderr == "e" * 2_000_000
    # cat writes while we still send: stdin and stdout must flow at the same time
    data = "0123456789abcde\n" * 200_000
    echoed = ssh.run(["sh", "-c", "cat; echo done >&2"], stdin=data, timeout=30)
    assert echoed.stdout == data and echoed.stderr == "done\n"


def test_command_timeout_closes_the_channel_and_keeps_the_connection(ssh: SshTransport) -> None:
    started = time.monotonic()
    with pytest.raises(TransportError, match=r"`sleep 10` did not finish within 0.5 s"):
        ssh.run(["sleep", "10"], timeout=0.5)
    assert time.monotonic() - started < 3
    assert ssh.run(["echo", "still here"]).stdout == "still here\n"
    assert ssh.connections_opened == 1


def test_many_commands_and_transfers_share_one_connection(
    sshd: Sshd, ssh: SshTransport, tmp_path: Path
) -> None:
    before = sshd.accepted()
    folder = tmp_path / "many"
    for i in range(5):
        assert ssh.run(["echo", str(i)]).stdout == f"{i}\n"
        ssh.write_text(f"{folder}/f{i}.txt", f"file {i}")
        assert ssh.read_text(f"{folder}/f{i}.txt") == f"file {i}"
    ssh.get(f"{folder}/f3.txt", tmp_path / "f3.txt")
    ssh.put(tmp_path / "f3.txt", f"{folder}/copy.txt")
    assert ssh.connections_opened == 1
    assert sshd.accepted() - before == 1


def test_files_in_and_remove_use_the_one_connection(
    sshd: Sshd, ssh: SshTransport, tmp_path: Path
) -> None:
    folder = tmp_path / "listed"
    folder.mkdir()
    (folder / "status.json").write_text("{}")
    (folder / "out.nii.gz").write_bytes(b"\x1f\x8b")
    (folder / "sub").mkdir()
    ssh.run(["true"])  # connected
    before = sshd.accepted()
    assert ssh.files_in(str(folder)) == ["out.nii.gz", "status.json"]
    assert ssh.files_in(str(tmp_path / "missing")) == []
    ssh.remove(str(folder / "status.json"))
    ssh.remove(str(folder / "status.json"))  # already gone: nothing to do
    assert sorted(p.name for p in folder.iterdir()) == ["out.nii.gz", "sub"]
    assert sshd.accepted() == before and ssh.connections_opened == 1


def test_nothing_connects_until_first_use(sshd: Sshd, tmp_path: Path) -> None:
    before = sshd.accepted()
    transport = connect(sshd, tmp_path)
    assert transport.connections_opened == 0 and sshd.accepted() == before
    transport.close()  # closing an unopened transport is fine


# -- files ------------------------------------------------------------------------------------


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".part")]


def test_write_text_and_read_text(ssh: SshTransport, tmp_path: Path) -> None:
    target = tmp_path / "remote" / "deep" / "job.sh"
    ssh.write_text(str(target), "#!/bin/sh\necho hi\n", mode=0o700)
    assert target.read_text() == "#!/bin/sh\necho hi\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    assert ssh.read_text(str(target)) == "#!/bin/sh\necho hi\n"
    assert ssh.read_text(str(target), limit=4) == "#!/b"

    # a rewrite replaces the file (new inode) instead of truncating the one a reader may hold
    os.link(target, tmp_path / "old-link")
    ssh.write_text(str(target), "second\n", mode=0o640)
    assert target.read_text() == "second\n"
    assert (tmp_path / "old-link").read_text() == "#!/bin/sh\necho hi\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert _leftovers(target.parent) == []

    assert ssh.read_text(str(tmp_path / "missing.txt")) is None
    with pytest.raises(TransportError, match="must not contain"):
        ssh.read_text("/tmp/../etc/passwd")
    with pytest.raises(TransportError, match="not an absolute path"):
        ssh.write_text("relative.txt", "x")


def test_put_get_and_makedirs(ssh: SshTransport, tmp_path: Path) -> None:
    local = tmp_path / "payload.bin"
    local.write_bytes(os.urandom(1_500_000))
    remote = tmp_path / "remote" / "sub" / "payload.bin"
    ssh.put(local, str(remote), mode=0o750)
    assert remote.read_bytes() == local.read_bytes()
    assert stat.S_IMODE(remote.stat().st_mode) == 0o750
    assert _leftovers(remote.parent) == []

    back = tmp_path / "back" / "payload.bin"
    back.parent.mkdir()
    ssh.get(str(remote), back)
    assert back.read_bytes() == local.read_bytes()
    assert _leftovers(back.parent) == []

    folder = tmp_path / "a" / "b" / "c"
    ssh.makedirs(str(folder))
    ssh.makedirs(str(folder))  # already there: fine
    assert folder.is_dir()
    with pytest.raises(TransportError, match="not a folder"):
        ssh.makedirs(str(remote / "below-a-file"))


def test_sftp_errors_name_the_path_and_reason(ssh: SshTransport, tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(TransportError, match=rf"{missing}: no such file or directory"):
        ssh.get(str(missing), tmp_path / "local.txt")
    assert not (tmp_path / "local.txt").exists()
    assert _leftovers(tmp_path) == []
    with pytest.raises(TransportError, match=r"cannot read .*missing-local"):
        ssh.put(tmp_path / "missing-local", str(tmp_path / "x"))
    with pytest.raises(TransportError, match=r"/proc/hpcbridge-test\.txt: "):
        ssh.write_text("/proc/hpcbridge-test.txt", "x")
    assert ssh.connections_opened == 1  # an SFTP error is not a broken connection


# -- ssh config ---------------------------------------------------------------------------


def test_config_alias_hostname_user_port_identityfile(sshd: Sshd, tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(
        f"""\
Host cluster
  HostName 127.0.0.1
  Port {sshd.port}
  User {USER}
  IdentityFile {tmp_path}/no-such-key
  IdentityFile {sshd.client_key}
"""
    )
    with SshTransport("cluster", ssh_config=config, known_hosts=sshd.known_hosts) as ssh:
        assert ssh.address == f"{USER}@127.0.0.1:{sshd.port}"
        assert ssh.run(["whoami"]).stdout.strip() == USER


def test_defaults_come_from_home_ssh(sshd: Sshd, user_home: Path) -> None:
    dot_ssh = user_home / ".ssh"
    dot_ssh.mkdir(mode=0o700)
    (dot_ssh / "id_ed25519").write_bytes(sshd.client_key.read_bytes())
    (dot_ssh / "id_ed25519").chmod(0o600)
    (dot_ssh / "known_hosts").write_text(sshd.known_hosts.read_text())
    (dot_ssh / "config").write_text(f"Host hpc\n  HostName 127.0.0.1\n  Port {sshd.port}\n")
    with SshTransport("hpc") as ssh:
        assert ssh.run(["echo", "ok"]).stdout == "ok\n"
    with SshTransport(f"ssh://{USER}@127.0.0.1:{sshd.port}") as ssh:
        assert ssh.run(["echo", "uri"]).stdout == "uri\n"


def test_known_hosts_precedence(sshd: Sshd, user_home: Path, tmp_path: Path) -> None:
    # UserKnownHostsFile beats ~/.ssh/known_hosts; the known_hosts argument beats both
    (user_home / ".ssh").mkdir()
    (user_home / ".ssh" / "known_hosts").write_text("")
    (user_home / "cluster_hosts").write_text(sshd.known_hosts.read_text())
    config = write_config(tmp_path / "config", sshd, extra="  UserKnownHostsFile ~/cluster_hosts\n")
    with SshTransport("loop", ssh_config=config) as ssh:
        assert ssh.run(["true"]).ok
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    with pytest.raises(HostKeyError, match="is not known"):
        SshTransport("loop", ssh_config=config, known_hosts=empty).run(["true"])


def test_hashed_known_hosts_entries_match(sshd: Sshd, tmp_path: Path) -> None:
    known = tmp_path / "hashed_known_hosts"
    known.write_text(sshd.known_hosts.read_text())
    subprocess.run([SSH_KEYGEN, "-q", "-H", "-f", str(known)], check=True, capture_output=True)
    assert known.read_text().startswith("|1|")
    with connect(sshd, tmp_path, known_hosts=known) as ssh:
        assert ssh.run(["true"]).ok


def test_proxyjump_single_hop_and_chain(sshd: Sshd, tmp_path: Path) -> None:
    config = tmp_path / "config"
    entry = f"  HostName 127.0.0.1\n  Port {sshd.port}\n  User {USER}\n"
    entry += f"  IdentityFile {sshd.client_key}\n"
    config.write_text(
        f"Host jump\n{entry}Host jump2\n{entry}"
        f"Host target\n{entry}  ProxyJump jump\n"
        f"Host far\n{entry}  ProxyJump jump,jump2\n"
    )
    before = sshd.accepted()
    with SshTransport("target", ssh_config=config, known_hosts=sshd.known_hosts) as ssh:
        assert ssh.jump_hosts == (f"{USER}@127.0.0.1:{sshd.port}",)
        assert ssh.run(["echo", "via jump"]).stdout == "via jump\n"
        ssh.write_text(str(tmp_path / "jumped.txt"), "over the hop")
        assert (tmp_path / "jumped.txt").read_text() == "over the hop"
    assert sshd.accepted() - before == 2  # the jump host and the target
    with SshTransport("far", ssh_config=config, known_hosts=sshd.known_hosts) as ssh:
        assert len(ssh.jump_hosts) == 2
        assert ssh.run(["echo", "two hops"]).stdout == "two hops\n"
    assert sshd.accepted() - before == 5


def test_jump_host_key_is_checked_too(sshd: Sshd, tmp_path: Path) -> None:
    config = write_config(tmp_path / "config", sshd, extra="  ProxyJump jumpy\n")
    with config.open("a") as fh:
        fh.write(f"Host jumpy\n  HostName 127.0.0.1\n  Port {sshd.port}\n")
        fh.write(f"  IdentityFile {sshd.client_key}\n  UserKnownHostsFile /dev/null\n")
    # the jump host's UserKnownHostsFile applies to it, not the target's file
    with pytest.raises(HostKeyError, match=r"host key of jump host 127\.0\.0\.1:\d+ is not known"):
        SshTransport("loop", ssh_config=config).run(["true"])


def test_bad_destinations_are_config_errors(tmp_path: Path) -> None:
    for bad in ("", "user@", "-oProxyCommand=x", "ssh://host:99999", "ssh://h/path", "a b"):
        with pytest.raises(ConfigError):
            SshTransport(bad, ssh_config=tmp_path / "none", known_hosts=tmp_path / "kh")
    (tmp_path / "cfg").write_text("Host x\n  ProxyCommand nc %h %p\n")
    with pytest.raises(ConfigError, match="ProxyCommand"):
        SshTransport("x", ssh_config=tmp_path / "cfg")


# -- host keys --------------------------------------------------------------------------------


def test_unknown_host_key_is_refused_with_its_fingerprint(sshd: Sshd, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(HostKeyError) as caught:
        connect(sshd, tmp_path, known_hosts=empty).run(["true"])
    text = str(caught.value)
    assert f"127.0.0.1:{sshd.port}" in text
    assert f"ssh-ed25519 {_fingerprint(sshd.host_pub)}" in text
    assert "--accept-new-host-key" in text and "ssh-keyscan" in text
    assert empty.read_text() == ""


def test_accept_new_host_key_records_it(
    sshd: Sshd, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    known = tmp_path / "new-dir" / "known_hosts"
    with caplog.at_level(logging.WARNING, logger="hpcbridge.ssh"):
        with connect(sshd, tmp_path, known_hosts=known, accept_new_host_key=True) as ssh:
            assert ssh.run(["true"]).ok
    assert _fingerprint(sshd.host_pub) in caplog.text
    assert stat.S_IMODE(known.stat().st_mode) == 0o600
    fields = known.read_text().split()
    assert fields[:2] == [f"[127.0.0.1]:{sshd.port}", "ssh-ed25519"]
    assert fields[2] == sshd.host_pub.read_text().split()[1]
    with connect(sshd, tmp_path, known_hosts=known) as again:  # strict again, and known now
        assert again.run(["true"]).ok
    assert len(known.read_text().splitlines()) == 1


def test_changed_host_key_is_refused_even_when_accepting_new(sshd: Sshd, tmp_path: Path) -> None:
    other = _keygen(tmp_path / "other_host_key")
    known = tmp_path / "known_hosts"
    fields = Path(f"{other}.pub").read_text().split()
    known.write_text(f"[127.0.0.1]:{sshd.port} {fields[0]} {fields[1]}\n")
    before = known.read_text()
    for accept in (False, True):
        with pytest.raises(HostKeyError) as caught:
            connect(sshd, tmp_path, known_hosts=known, accept_new_host_key=accept).run(["true"])
        text = str(caught.value)
        assert "changed" in text and "attack" in text
        assert _fingerprint(sshd.host_pub) in text and f"127.0.0.1:{sshd.port}" in text
    assert known.read_text() == before


# -- authentication and reachability ----------------------------------------------------------


def test_key_not_authorized_is_an_auth_error(sshd: Sshd, tmp_path: Path) -> None:
    stranger = _keygen(tmp_path / "stranger")
    config = write_config(tmp_path / "config", sshd, key=stranger)
    with pytest.raises(SshAuthError) as caught:
        SshTransport("loop", ssh_config=config, known_hosts=sshd.known_hosts).run(["true"])
    text = str(caught.value)
    assert f"{USER}@127.0.0.1:{sshd.port} refused the key(s) offered: {stranger}" in text
    assert "ssh-add" in text and "BEGIN" not in text


def test_no_key_at_all_is_an_auth_error(sshd: Sshd, tmp_path: Path) -> None:
    config = write_config(tmp_path / "config", sshd, key=tmp_path / "absent")
    with pytest.raises(SshAuthError, match="no SSH key to offer"):
        SshTransport("loop", ssh_config=config, known_hosts=sshd.known_hosts).run(["true"])


def test_agent_keys_are_offered(sshd: Sshd, tmp_path: Path, agent: Path) -> None:
    # a passphrase-protected IdentityFile works when its key is in the agent
    locked = tmp_path / "locked"
    locked.write_bytes(sshd.client_key.read_bytes())
    locked.chmod(0o600)
    subprocess.run(
        [SSH_KEYGEN, "-q", "-p", "-N", "secret-passphrase", "-f", str(locked)],
        check=True,
        capture_output=True,
    )
    Path(f"{locked}.pub").write_text(Path(f"{sshd.client_key}.pub").read_text())
    config = write_config(tmp_path / "config", sshd, key=locked)
    with pytest.raises(SshAuthError) as caught:
        SshTransport("loop", ssh_config=config, known_hosts=sshd.known_hosts).run(["true"])
    assert "passphrase-protected" in str(caught.value)
    assert "secret-passphrase" not in str(caught.value)

    ssh_add(sshd.client_key)
    with SshTransport("loop", ssh_config=config, known_hosts=sshd.known_hosts) as ssh:
        assert ssh.run(["true"]).ok


def test_refused_agent_keys_are_listed(sshd: Sshd, tmp_path: Path, agent: Path) -> None:
    ssh_add(_keygen(tmp_path / "stranger"))
    config = tmp_path / "config"
    config.write_text(f"Host loop\n  HostName 127.0.0.1\n  Port {sshd.port}\n")
    with pytest.raises(SshAuthError, match=r"offered: 1 key\(s\) from the SSH agent"):
        SshTransport("loop", ssh_config=config, known_hosts=sshd.known_hosts).run(["true"])


def test_closed_port_fails_fast(tmp_path: Path) -> None:
    port = _free_port()
    started = time.monotonic()
    transport = SshTransport(f"ssh://{USER}@127.0.0.1:{port}", known_hosts=tmp_path / "kh")
    with pytest.raises(SshConnectionError, match=rf"127\.0\.0\.1:{port} refused the connection"):
        transport.run(["true"])
    assert time.monotonic() - started < 2


def test_silent_server_times_out(tmp_path: Path) -> None:
    with socket.socket() as listener:  # accepts TCP, never says a word of SSH
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        transport = SshTransport(
            f"127.0.0.1:{port}", known_hosts=tmp_path / "kh", connect_timeout=0.5
        )
        started = time.monotonic()
        with pytest.raises(SshConnectionError, match=rf"127\.0\.0\.1:{port}"):
            transport.run(["true"])
        assert time.monotonic() - started < 3


# -- dropped connections ----------------------------------------------------------------------


def test_dropped_connection_is_reopened_once(sshd: Sshd, ssh: SshTransport, tmp_path: Path) -> None:
    assert ssh.run(["echo", "one"]).stdout == "one\n"
    assert sshd.kill_sessions() > 0
    assert ssh.run(["echo", "two"]).stdout == "two\n"
    assert ssh.connections_opened == 2
    sshd.kill_sessions()
    ssh.write_text(str(tmp_path / "after-drop.txt"), "sftp reconnects too")
    assert (tmp_path / "after-drop.txt").read_text() == "sftp reconnects too"
    assert ssh.connections_opened == 3


def test_drop_during_a_command_reruns_it_when_allowed(sshd: Sshd, ssh: SshTransport) -> None:
    ssh.run(["true"])
    killer = threading.Timer(0.4, sshd.kill_sessions)
    killer.start()
    try:
        result = ssh.run(["sh", "-c", "sleep 0.8; echo finished"], timeout=10)
    finally:
        killer.join()
    assert result.stdout == "finished\n"
    assert ssh.connections_opened == 2


def test_drop_during_a_non_idempotent_command_is_not_rerun(
    sshd: Sshd, ssh: SshTransport, tmp_path: Path
) -> None:
    ran = tmp_path / "ran"
    ssh.run(["true"])
    killer = threading.Timer(0.5, sshd.kill_sessions)
    killer.start()
    started = time.monotonic()
    try:
        with pytest.raises(SshConnectionError) as caught:
            ssh.run(["sh", "-c", f"echo x >> {ran}; sleep 5"], timeout=10, retry=False)
    finally:
        killer.join()
    assert time.monotonic() - started < 4
    assert "may or may not have run" in str(caught.value)
    assert "hpcbridge jobs" in hints.line(caught.value)  # the next step, in the CLI's words
    assert ran.read_text() == "x\n"  # ran once, not again
    assert ssh.run(["echo", "next"]).stdout == "next\n"  # the next command reconnects
    assert ssh.connections_opened == 2


def test_retry_false_still_reconnects_a_connection_found_dead(
    sshd: Sshd, ssh: SshTransport
) -> None:
    ssh.run(["true"])
    sshd.kill_sessions()
    assert ssh.run(["echo", "submitted"], retry=False).stdout == "submitted\n"
    assert ssh.connections_opened == 2


def test_stopped_sshd_gives_a_clear_error_after_one_reconnect(
    own_sshd: Sshd, tmp_path: Path
) -> None:
    with connect(own_sshd, tmp_path) as ssh:
        assert ssh.run(["true"]).ok
        own_sshd.stop()
        started = time.monotonic()
        with pytest.raises(SshConnectionError) as caught:
            ssh.run(["true"])
        assert time.monotonic() - started < 4
        text = str(caught.value)
        assert "could not reconnect" in text and "refused the connection" in text
        assert f"127.0.0.1:{own_sshd.port}" in text
        assert ssh.connections_opened == 1
