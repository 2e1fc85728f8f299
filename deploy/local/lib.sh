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

# apt_install PACKAGE COMMAND [EXIT_STATUS]: install Debian's PACKAGE unless COMMAND is
# on PATH, without letting the package start its own service (policy-rc.d exit 101),
# which would take the default port. Dies with EXIT_STATUS (default 1) on failure.
apt_install() {
    local package=$1 command=$2 fail=${3:-1}
    command -v "$command" >/dev/null && return 0
    command -v apt-get >/dev/null || die "$command not found and no apt-get to install $package" "$fail"
    log "installing $package with apt-get (once) ..."
    local policy=/usr/sbin/policy-rc.d apt_log="${TMPDIR:-/tmp}/configbus-$package-apt.log" status=0
    if [[ ! -e "$policy" ]]; then # only add (and remove) it if absent
        as_root sh -c "printf '#!/bin/sh\nexit 101\n' >$policy && chmod +x $policy"
        trap 'as_root rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    {
        as_root apt-get update -q &&
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
                "$package"
    } >"$apt_log" 2>&1 || status=$?
    if ((status != 0)) || ! command -v "$command" >/dev/null; then
        tail -n 30 "$apt_log" >&2
        die "apt-get could not install $package (output above)" "$fail"
    fi
}
