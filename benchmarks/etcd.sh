#!/usr/bin/env bash
# benchmarks/etcd.sh - a private, single-member etcd on 127.0.0.1, for the benchmarks'
# "what a team would use instead" comparison (benchmarks/e2e.py). Modelled on
# deploy/local/redis.sh.
#
# Installs Debian's etcd-server with apt-get if it is missing (without letting the
# package's system service start on 2379), then runs one member listening on loopback
# only, with its data dir, pid file and log in the run dir. Clients talk to it through
# gRPC or the JSON gateway (/v3/kv/put, /v3/watch) on the client port.
#
#   etcd.sh start    install if needed, start, wait until /health says true
#   etcd.sh stop     stop the member we started and delete its data
#   etcd.sh status   exit 0 if our member runs and answers (3 if it does not run)
#   etcd.sh version  print the installed etcd version
#
# Environment:
#   CONFIGBUS_ETCD_PORT           client port (default: a free one, printed by start)
#   CONFIGBUS_ETCD_PEER_PORT      peer port (default: a free one)
#   CONFIGBUS_RUN_DIR             run dir parent (default deploy/local/run); uses ./etcd in it
#   CONFIGBUS_ETCD_START_TIMEOUT  seconds to wait for health (default 30)
#
# `start` prints "etcd ready on http://127.0.0.1:PORT" as its last line. Exit status 4
# from start means etcd-server is not installed and apt-get could not install it.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RUN_DIR="${CONFIGBUS_RUN_DIR:-$HERE/../deploy/local/run}/etcd"
START_TIMEOUT="${CONFIGBUS_ETCD_START_TIMEOUT:-30}"
STOP_TIMEOUT=10

PID_FILE="$RUN_DIR/etcd.pid"
PORT_FILE="$RUN_DIR/port"
LOG_FILE="$RUN_DIR/etcd.log"
DATA_DIR="$RUN_DIR/data"

NAME=etcd.sh
# shellcheck source=deploy/local/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../deploy/local/lib.sh"

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

ensure_installed() { apt_install etcd-server etcd 4; }

healthy() { # healthy PORT
    python3 - "$1" <<'EOF' 2>/dev/null
import json, sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=2) as response:
    sys.exit(0 if json.load(response).get("health") == "true" else 1)
EOF
}

# True while the process runs; a zombie (exited, not yet reaped) counts as gone.

# Sets PID and PORT for the member we started, if it still runs; the cmdline check
# guards against the pid having been reused by something else.
PID="" PORT=""
find_running() {
    [[ -f "$PID_FILE" ]] || return 1
    PID="$(<"$PID_FILE")"
    alive "$PID" && tr '\0' ' ' <"/proc/$PID/cmdline" | grep -qF -- "--data-dir $DATA_DIR" || return 1
    PORT="$(<"$PORT_FILE")"
}

cmd_start() {
    ensure_installed
    if find_running; then
        healthy "$PORT" || die "etcd pid $PID runs but is not healthy on port $PORT"
        echo "etcd already running (pid $PID)"
        echo "etcd ready on http://127.0.0.1:$PORT"
        return 0
    fi
    rm -f "$PID_FILE"
    PORT="${CONFIGBUS_ETCD_PORT:-$(free_port)}"
    local peer="${CONFIGBUS_ETCD_PEER_PORT:-$(free_port)}"
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
        die "port $PORT on 127.0.0.1 is already in use (set CONFIGBUS_ETCD_PORT)"
    fi
    rm -rf "$DATA_DIR"
    mkdir -p "$DATA_DIR"
    echo "$PORT" >"$PORT_FILE"
    # setsid: its own session, so a Ctrl-C in the caller's terminal does not reach it.
    setsid etcd \
        --name bench \
        --data-dir "$DATA_DIR" \
        --listen-client-urls "http://127.0.0.1:$PORT" \
        --advertise-client-urls "http://127.0.0.1:$PORT" \
        --listen-peer-urls "http://127.0.0.1:$peer" \
        --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
        --initial-cluster "bench=http://127.0.0.1:$peer" \
        --initial-cluster-state new \
        --log-level warn \
        </dev/null >"$LOG_FILE" 2>&1 &
    echo $! >"$PID_FILE"
    PID="$(<"$PID_FILE")"

    local deadline=$((SECONDS + START_TIMEOUT))
    until healthy "$PORT"; do
        if ! alive "$PID" || ((SECONDS >= deadline)); then
            tail -n 50 "$LOG_FILE" >&2 || true
            cmd_stop >/dev/null
            die "etcd did not become healthy within ${START_TIMEOUT}s (log: $LOG_FILE)"
        fi
        sleep 0.1
    done
    echo "etcd ready on http://127.0.0.1:$PORT"
}

cmd_stop() {
    if find_running; then
        terminate "$PID" "$STOP_TIMEOUT"
        echo "etcd stopped (pid $PID)"
    else
        echo "etcd not running"
    fi
    rm -rf "$PID_FILE" "$PORT_FILE" "$DATA_DIR"
}

cmd_status() {
    if ! find_running; then
        echo "etcd not running"
        return 3
    fi
    if healthy "$PORT"; then
        echo "etcd running (pid $PID) on http://127.0.0.1:$PORT"
    else
        echo "etcd process $PID runs but is not healthy on port $PORT"
        return 1
    fi
}

cmd_version() {
    command -v etcd >/dev/null || die "etcd is not installed" 4
    etcd --version | sed -n 's/^etcd Version: //p'
}

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
version) cmd_version ;;
*)
    echo "usage: $0 start | stop | status | version" >&2
    exit 2
    ;;
esac
