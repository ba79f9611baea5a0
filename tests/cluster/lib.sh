# Helpers shared by the test clusters' up and down scripts; source it after setting $prog.
# (Not executable on its own.)

die() {
    echo "$prog: $*" >&2
    exit 1
}

show_log() { # show_log FILE: the end of a log, to say why something failed
    [[ -s $1 ]] && { echo "--- last lines of $1:" >&2; tail -n 20 "$1" >&2; }
    return 0
}

# pid_of FILE NAME: the pid in FILE when that process is alive and is NAME, else nothing.
pid_of() {
    local pid
    [[ -s $1 ]] || return 0
    pid=$(tr -dc '0-9' <"$1")
    [[ -n $pid && -r /proc/$pid/comm && $(</proc/"$pid"/comm) == "$2" ]] && echo "$pid"
    return 0
}

# stop_pid PID: TERM, wait up to 10 s, then KILL. Only ever called with pids from our pid files.
stop_pid() {
    local pid=$1 i
    kill "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 200; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.05
    done
    kill -KILL "$pid" 2>/dev/null || true
}

# wait_for SECONDS COMMAND...: poll COMMAND every 0.05 s until it succeeds or time runs out.
wait_for() {
    local limit=$1 i
    shift
    for ((i = 0; i < limit * 20; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    return 1
}
