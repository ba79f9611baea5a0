#!/bin/bash
#PBS -N a_b_c__touch__tmp_x
#PBS -l nodes=1:ppn=2
#PBS -l mem=512mb
#PBS -l walltime=100:00:00
#PBS -o /work/.hpcbridge/job.out
#PBS -e /work/.hpcbridge/job.err
# Torque job written by hpcbridge
# Secrets stop here, whether qsub -V, a site's default export or a login shell passed them on.
unset HPCBRIDGE_PASSWORD NETRC XNATPY_JSESSION XNATPY_PASS XNAT_PASS
set -uo pipefail
HPCBRIDGE_WORK=/work
HPCBRIDGE_STATE="$HPCBRIDGE_WORK/.hpcbridge"
# Array tasks share the work folder, so each records its outcome under its own index.
HPCBRIDGE_TASK="${PBS_ARRAY_INDEX:-${PBS_ARRAYID:-${SLURM_ARRAY_TASK_ID:-${HPCBRIDGE_ARRAY_INDEX:-}}}}"
HPCBRIDGE_TAG="${HPCBRIDGE_TASK:+.$HPCBRIDGE_TASK}"
mkdir -p "$HPCBRIDGE_STATE"
cd "$HPCBRIDGE_WORK" || exit 1
# The job records its own outcome (exit code and end time) even when the scheduler forgets it.
hpcbridge_finish() {
    rc=$?
    printf '{"exit_code": %d, "end": "%s", "job_id": "%s"}\n' "$rc" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
        "${PBS_JOBID:-${SLURM_JOB_ID:-${HPCBRIDGE_JOB_ID:-}}}" > "$HPCBRIDGE_STATE/status$HPCBRIDGE_TAG.json.part"
    mv "$HPCBRIDGE_STATE/status$HPCBRIDGE_TAG.json.part" "$HPCBRIDGE_STATE/status$HPCBRIDGE_TAG.json"
}
# A bash ended by a signal runs its EXIT trap with $? still 0: walltime kills (SIGTERM) and
# cancellations would look like successes. Exit with 128 + the signal number instead.
trap 'exit 143' TERM
trap 'exit 130' INT
trap 'exit 129' HUP
trap hpcbridge_finish EXIT
printf '{"start": "%s", "host": "%s"}\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(hostname)" \
    > "$HPCBRIDGE_STATE/started$HPCBRIDGE_TAG.json"
set -e

# Environment: modules where the cluster has them, the PATH otherwise.
if command -v module >/dev/null 2>&1; then
    module load dcm2niix
else
    echo "hpcbridge: 'module' is not available here; using tools from PATH" >&2
fi

mkdir -p /work/out
# Recipe hostile
dcm2niix -f 'a b'"'"'c$(touch /tmp/x)' -o /work/out /work/in
