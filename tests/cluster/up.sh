#!/usr/bin/env bash
# Bring up the test cluster: a real single-node Slurm (with the PBS wrappers of slurm-wlm-torque)
# and a second sshd on 127.0.0.1, then write DIR/cluster.json for the tests.
# See tests/cluster/README.md. Usage: tests/cluster/up.sh [--install] [DIR]
set -euo pipefail
prog=up.sh
# shellcheck source=tests/cluster/lib.sh
. "$(dirname "$0")/lib.sh"

usage() {
    cat <<'EOF'
usage: tests/cluster/up.sh [--install] [DIR]

Start munge, slurmctld, slurmd and an sshd on 127.0.0.1 (port $HPCBRIDGE_TEST_SSH_PORT, default
2222), verify them, and write DIR/cluster.json. DIR defaults to $HPCBRIDGE_TEST_CLUSTER_DIR or
/tmp/hpcbridge-ci-cluster. Daemons already started by an earlier run are reused when their
configuration is unchanged. --install first apt-installs slurm-wlm slurm-wlm-torque munge
openssh-server (run apt-get update before). Needs root. Stop with tests/cluster/down.sh [DIR].
EOF
}

install=0
dir=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --install) install=1 ;;
        -h | --help) usage; exit 0 ;;
        -*) echo "up.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
        *)
            [[ -z $dir ]] || { echo "up.sh: only one DIR, got '$dir' and '$1'" >&2; exit 2; }
            dir=$1
            ;;
    esac
    shift
done

if [[ $(id -u) -ne 0 ]]; then
    echo "up.sh: must run as root (it starts munged, slurmctld, slurmd and sshd and writes" \
        "/etc/slurm/slurm.conf); try: sudo $0 $*" >&2
    exit 1
fi

dir=${dir:-${HPCBRIDGE_TEST_CLUSTER_DIR:-/tmp/hpcbridge-ci-cluster}}
port=${HPCBRIDGE_TEST_SSH_PORT:-2222}
[[ $port =~ ^[0-9]+$ ]] || { echo "up.sh: bad HPCBRIDGE_TEST_SSH_PORT '$port'" >&2; exit 2; }
if [[ $dir =~ [[:space:]] ]]; then
    # slurm.conf and the qsub wrapper (it builds an unquoted command line) cannot take spaces.
    echo "up.sh: DIR must not contain white space: '$dir'" >&2
    exit 2
fi

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
t_start=$(now)

if [[ $install -eq 1 ]]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurm-wlm slurm-wlm-torque munge openssh-server >/dev/null
fi
t_apt=$(since "$t_start")

for tool in munged munge slurmctld slurmd sinfo sbatch scontrol squeue qsub qstat sshd ssh-keygen; do
    command -v "$tool" >/dev/null || {
        echo "up.sh: $tool not found: install slurm-wlm slurm-wlm-torque munge openssh-server" \
            "(or run with --install)" >&2
        exit 1
    }
done

mkdir -p "$dir"
dir=$(cd "$dir" && pwd -P)
conf=/etc/slurm/slurm.conf
marker="# Written by hpcbridge tests/cluster/up.sh"
json="$dir/cluster.json"

# One up.sh or down.sh at a time per DIR. The daemons are started with 9>&- so that they do not
# inherit (and hold forever) this lock.
exec 9>"$dir/.lock"
flock -w 120 9 || { echo "up.sh: another up.sh/down.sh holds $dir/.lock" >&2; exit 1; }

# The tests must not trust an old cluster.json while we work; it is rewritten at the very end.
ready=0
on_exit() {
    local rc=$?
    if [[ $ready -ne 1 ]]; then
        rm -f "$json"
        [[ $rc -ne 0 ]] || rc=1
        echo "up.sh: FAILED; logs are in $dir (slurmctld.log slurmd.log sshd.log)" >&2
    fi
    exit "$rc"
}
trap on_exit EXIT

# ---------------------------------------------------------------------------- munge
t0=$(now)
munge_ok() { munge -n </dev/null | unmunge >/dev/null; }
if ! munge_ok 2>/dev/null; then
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /etc/munge
    install -d -o munge -g munge -m 0711 /var/lib/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    # A munged that is not answering (or a stale pid file) would block the socket.
    old=$(pid_of /run/munge/munged.pid munged)
    if [[ -n $old && $(pid_of "$dir/munged.pid" munged) == "$old" ]]; then
        stop_pid "$old"
    fi
    runuser -u munge -- /usr/sbin/munged --force --pid-file=/run/munge/munged.pid 9>&-
    wait_for 10 munge_ok || { show_log /var/log/munge/munged.log; die "munged did not start"; }
    # Remember that we started it, so that down.sh stops it (and only then).
    pid_of /run/munge/munged.pid munged >"$dir/munged.pid"
