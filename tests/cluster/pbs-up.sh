#!/usr/bin/env bash
# Bring up the PBS Pro test cluster: OpenPBS built from its source tarball, single-node on
# loopback with job history, a non-root submitting user and an sshd of its own on 127.0.0.1,
# then write DIR/cluster.json for the tests. See tests/cluster/README.md.
# Usage: tests/cluster/pbs-up.sh [--tarball FILE] [DIR]
set -euo pipefail
prog=pbs-up.sh
# shellcheck source=tests/cluster/lib.sh
. "$(dirname "$0")/lib.sh"

usage() {
    cat <<'EOF'
usage: tests/cluster/pbs-up.sh [--tarball FILE] [DIR]

Build OpenPBS (the open-source PBS Professional) from its source tarball, install it in /opt/pbs,
start its server, scheduler, mom and comm on this host (loopback only), configure a queue `workq`,
a transfer queue `dtq` and job history, create the submitting user `pbsuser`, start an sshd on
127.0.0.1 (port $HPCBRIDGE_TEST_PBS_SSH_PORT, default 2223) that logs in as that user with
/opt/pbs/bin first on its PATH, verify it all with a job, and write DIR/cluster.json.

DIR defaults to $HPCBRIDGE_TEST_PBS_DIR or /tmp/hpcbridge-ci-pbs. The tarball is --tarball, else
$HPCBRIDGE_OPENPBS_TARBALL, else the one openpbs-*.tar.gz in ../shared/openpbs/ beside this
checkout (or /work/shared/openpbs/). An installation built from the same tarball is reused, so a
second run takes seconds. Needs root and the network to the Debian and PyPI mirrors. Exit 3 when
there is no tarball. Stop with tests/cluster/pbs-down.sh [DIR].
EOF
}

tarball=${HPCBRIDGE_OPENPBS_TARBALL:-}
dir=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --tarball)
            [[ $# -ge 2 ]] || { echo "pbs-up.sh: --tarball needs a file" >&2; exit 2; }
            tarball=$2
            shift
            ;;
        -h | --help) usage; exit 0 ;;
        -*) echo "pbs-up.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
        *)
            [[ -z $dir ]] || { echo "pbs-up.sh: only one DIR, got '$dir' and '$1'" >&2; exit 2; }
            dir=$1
            ;;
    esac
    shift
done

if [[ $(id -u) -ne 0 ]]; then
    echo "pbs-up.sh: must run as root (it installs OpenPBS in /opt/pbs, writes /etc/pbs.conf" \
        "and /etc/hosts, and starts PBS's daemons and an sshd); try: sudo $0 $*" >&2
    exit 1
fi

here=$(cd "$(dirname "$0")" && pwd -P)
checkout=$(cd "$here/../.." && pwd -P)
if [[ -z $tarball ]]; then
    for folder in "$checkout/../shared/openpbs" /work/shared/openpbs; do
        found=$(compgen -G "$folder/openpbs-*.tar.gz" || true)
        if [[ -n $found ]]; then
            [[ $(wc -l <<<"$found") -eq 1 ]] || {
                echo "pbs-up.sh: several tarballs in $folder; pick one with --tarball" >&2
                exit 2
            }
            tarball=$found
            break
        fi
    done
fi
if [[ -z $tarball || ! -f $tarball ]]; then
    echo "pbs-up.sh: no OpenPBS source tarball${tarball:+ at $tarball}: pass --tarball FILE or set" \
        "HPCBRIDGE_OPENPBS_TARBALL (looked in ../shared/openpbs/ and /work/shared/openpbs/)" >&2
    exit 3
fi
tarball=$(readlink -f "$tarball")

dir=${dir:-${HPCBRIDGE_TEST_PBS_DIR:-/tmp/hpcbridge-ci-pbs}}
port=${HPCBRIDGE_TEST_PBS_SSH_PORT:-2223}
[[ $port =~ ^[0-9]+$ ]] || { echo "pbs-up.sh: bad HPCBRIDGE_TEST_PBS_SSH_PORT '$port'" >&2; exit 2; }
[[ ! $dir =~ [[:space:]] ]] || { echo "pbs-up.sh: DIR must not contain white space" >&2; exit 2; }

