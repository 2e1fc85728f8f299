# shellcheck shell=bash
# Shared by the service scripts (deploy/local/kafka.sh, redis.sh, benchmarks/etcd.sh).
# Source it after setting NAME (used to prefix messages).

log() { echo "$NAME: $*" >&2; }

die() { # die MESSAGE [EXIT_STATUS]
    log "error: $1"
    exit "${2:-1}"
}

as_root() { if ((EUID == 0)); then "$@"; else sudo "$@"; fi; }

# True while the process runs; a zombie (exited, not yet reaped) counts as gone.
alive() { [[ "$(ps -o stat= -p "$1" 2>/dev/null)" == [^Z]* ]]; }

# terminate PID SECONDS: SIGTERM, wait up to SECONDS for a clean exit, then SIGKILL.
terminate() {
    local pid=$1 seconds=$2 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < seconds * 10; i++)); do
        alive "$pid" || return 0
        sleep 0.1
    done
    log "pid $pid ignored SIGTERM for ${seconds}s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}