fi
t_munge=$(since "$t0")

# ---------------------------------------------------------------------------- slurm
t0=$(now)
node=$(hostname -s)
read -r cpus mem < <(slurmd -C | awk '/^NodeName=/ {
    for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
    print v["CPUs"], v["RealMemory"] }')
[[ -n ${cpus:-} && -n ${mem:-} ]] || die "could not read CPUs and RealMemory from slurmd -C"
mem=$((mem * 9 / 10))
mkdir -p "$dir/state" "$dir/spool"

cat >"$dir/taskprolog.sh" <<'EOF'
#!/bin/sh
# Slurm TaskProlog: every "export NAME=value" line printed here lands in the job's environment,
# so that job scripts see the variables PBS would give them.
echo "export PBS_JOBID=${SLURM_JOB_ID}"
echo "export PBS_JOBNAME=${SLURM_JOB_NAME}"
echo "export PBS_O_WORKDIR=${SLURM_SUBMIT_DIR}"
echo "export PBS_O_HOST=${SLURM_SUBMIT_HOST}"
echo "export PBS_QUEUE=${SLURM_JOB_PARTITION}"
if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
    echo "export PBS_ARRAY_INDEX=${SLURM_ARRAY_TASK_ID}"
    echo "export PBS_ARRAYID=${SLURM_ARRAY_TASK_ID}"
fi
EOF
chmod 0755 "$dir/taskprolog.sh"

# No DependencyParameters=kill_invalid_depend, on purpose: a job whose afterok parent failed stays
# PENDING (Reason=DependencyNeverSatisfied), as on real clusters without that setting, and the
# bridge itself must cancel it. The tests exercise exactly that.
new_conf=$(
    cat <<EOF
$marker (DIR=$dir); down.sh restores any earlier file.
ClusterName=ci
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
MinJobAge=3600
ReturnToService=2
MpiDefault=none
TaskProlog=$dir/taskprolog.sh
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=batch Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
)

# An earlier up.sh with another DIR: its daemons are ours too, found by its conf's pid files.
stop_slurm_of_conf() {
    local file=$1 key pidfile name pid old_dir
    old_dir=$(sed -n "s|^$marker (DIR=\(.*\)); .*|\1|p" "$file" | head -n 1)
    # That cluster loses its Slurm: its cluster.json must not claim it is ready any more.
    [[ -z $old_dir || $old_dir == "$dir" ]] || rm -f "$old_dir/cluster.json"
    for key in SlurmdPidFile SlurmctldPidFile; do
        pidfile=$(sed -n "s/^$key=//p" "$file" | head -n 1)
        [[ $key == SlurmdPidFile ]] && name=slurmd || name=slurmctld
        pid=$(pid_of "$pidfile" "$name")
        [[ -z $pid ]] || stop_pid "$pid"
    done
}

ctld=$(pid_of "$dir/slurmctld.pid" slurmctld)
slurmd_pid=$(pid_of "$dir/slurmd.pid" slurmd)
node_state() { sinfo -h -o %t 2>/dev/null | head -n 1; }
node_up() { [[ $(node_state) =~ ^(idle|mix|alloc|comp)$ ]]; }
fresh_idle() { [[ $(node_state) == idle ]]; }
slurm_reused=0
if [[ -f $conf ]] && [[ $(cat "$conf") == "$new_conf" ]] && [[ -n $ctld && -n $slurmd_pid ]] \
    && node_up; then
    slurm_reused=1