prefix=/opt/pbs
pbs_home=/var/spool/pbs
user=pbsuser
group=hpcbridge-ci
node=$(hostname -s)
hosts_begin="# BEGIN hpcbridge tests/cluster/pbs-up.sh"
hosts_end="# END hpcbridge tests/cluster/pbs-up.sh"
# Debian's python builds PBS's embedded interpreter; a pyenv or venv python first on PATH would not.
export PATH=$prefix/bin:$prefix/sbin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export DEBIAN_FRONTEND=noninteractive

mkdir -p "$dir"
chmod 0755 "$dir"
dir=$(cd "$dir" && pwd -P)
json="$dir/cluster.json"
logs="$dir/logs"
mkdir -p "$logs"

exec 9>"$dir/.lock"
flock -w 600 9 || { echo "pbs-up.sh: another pbs-up.sh/pbs-down.sh holds $dir/.lock" >&2; exit 1; }

ready=0
on_exit() {
    local rc=$?
    if [[ $ready -ne 1 ]]; then
        rm -f "$json"
        [[ $rc -ne 0 ]] || rc=1
        echo "pbs-up.sh: FAILED; logs are in $logs and $pbs_home/server_logs" >&2
    fi
    exit "$rc"
}
trap on_exit EXIT
now() { date +%s; }
t_start=$(now)
declare -a timings=()
timed() { timings+=("$1 $(($(now) - $2)) s"); }

# ---------------------------------------------------------------------------- packages
t0=$(now)
# Build tools and libraries OpenPBS's configure insists on (tcl/tk and X for its GUI tools),
# PostgreSQL (PBS keeps its server state in a private instance), python3-venv for the jobs'
# python, and sshd.
packages=(gcc g++ make autoconf automake libtool pkg-config patch perl swig
    libhwloc-dev libx11-dev libxt-dev libxext-dev libxft-dev libedit-dev libedit2 libical-dev
    libncurses-dev libexpat1-dev expat libssl-dev libcjson-dev tcl tcl-dev tk tk-dev
    postgresql postgresql-contrib postgresql-server-dev-all python3-dev python3-venv
    openssh-server openssh-client sudo iproute2 procps)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep 'install ok installed' >/dev/null || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    if ! apt-get install -y -qq "${missing[@]}" >"$logs/apt.log" 2>&1; then
        apt-get update -qq >>"$logs/apt.log" 2>&1
        apt-get install -y -qq "${missing[@]}" >>"$logs/apt.log" 2>&1 \
            || { show_log "$logs/apt.log"; die "apt-get install failed"; }
    fi
fi
timed packages "$t0"

# ---------------------------------------------------------------------------- build
# Two edits for a server whose host name resolves only to 127.0.0.1 (see README.md):
#  - PBS lists a host's addresses without the 127.x ones, finds none, and stops ("Could not
#    find any usable IP address"): keep loopback addresses (Libnet/hnls.c, Libtpp/tpp_platform.c);
#  - its start scripts check the host name with `getent hosts`, which asks DNS off the machine
#    for an IPv6 address first: ask for IPv4 only.
edits_version=1
stamp="$prefix/.hpcbridge-build"
want_stamp="$(sha256sum "$tarball" | cut -d' ' -f1) edits=$edits_version"
edit_sources() {
    local src=$1 f
    for f in src/lib/Libnet/hnls.c src/lib/Libtpp/tpp_platform.c; do
        grep -q 'if (ntohl(sa->sin_addr.s_addr) >> 24 == IN_LOOPBACKNET)' "$src/$f" \
            || die "$f: the loopback test to disable is not there (another OpenPBS version?)"
        sed -i 's/if (ntohl(sa->sin_addr.s_addr) >> 24 == IN_LOOPBACKNET)/if (0 \&\& ntohl(sa->sin_addr.s_addr) >> 24 == IN_LOOPBACKNET)/' "$src/$f"
    done
    for f in src/cmds/scripts/pbs_init.d.in src/cmds/scripts/pbs_habitat.in; do
        grep -q 'getent hosts ' "$src/$f" \
            || die "$f: no 'getent hosts' check to change (another OpenPBS version?)"
        sed -i 's/getent hosts /getent ahostsv4 /' "$src/$f"
    done
}
pbs_stop() {
    [[ -x /etc/init.d/pbs ]] && /etc/init.d/pbs stop >>"$logs/stop.log" 2>&1 9>&- || true
}
t0=$(now)
built=reused
if [[ ! -x $prefix/sbin/pbs_server || ! -f $stamp || $(cat "$stamp") != "$want_stamp" ]]; then
    built=built
    build=$dir/build
    rm -rf "$build"
    mkdir -p "$build"
    tar -xzf "$tarball" -C "$build"
    src=$(find "$build" -mindepth 1 -maxdepth 1 -type d | head -n 1)
    [[ -f $src/configure.ac ]] || die "$tarball holds no OpenPBS source (no configure.ac)"
    edit_sources "$src"
    (
        cd "$src"
        ./autogen.sh >"$logs/autogen.log" 2>&1 || { show_log "$logs/autogen.log"; exit 1; }
        ./configure --prefix="$prefix" --with-python=/usr >"$logs/configure.log" 2>&1 \
            || { show_log "$logs/configure.log"; exit 1; }
        make -j"$(nproc)" >"$logs/make.log" 2>&1 || { show_log "$logs/make.log"; exit 1; }
    ) || die "building OpenPBS failed"
    pbs_stop
    make -C "$src" install >"$logs/install.log" 2>&1 || { show_log "$logs/install.log"; die "make install failed"; }
    # make install drops the setuid bits; without them a non-root qsub cannot authenticate
    # ("pbs_iff: cannot connect to host").
    chmod 4755 "$prefix/sbin/pbs_iff" "$prefix/sbin/pbs_rcp"
    if [[ ! -f $pbs_home/pbs_environment ]]; then
        "$prefix/libexec/pbs_postinstall" </dev/null >"$logs/postinstall.log" 2>&1 \
            || { show_log "$logs/postinstall.log"; die "pbs_postinstall failed"; }
    fi
    install -m 0755 "$prefix/libexec/pbs_init.d" /etc/init.d/pbs
    rm -rf "$build"
    echo "$want_stamp" >"$stamp"
