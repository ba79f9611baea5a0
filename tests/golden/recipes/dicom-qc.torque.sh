#!/bin/bash
#PBS -N dicom-qc
#PBS -l nodes=1:ppn=1
#PBS -l mem=1024mb
#PBS -l walltime=00:10:00
#PBS -o /work/.hpcbridge/job.out
#PBS -e /work/.hpcbridge/job.err
# Torque job written by hpcbridge
set -uo pipefail
HPCBRIDGE_WORK=/work
HPCBRIDGE_STATE="$HPCBRIDGE_WORK/.hpcbridge"
mkdir -p "$HPCBRIDGE_STATE"
cd "$HPCBRIDGE_WORK" || exit 1
# The job records its own outcome (exit code and end time) even when the scheduler forgets it.
hpcbridge_finish() {
    rc=$?
    printf '{"exit_code": %d, "end": "%s", "job_id": "%s"}\n' "$rc" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
        "${PBS_JOBID:-${SLURM_JOB_ID:-${HPCBRIDGE_JOB_ID:-}}}" > "$HPCBRIDGE_STATE/status.json.part"
    mv "$HPCBRIDGE_STATE/status.json.part" "$HPCBRIDGE_STATE/status.json"
}
trap hpcbridge_finish EXIT
printf '{"start": "%s", "host": "%s"}\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(hostname)" \
    > "$HPCBRIDGE_STATE/started.json"
set -e

mkdir -p /work/out
# Recipe dicom-qc
python3 -m hpcbridge.qc /work/in /work/out