else
    if [[ -f $conf ]] && grep -qF "$marker" "$conf"; then
        stop_slurm_of_conf "$conf"
    elif [[ -f $conf ]] && [[ ! -e $conf.hpcbridge-backup ]]; then
        cp -p "$conf" "$conf.hpcbridge-backup"
        echo "up.sh: kept the earlier $conf as $conf.hpcbridge-backup"
    fi
    for pid in "$slurmd_pid" "$ctld"; do [[ -z $pid ]] || stop_pid "$pid"; done
    mkdir -p /etc/slurm
    printf '%s\n' "$new_conf" >"$conf.tmp.$$"
    mv -f "$conf.tmp.$$" "$conf"
    if ! mountpoint -q /sys/fs/cgroup; then
        echo "up.sh: warning: /sys/fs/cgroup is not mounted; slurmd 22.05 needs it" >&2
    fi
    slurmctld 9>&- || { show_log "$dir/slurmctld.log"; die "slurmctld failed to start"; }
    wait_for 30 scontrol ping || { show_log "$dir/slurmctld.log"; die "slurmctld not answering"; }
    slurmd 9>&- || { show_log "$dir/slurmd.log"; die "slurmd failed to start"; }
    if ! wait_for 30 fresh_idle; then
        # A node that state recovery remembers as down or drained: ask once to resume it.
        scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true
        wait_for 10 node_up || {
            show_log "$dir/slurmctld.log"
            show_log "$dir/slurmd.log"
            die "node $node is '$(node_state)', not idle, 30 s after slurmd started"
        }
    fi
fi
t_slurm=$(since "$t0")

# ---------------------------------------------------------------------------- sshd
t0=$(now)
[[ -s $dir/host_ed25519 ]] || ssh-keygen -q -t ed25519 -N '' -C hpcbridge-ci-host -f "$dir/host_ed25519"
[[ -s $dir/client_ed25519 ]] || ssh-keygen -q -t ed25519 -N '' -C hpcbridge-ci-client -f "$dir/client_ed25519"
chmod 0600 "$dir/host_ed25519" "$dir/client_ed25519"
cp "$dir/client_ed25519.pub" "$dir/authorized_keys"
read -r ktype kdata _ <"$dir/host_ed25519.pub"
echo "[127.0.0.1]:$port $ktype $kdata" >"$dir/known_hosts"

# AuthorizedKeysFile also reads ~/.ssh/authorized_keys, so tests may add non-root users.
new_sshd_conf=$(
    cat <<EOF
# Written by hpcbridge tests/cluster/up.sh: a test sshd on loopback only.
Port $port
ListenAddress 127.0.0.1
HostKey $dir/host_ed25519
PidFile $dir/sshd.pid
AuthorizedKeysFile $dir/authorized_keys .ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
AllowTcpForwarding yes
PrintMotd no
MaxStartups 100:30:200
MaxSessions 50
Subsystem sftp internal-sftp
EOF
)
sshd_pid=$(pid_of "$dir/sshd.pid" sshd)
sshd_reused=0
if [[ -n $sshd_pid && -f $dir/sshd_config ]] && [[ $(cat "$dir/sshd_config") == "$new_sshd_conf" ]]; then
    sshd_reused=1
else
    [[ -z $sshd_pid ]] || stop_pid "$sshd_pid"
    printf '%s\n' "$new_sshd_conf" >"$dir/sshd_config"
    rm -f "$dir/sshd.pid"
    mkdir -p /run/sshd
    chmod 0755 /run/sshd
    /usr/sbin/sshd -t -f "$dir/sshd_config" || die "sshd rejects $dir/sshd_config"
    /usr/sbin/sshd -f "$dir/sshd_config" -E "$dir/sshd.log" 9>&- \
        || { show_log "$dir/sshd.log"; die "sshd failed to start"; }
    wait_for 10 test -s "$dir/sshd.pid" || { show_log "$dir/sshd.log"; die "sshd wrote no pid file"; }
    sleep 0.05
    [[ -n $(pid_of "$dir/sshd.pid" sshd) ]] || {
        show_log "$dir/sshd.log"
        die "sshd exited at once (is port $port already in use?)"
    }
fi

cat >"$dir/ssh_config" <<EOF
# Written by hpcbridge tests/cluster/up.sh. Use: ssh -F $dir/ssh_config hpcbridge-ci COMMAND
Host hpcbridge-ci
    HostName 127.0.0.1
    Port $port
    User root
    IdentityFile $dir/client_ed25519
    IdentitiesOnly yes
    UserKnownHostsFile $dir/known_hosts
    GlobalKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    BatchMode yes
EOF
t_sshd=$(since "$t0")