fi
timed "build ($built)" "$t0"

# ---------------------------------------------------------------------------- host
t0=$(now)
# PBS reverse-resolves every address of every interface when it starts; without a local answer
# those queries leave the machine. Give each non-loopback address a name nobody uses.
# (\| delimits the addresses: the markers hold slashes)
sed -i "\|^$hosts_begin|,\|^$hosts_end|d" /etc/hosts
{
    echo "$hosts_begin (names below are deliberately unused)"
    getent ahostsv4 "$node" 2>/dev/null | grep '^127\.' >/dev/null || echo "127.0.0.1 $node"
    n=0
    while read -r address; do
        n=$((n + 1))
        echo "$address $node-if$n-unused"
    done < <(ip -o addr show 2>/dev/null | awk '$2 != "lo" { split($4, a, "/"); print a[1] }')
    echo "$hosts_end"
} >>/etc/hosts
getent ahostsv4 "$node" | grep '^127\.' >/dev/null || die "$node does not resolve to 127.x"

new_conf="PBS_SERVER=$node
PBS_START_SERVER=1
PBS_START_SCHED=1
PBS_START_COMM=1
PBS_START_MOM=1
PBS_EXEC=$prefix
PBS_HOME=$pbs_home
PBS_CORE_LIMIT=unlimited
PBS_SCP=/usr/bin/scp"
if [[ ! -f /etc/pbs.conf || $(cat /etc/pbs.conf) != "$new_conf" ]]; then
    pbs_stop
    printf '%s\n' "$new_conf" >/etc/pbs.conf
fi
id "$user" >/dev/null 2>&1 || useradd -m -s /bin/bash "$user"
# useradd leaves the account locked ("!"), and sshd without PAM refuses locked accounts even to
# keys; "*" means no password, but not locked.
usermod -p '*' "$user"
# The tests share their folders with $user through this group, as a lab shares a group folder.
getent group "$group" >/dev/null || groupadd "$group"
id -nG "$user" | tr ' ' '\n' | grep -x "$group" >/dev/null || usermod -aG "$group" "$user"
user_home=$(getent passwd "$user" | cut -d: -f6)
timed host "$t0"

# ---------------------------------------------------------------------------- start
t0=$(now)
server_up() { qstat -B; }
# 9>&-: the daemons must not inherit (and hold for ever) this script's lock.
/etc/init.d/pbs start >"$logs/start.log" 2>&1 9>&- || true
if ! wait_for 30 server_up; then
    # A first start that failed half-way leaves a datastore without a server row; every later
    # start then asks "no server database exists, continue?" on a closed stdin and exits 0.
    echo "pbs-up.sh: the server did not come up; creating its database (pbs_server -t create)"
    (set -a && . /etc/pbs.conf && set +a && echo y | "$prefix/sbin/pbs_server" -t create 9>&-) \
        >"$logs/create.log" 2>&1 || true
    wait_for 30 server_up || {
        show_log "$logs/start.log"
        show_log "$pbs_home/server_logs/$(date +%Y%m%d)"
        die "pbs_server does not start"
    }
