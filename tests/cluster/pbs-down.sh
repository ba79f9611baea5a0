#!/usr/bin/env bash
# Stop the PBS Pro test cluster that tests/cluster/pbs-up.sh started: delete leftover jobs, stop
# PBS's daemons (its own init script, which stops them by their pid files) and the cluster's sshd
# (by its pid file). The installation in /opt/pbs, the job history, keys and logs stay, so the
# next pbs-up.sh takes seconds. Usage: tests/cluster/pbs-down.sh [DIR]
set -euo pipefail
prog=pbs-down.sh
# shellcheck source=tests/cluster/lib.sh
. "$(dirname "$0")/lib.sh"

case ${1:-} in
    -h | --help)
        echo "usage: tests/cluster/pbs-down.sh [DIR]   (DIR as given to pbs-up.sh; default" \
            "\$HPCBRIDGE_TEST_PBS_DIR or /tmp/hpcbridge-ci-pbs)"
        exit 0
        ;;
    -*) echo "pbs-down.sh: unknown option $1" >&2; exit 2 ;;
esac
if [[ $(id -u) -ne 0 ]]; then
    echo "pbs-down.sh: must run as root (it stops the daemons that pbs-up.sh started)" >&2
    exit 1
fi
dir=${1:-${HPCBRIDGE_TEST_PBS_DIR:-/tmp/hpcbridge-ci-pbs}}
if [[ ! -d $dir ]]; then
    echo "pbs-down.sh: no cluster folder $dir; nothing to stop"
    exit 0
fi
dir=$(cd "$dir" && pwd -P)
export PATH=/opt/pbs/bin:/opt/pbs/sbin:$PATH

exec 9>"$dir/.lock"
flock -w 120 9 || { echo "pbs-down.sh: another pbs-up.sh/pbs-down.sh holds $dir/.lock" >&2; exit 1; }
rm -f "$dir/cluster.json"

if command -v qselect >/dev/null && qstat -B >/dev/null 2>&1; then
    mapfile -t live < <(qselect 2>/dev/null || true)
    if [[ ${#live[@]} -gt 0 ]]; then
        qdel -W force "${live[@]}" >/dev/null 2>&1 || true
        echo "pbs-down.sh: deleted ${#live[@]} leftover job(s)"
    fi
fi
if [[ -x /etc/init.d/pbs ]]; then
    /etc/init.d/pbs stop >>"$dir/logs/stop.log" 2>&1 9>&- || echo "pbs-down.sh: PBS did not stop cleanly; see $dir/logs/stop.log" >&2
fi
sshd_pid=$(pid_of "$dir/sshd.pid" sshd)
[[ -z $sshd_pid ]] || stop_pid "$sshd_pid"
rm -f "$dir/sshd.pid"
echo "PBS Pro test cluster stopped (installation, history and logs kept; $dir)"