# ---------------------------------------------------------------------------- verify
t0=$(now)
ssh_check=skipped
if command -v ssh >/dev/null; then
    ssh -F "$dir/ssh_config" -o ConnectTimeout=10 hpcbridge-ci true \
        || { show_log "$dir/sshd.log"; die "ssh -F $dir/ssh_config hpcbridge-ci true failed"; }
    ssh_check=ssh
elif python3 -c 'import paramiko' 2>/dev/null; then
    python3 - "$port" "$dir" <<'PY' || { show_log "$dir/sshd.log"; die "paramiko login failed"; }
import sys
import paramiko

port, folder = int(sys.argv[1]), sys.argv[2]
client = paramiko.SSHClient()
client.load_host_keys(f"{folder}/known_hosts")
client.set_missing_host_key_policy(paramiko.RejectPolicy())
client.connect("127.0.0.1", port=port, username="root", key_filename=f"{folder}/client_ed25519",
               look_for_keys=False, allow_agent=False, timeout=10)
_, out, _ = client.exec_command("true")
sys.exit(out.channel.recv_exit_status())
PY
    ssh_check=paramiko
fi

check="$dir/verify"
rm -rf "$check"
mkdir -p "$check"
cat >"$check/check.pbs" <<'EOF'
#!/bin/bash
echo "$PBS_JOBID $PBS_JOBNAME" >"$PBS_O_WORKDIR/qsub.out"
EOF
sbatch_id=$(sbatch --parsable --chdir="$check" --output=/dev/null --job-name=up-check --wrap true)
sbatch_id=${sbatch_id%%;*}
if [[ $ssh_check == ssh ]]; then # submit the PBS way, through the test sshd, like the bridge
    qsub_id=$(ssh -F "$dir/ssh_config" hpcbridge-ci "cd $check && qsub -N up-check check.pbs")
else
    qsub_id=$(cd "$check" && qsub -N up-check check.pbs)
fi
qsub_id=${qsub_id%%.*}
[[ $sbatch_id =~ ^[0-9]+$ && $qsub_id =~ ^[0-9]+$ ]] \
    || die "unexpected job ids: sbatch '$sbatch_id', qsub '$qsub_id'"
job_state() { scontrol show job "$1" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p'; }
both_done() {
    [[ $(job_state "$sbatch_id") == COMPLETED && $(job_state "$qsub_id") == COMPLETED ]] \
        && [[ -s $check/qsub.out ]]
}
wait_for 30 both_done || {
    show_log "$dir/slurmd.log"
    die "check jobs did not complete in 30 s: sbatch $sbatch_id $(job_state "$sbatch_id")," \
        "qsub $qsub_id $(job_state "$qsub_id")"
}
[[ $(<"$check/qsub.out") == "$qsub_id up-check" ]] \
    || die "TaskProlog: the qsub job saw PBS_JOBID PBS_JOBNAME '$(<"$check/qsub.out")'"
t_verify=$(since "$t0")

# ---------------------------------------------------------------------------- cluster.json
python3 - "$json" "$dir" "$node" "$port" <<'PY'
import json
import os
import sys

path, folder, node, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
info = {
    "dir": folder,
    "hostname": node,
    "ssh": {
        "host": "127.0.0.1",
        "port": port,
        "user": "root",
        "alias": "hpcbridge-ci",
        "identity_file": f"{folder}/client_ed25519",
        "known_hosts": f"{folder}/known_hosts",
        "ssh_config": f"{folder}/ssh_config",
        "host_key_pub": f"{folder}/host_ed25519.pub",
        "sshd_pid_file": f"{folder}/sshd.pid",
    },
    "slurm": {"conf": "/etc/slurm/slurm.conf", "partition": "batch"},
    "ready": True,
}
with open(path + ".tmp", "w") as out:
    json.dump(info, out, indent=2)
    out.write("\n")
os.replace(path + ".tmp", path)
PY
ready=1

reuse() { if [[ $1 -eq 1 ]]; then echo " reused"; fi; }
echo "hpcbridge test cluster up in $(since "$t_start") s" \
    "(apt ${t_apt} s, munge ${t_munge} s, slurm$(reuse $slurm_reused) ${t_slurm} s," \
    "sshd$(reuse $sshd_reused) ${t_sshd} s, verify ${t_verify} s: ssh via $ssh_check," \
    "sbatch job $sbatch_id, qsub job $qsub_id): node $node ${cpus} CPUs ${mem} MB," \
    "ssh root@127.0.0.1:$port, $json"