fi
qm() { qmgr -c "$1" >/dev/null || die "qmgr -c '$1' failed"; }
for queue in workq dtq; do
    qmgr -c "list queue $queue" >/dev/null 2>&1 || qm "create queue $queue queue_type=execution"
    qm "set queue $queue enabled = True"
    qm "set queue $queue started = True"
done
qm "set server default_queue = workq"
qm "set server scheduling = True"
qm "set server job_history_enable = True"
qm "set server flatuid = True"
# Root may then submit too (tests on this machine); the SSH tests submit as $user, as people do.
qmgr -c "list server acl_roots" 2>/dev/null | grep -w root >/dev/null || qm "set server acl_roots += root"
pbsnodes -v "$node" >/dev/null 2>&1 || qm "create node $node"
node_free() { pbsnodes -v "$node" 2>/dev/null | grep -E '^[[:space:]]*state = free' >/dev/null; }
wait_for 60 node_free || { pbsnodes -v "$node" >&2 || true; die "node $node is not free"; }
timed start "$t0"

# ---------------------------------------------------------------------------- jobs' python
t0=$(now)
# PBS jobs run as $user with its login shell's environment, and root's python (under /root) is
# out of its reach, so the chain's transfer jobs need a python with hpcbridge's dependencies
# that $user can run; the tests point PYTHONPATH at a copy of the code under test.
venv=$dir/venv
if [[ ! -x $venv/bin/python ]] || ! "$venv/bin/python" -c 'import requests, paramiko, jinja2, click, pydicom' 2>/dev/null; then
    rm -rf "$venv"
    /usr/bin/python3 -m venv "$venv" >"$logs/venv.log" 2>&1 || { show_log "$logs/venv.log"; die "venv failed"; }
    deps=$(/usr/bin/python3 - "$checkout/pyproject.toml" <<'PY'
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["dependencies"]))
PY
)
    mapfile -t dep_list <<<"$deps"
    "$venv/bin/pip" install -q "${dep_list[@]}" >>"$logs/venv.log" 2>&1 \
        || { show_log "$logs/venv.log"; die "pip install of hpcbridge's dependencies failed"; }
fi
chmod -R a+rX "$venv"
timed python "$t0"

# ---------------------------------------------------------------------------- sshd
t0=$(now)
[[ -s $dir/host_ed25519 ]] || ssh-keygen -q -t ed25519 -N '' -C hpcbridge-ci-pbs-host -f "$dir/host_ed25519"
[[ -s $dir/client_ed25519 ]] || ssh-keygen -q -t ed25519 -N '' -C hpcbridge-ci-pbs-client -f "$dir/client_ed25519"
chmod 0600 "$dir/host_ed25519" "$dir/client_ed25519"
install -d -o "$user" -g "$user" -m 0700 "$user_home/.ssh"
install -o "$user" -g "$user" -m 0600 "$dir/client_ed25519.pub" "$user_home/.ssh/authorized_keys"
read -r ktype kdata _ <"$dir/host_ed25519.pub"
echo "[127.0.0.1]:$port $ktype $kdata" >"$dir/known_hosts"
# A login here is a PBS Pro login node: /opt/pbs/bin before /usr/bin, where Slurm's PBS wrappers
# of the other test cluster live.
new_sshd_conf="# Written by hpcbridge tests/cluster/pbs-up.sh: the PBS Pro login node, loopback only.
Port $port
ListenAddress 127.0.0.1
HostKey $dir/host_ed25519
PidFile $dir/sshd.pid
AllowUsers $user
AuthorizedKeysFile .ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin no
UsePAM no
AllowTcpForwarding yes
PrintMotd no
MaxStartups 100:30:200
MaxSessions 50
SetEnv PATH=$prefix/bin:/usr/local/bin:/usr/bin:/bin
Subsystem sftp internal-sftp"
sshd_pid=$(pid_of "$dir/sshd.pid" sshd)
if [[ -z $sshd_pid || ! -f $dir/sshd_config || $(cat "$dir/sshd_config") != "$new_sshd_conf" ]]; then
    [[ -z $sshd_pid ]] || stop_pid "$sshd_pid"
    printf '%s\n' "$new_sshd_conf" >"$dir/sshd_config"
    rm -f "$dir/sshd.pid"
    mkdir -p /run/sshd
    chmod 0755 /run/sshd
    /usr/sbin/sshd -t -f "$dir/sshd_config" || die "sshd rejects $dir/sshd_config"
    /usr/sbin/sshd -f "$dir/sshd_config" -E "$logs/sshd.log" 9>&- \
        || { show_log "$logs/sshd.log"; die "sshd failed to start"; }
    wait_for 10 test -s "$dir/sshd.pid" || { show_log "$logs/sshd.log"; die "sshd wrote no pid file"; }
