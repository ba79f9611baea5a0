#!/usr/bin/env bash
# Stop the test cluster that tests/cluster/up.sh started: cancel leftover jobs, then stop slurmd,
# slurmctld, sshd and (only if up.sh started it) munged, each by the pid in its pid file.
# Keys, Slurm state and logs stay in DIR, so the next up.sh is fast and job ids keep growing.
# Usage: tests/cluster/down.sh [DIR]
set -euo pipefail
prog=down.sh
# shellcheck source=tests/cluster/lib.sh
. "$(dirname "$0")/lib.sh"

case ${1:-} in
    -h | --help)
        echo "usage: tests/cluster/down.sh [DIR]   (DIR as given to up.sh; default" \
            "\$HPCBRIDGE_TEST_CLUSTER_DIR or /tmp/hpcbridge-ci-cluster)"
        exit 0
        ;;
    -*) echo "down.sh: unknown option $1" >&2; exit 2 ;;
esac
if [[ $(id -u) -ne 0 ]]; then
    echo "down.sh: must run as root (it stops the daemons that up.sh started as root)" >&2
    exit 1
fi

dir=${1:-${HPCBRIDGE_TEST_CLUSTER_DIR:-/tmp/hpcbridge-ci-cluster}}
if [[ ! -d $dir ]]; then
    echo "down.sh: no cluster folder $dir; nothing to stop"
    exit 0
fi
dir=$(cd "$dir" && pwd -P)
conf=/etc/slurm/slurm.conf
marker="# Written by hpcbridge tests/cluster/up.sh"

exec 9>"$dir/.lock"
flock -w 120 9 || { echo "down.sh: another up.sh/down.sh holds $dir/.lock" >&2; exit 1; }

rm -f "$dir/cluster.json"


# stop FILE:NAME...: TERM each process whose pid file FILE names a live NAME, all at once (slurmctld
# alone takes seconds to save its state), wait up to 30 s for all of them, then KILL what is left.
stopped=()
stop() {
    local arg pid i alive names=() pids=()
    for arg in "$@"; do
        pid=$(pid_of "${arg%%:*}" "${arg##*:}")
        if [[ -n $pid ]] && kill "$pid" 2>/dev/null; then
            pids+=("$pid")
            names+=("${arg##*:}")
        fi
    done
    for ((i = 0; i < 600; i++)); do
        alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [[ $alive -eq 1 ]] || break
        sleep 0.05
    done
    for i in "${!pids[@]}"; do
        if kill -0 "${pids[$i]}" 2>/dev/null; then
            kill -KILL "${pids[$i]}" 2>/dev/null || true
            stopped+=("${names[$i]}(${pids[$i]}, killed after 30 s)")
        else
            stopped+=("${names[$i]}(${pids[$i]})")
        fi
    done
}

# Cancel leftover jobs first, while slurmctld and slurmd can still end them cleanly.
ctld=$(pid_of "$dir/slurmctld.pid" slurmctld)
if [[ -n $ctld ]] && command -v squeue >/dev/null; then
    jobs=$(squeue -h -t PENDING,RUNNING,SUSPENDED,CONFIGURING,COMPLETING -o %A 2>/dev/null || true)
    if [[ -n $jobs ]]; then
        # shellcheck disable=SC2086 # one id per word
        scancel $jobs 2>/dev/null || true
        for ((i = 0; i < 200; i++)); do
            [[ -z $(squeue -h -t RUNNING,COMPLETING,CONFIGURING -o %A 2>/dev/null) ]] && break
            sleep 0.05
        done
        echo "down.sh: cancelled jobs ${jobs//$'\n'/ }"
    fi
fi

t0=$(date +%s.%N)
stop "$dir/slurmd.pid:slurmd" "$dir/slurmctld.pid:slurmctld" "$dir/sshd.pid:sshd"
# Which DIR the current slurm.conf belongs to: a later up.sh with another DIR takes Slurm over.
conf_dir=$(sed -n "s|^$marker (DIR=\(.*\)); .*|\1|p" "$conf" 2>/dev/null | head -n 1)
other=""
if [[ -n $conf_dir && $conf_dir != "$dir" && -n $(pid_of "$conf_dir/slurmctld.pid" slurmctld) ]]; then
    other=$conf_dir
fi

# munged only when up.sh started it (up.sh writes DIR/munged.pid then, and only then), and not
# while the cluster of another DIR still uses it: that one's down.sh will stop it instead.
munged=$(pid_of "$dir/munged.pid" munged)
if [[ -n $munged && $(pid_of /run/munge/munged.pid munged) == "$munged" ]]; then
    if [[ -n $other ]]; then
        [[ -s $other/munged.pid ]] || cp "$dir/munged.pid" "$other/munged.pid"
        echo "down.sh: munged left running for the cluster in $other"
    else
        stop "$dir/munged.pid:munged"
    fi
fi
rm -f "$dir/munged.pid"

# Put back a slurm.conf that was there before up.sh wrote ours.
if [[ -f $conf.hpcbridge-backup && $conf_dir == "$dir" ]]; then
    mv -f "$conf.hpcbridge-backup" "$conf"
    echo "down.sh: restored the earlier $conf"
fi

took=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
echo "down.sh: stopped ${stopped[*]:-nothing (no daemon of ours was running)} in $took s; $dir kept"
