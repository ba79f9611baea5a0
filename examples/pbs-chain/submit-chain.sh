#!/bin/bash
# Submit one scan's chain: stage-in.pbs -> convert.pbs -> stage-out.pbs, each job starting only
# when the one before it exited 0 (qsub -W depend=afterok:ID). Prints the three job ids.
#
#   HPCBRIDGE_HOME=$HOME/.hpcbridge-chain ./submit-chain.sh PROJECT/SUBJECT/EXPERIMENT/SCAN
#
# Environment:
#   HPCBRIDGE_HOME   required: a private (0700) folder where `hpcbridge login` stored a token;
#                    the jobs read their XNAT credentials from it and from nowhere else
#   CHAIN_WORK       where each scan gets its folder (default: ./hpcbridge-chains); on a
#                    cluster, scratch space the compute nodes see, e.g. /scratch/PTV000/chains
#   HPCBRIDGE        the hpcbridge the jobs run (default: the one on PATH now)
#   PBS_PROJECT      qsub -P for every job (PBS Pro sites such as Artemis require a project)
#   TRANSFER_QUEUE   queue of the stage-in and stage-out jobs (Artemis: dtq)
#   COMPUTE_QUEUE    queue of the conversion job
#   DCM2NIIX_MODULE  module the conversion loads where `module` exists (default: dcm2niix;
#                    empty: none)
#   DCM2NIIX         the dcm2niix the conversion runs where it loads no module (default: the
#                    one on PATH now, if any; else the one on the job's own PATH)
set -euo pipefail

die() {
    echo "submit-chain.sh: $*" >&2
    exit 1
}

[ $# -eq 1 ] || die "usage: submit-chain.sh PROJECT/SUBJECT/EXPERIMENT/SCAN"
scan=$1
[[ $scan =~ ^[A-Za-z0-9_-]+/[A-Za-z0-9_-]+/[A-Za-z0-9_-]+/[A-Za-z0-9_.-]+$ ]] \
    || die "$scan is not PROJECT/SUBJECT/EXPERIMENT/SCAN"
here=$(cd -- "$(dirname -- "$0")" && pwd)

# The jobs authenticate with the alias token in HPCBRIDGE_HOME. A password never goes to them:
# qsub arguments, job scripts and qsub -v variables are all readable by other users (ps,
# qstat -f), and Slurm and qsub -V hand the submitting shell's variables to the job.
unset HPCBRIDGE_PASSWORD XNAT_PASS
[ -n "${HPCBRIDGE_HOME:-}" ] \
    || die "set HPCBRIDGE_HOME to a private folder, then \`hpcbridge login\` once with it set"
token=$HPCBRIDGE_HOME/credentials.json
[ -f "$token" ] || die "no token in $HPCBRIDGE_HOME: run \`hpcbridge login --xnat URL\` with it set"
for private in "$HPCBRIDGE_HOME" "$token"; do
    mode=$(stat -c %a -- "$private")
    [[ $mode == *00 ]] || die "$private is open to other users (mode $mode): chmod go= $private"
done
hpcbridge=${HPCBRIDGE:-$(command -v hpcbridge)} || die "hpcbridge is not on PATH; set HPCBRIDGE"
# The jobs do not see this shell's PATH on PBS Pro (they get their login shell's), so chain.env
# names the programs found on it now: the hpcbridge above, and dcm2niix (a virtualenv's, say).
dcm2niix=${DCM2NIIX:-$(command -v dcm2niix || true)}
export HPCBRIDGE_HOME

# Fail here, not in a job hours from now, when the token is missing, refused or expired.
who=$("$hpcbridge" whoami) \
    || die "the token in $HPCBRIDGE_HOME does not work: \`hpcbridge login\` again"
server=$(awk '$1 == "server" { print $2 }' <<<"$who")
[[ $who == *"alias token"* ]] || die "$HPCBRIDGE_HOME holds no alias token: \`hpcbridge login\`"

# One folder per scan; the path goes into qsub arguments, which Slurm's qsub does not quote.
folder=${CHAIN_WORK:-$PWD/hpcbridge-chains}/${scan//\//_}
[[ $folder =~ ^[A-Za-z0-9_./+@-]+$ ]] || die "$folder: use a path without spaces or quotes"
mkdir -p -- "$folder/logs"
folder=$(cd -- "$folder" && pwd)
{
    echo "# written by submit-chain.sh for $scan; read by its three jobs"
    printf 'export HPCBRIDGE_HOME=%q\n' "$HPCBRIDGE_HOME"
    printf 'export HPCBRIDGE_XNAT=%q\n' "$server"
    printf 'SCAN=%q\n' "$scan"
    printf 'HPCBRIDGE=%q\n' "$hpcbridge"
    printf 'DCM2NIIX_MODULE=%q\n' "${DCM2NIIX_MODULE-dcm2niix}"
    printf 'DCM2NIIX=%q\n' "$dcm2niix"
} >"$folder/chain.env"

project=()
[ -n "${PBS_PROJECT:-}" ] && project=(-P "$PBS_PROJECT")
submitted=()

# qsub STEP QUEUE [qsub options]: submit STEP.pbs; on failure remove the jobs already queued.
submit() {
    local step=$1 queue=$2 out id
    shift 2
    # ${a[@]+...}: bash before 4.4 (CentOS 7 login nodes) calls an empty array unbound.
    if ! out=$(qsub ${project[@]+"${project[@]}"} ${queue:+-q "$queue"} "$@" \
        -o "$folder/logs/$step.out" -e "$folder/logs/$step.err" "$here/$step.pbs"); then
        # One id per qdel: PBS Pro deletes none of several ids when one of them has ended.
        for id in ${submitted[@]+"${submitted[@]}"}; do
            qdel "$id" || true
        done
        die "qsub of $step.pbs failed${out:+: $out}"
    fi
    submitted+=("$out")
}

# The jobs start in the folder they were submitted from (PBS_O_WORKDIR).
cd -- "$folder"
submit stage-in "${TRANSFER_QUEUE:-}"
submit convert "${COMPUTE_QUEUE:-}" -W "depend=afterok:${submitted[0]}"
submit stage-out "${TRANSFER_QUEUE:-}" -W "depend=afterok:${submitted[1]}"

echo "$scan: jobs ${submitted[0]} -> ${submitted[1]} -> ${submitted[2]}" \
    "(stage-in -> convert -> stage-out); logs in $folder/logs" >&2
echo "${submitted[@]}"