fi
cat >"$dir/ssh_config" <<EOF
# Written by hpcbridge tests/cluster/pbs-up.sh. Use: ssh -F $dir/ssh_config hpcbridge-ci-pbs COMMAND
Host hpcbridge-ci-pbs
    HostName 127.0.0.1
    Port $port
    User $user
    IdentityFile $dir/client_ed25519
    IdentitiesOnly yes
    UserKnownHostsFile $dir/known_hosts
    GlobalKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    BatchMode yes
EOF
timed sshd "$t0"

# ---------------------------------------------------------------------------- verify
t0=$(now)
remote() { ssh -F "$dir/ssh_config" -o ConnectTimeout=10 hpcbridge-ci-pbs "$@"; }
where=$(remote 'command -v qsub') || { show_log "$logs/sshd.log"; die "ssh to $user@127.0.0.1:$port failed"; }
[[ $where == "$prefix/bin/qsub" ]] || die "qsub over SSH is $where, not $prefix/bin/qsub"
version=$(remote 'qstat --version')
[[ $version == *"pbs_version ="* ]] || die "qstat --version over SSH printed '$version'"
check=$user_home/hpcbridge-verify
rm -rf "$check"
install -d -o "$user" -g "$user" "$check"
cat >"$check/check.pbs" <<'EOF'
#!/bin/bash
#PBS -l select=1:ncpus=1:mem=100mb
#PBS -l walltime=00:01:00
echo "$PBS_JOBID $(id -un)" >"$PBS_O_WORKDIR/check.out"
EOF
chown "$user:" "$check/check.pbs"
job=$(remote "cd $check && qsub -P ci -N up-check check.pbs") || die "qsub over SSH failed"
finished() {
    qstat -x -f -F json "$job" 2>/dev/null | /usr/bin/python3 -c '
import json, sys
job = next(iter(json.load(sys.stdin)["Jobs"].values()))
sys.exit(0 if job["job_state"] == "F" and job.get("Exit_status") == 0 else 1)'
}
wait_for 90 finished || {
    qstat -x -f "$job" >&2 || true
    die "check job $job did not finish with exit status 0 in 90 s"
}
wait_for 10 test -s "$check/check.out" || die "check job $job wrote nothing"
[[ $(<"$check/check.out") == "$job $user" ]] || die "check job saw '$(<"$check/check.out")'"
timed verify "$t0"

# ---------------------------------------------------------------------------- cluster.json
/usr/bin/python3 - "$json" "$dir" "$node" "$port" "$user" "$user_home" "$prefix" "$version" "$group" <<'PY'
import json
import os
import sys

path, folder, node, port, user, home, prefix, version, group = sys.argv[1:]
info = {
    "dir": folder,
    "hostname": node,
    "ssh": {
        "host": "127.0.0.1",
        "port": int(port),
        "user": user,
        "alias": "hpcbridge-ci-pbs",
        "identity_file": f"{folder}/client_ed25519",
        "known_hosts": f"{folder}/known_hosts",
        "ssh_config": f"{folder}/ssh_config",
        "host_key_pub": f"{folder}/host_ed25519.pub",
        "sshd_pid_file": f"{folder}/sshd.pid",
    },
    "pbs": {
        "prefix": prefix,
        "version": version.split("=", 1)[1].strip(),
        "queue": "workq",
        "transfer_queue": "dtq",
        "user": user,
        "group": group,
        "home": home,
        "python": f"{folder}/venv/bin/python",
    },
    "ready": True,
}
with open(path + ".tmp", "w") as out:
    json.dump(info, out, indent=2)
    out.write("\n")
os.replace(path + ".tmp", path)
PY
ready=1
summary=$(printf '%s, ' "${timings[@]}")
echo "hpcbridge PBS Pro test cluster up in $(($(now) - t_start)) s (${summary%, }): $version," \
    "node $node, ssh $user@127.0.0.1:$port, $json"
