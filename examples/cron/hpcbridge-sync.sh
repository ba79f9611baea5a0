#!/bin/bash
# One `hpcbridge sync` pass for cron, with a timestamp on every line and its exit code kept.
#
#   hpcbridge-sync.sh [RUN_ID] [more sync options]
#
# A pass that is still running (a slow upload, a busy login node) makes the next one skip
# instead of starting a second sync of the same run beside it, which cron would otherwise do
# every 10 minutes until the machine is full of them.
#
# Environment: HPCBRIDGE (the hpcbridge command, default: the one on PATH), HPCBRIDGE_PROFILE
# and the other HPCBRIDGE_* settings, HPCBRIDGE_SYNC_LOCK (the lock file, default
# $HPCBRIDGE_HOME/sync.lock; give each cron line its own, or they skip each other).
set -u

log() {
    printf '%s %s\n' "$(date '+%Y-%m-%dT%H:%M:%S%z')" "$*"
}

hpcbridge=${HPCBRIDGE:-hpcbridge}
home=${HPCBRIDGE_HOME:-${XDG_DATA_HOME:-$HOME/.local/share}/hpcbridge}
lock=${HPCBRIDGE_SYNC_LOCK:-$home/sync.lock}

mkdir -p -- "$(dirname -- "$lock")" || exit 1
# The lock is held on this descriptor, which hpcbridge inherits: if this wrapper is killed, the
# lock stays held until the sync it started has ended too.
if ! exec 9>>"$lock"; then
    log "error: cannot open the lock file $lock"
    exit 1
fi
if ! flock -n 9; then
    log "another sync pass still holds $lock; skipping this one"
    exit 0
fi

log "starting: hpcbridge sync${*:+ $*}"
"$hpcbridge" sync "$@" 2>&1 | while IFS= read -r line; do log "$line"; done
status=${PIPESTATUS[0]}
log "hpcbridge sync exited with $status"
exit "$status"
