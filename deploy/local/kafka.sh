#!/usr/bin/env bash
# deploy/local/kafka.sh - a real, single-node Apache Kafka broker for tests and demos.
#
# One JVM runs both the KRaft controller and the broker, listening on 127.0.0.1
# only. The jars come from Maven Central (pom.xml next to this script pins the
# version) and are cached in deploy/local/.cache; config, data, pid file and log
# live in the run dir.
#
#   kafka.sh start          fetch jars if missing, format storage once, start, wait until ready
#   kafka.sh stop [--wipe]  stop the broker we started (--wipe also deletes its data)
#   kafka.sh status         exit 0 if our broker runs and answers (3 if it does not run)
#   kafka.sh logs [-f]      show (or follow) the broker log
#
# With CONFIGBUS_KAFKA_SECURITY=1 (or through kafka-secure.sh) the broker is a secured
# one instead: TLS and SASL/SCRAM listeners, ACLs enforced, certificates and users made
# at start; its own run dir and ports (see kafka-secure.sh).
#
# Environment:
#   CONFIGBUS_KAFKA_PORT             client port (default 19092)
#   CONFIGBUS_KAFKA_CONTROLLER_PORT  KRaft controller port (default 19093)
#   CONFIGBUS_RUN_DIR                parent of the run dir (default deploy/local/run); we use ./kafka
#   CONFIGBUS_KAFKA_START_TIMEOUT    seconds to wait until the broker is ready (default 60)
#   CONFIGBUS_BOOTSTRAP_SERVERS      if set and answering, `start` reuses that cluster instead
#   KAFKA_HEAP_OPTS                  JVM heap flags (default "-Xms256m -Xmx1g")
#   CONFIGBUS_KAFKA_SECURITY         1: the secured broker (kafka-secure.sh); default 0
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KAFKA_VERSION="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$HERE/pom.xml")"
LIBS="$HERE/.cache/kafka-$KAFKA_VERSION/libs"

SECURE="${CONFIGBUS_KAFKA_SECURITY:-0}"
if [[ "$SECURE" != [01] ]]; then
    echo "kafka.sh: error: CONFIGBUS_KAFKA_SECURITY=$SECURE: say 0 or 1" >&2
    exit 2
fi
if ((SECURE)); then # its own run dir and ports: it can run beside the plain broker
    RUN_DIR="${CONFIGBUS_RUN_DIR:-$HERE/run}/kafka-secure"
    PORT="${CONFIGBUS_KAFKA_PORT:-19094}"
    CONTROLLER_PORT="${CONFIGBUS_KAFKA_CONTROLLER_PORT:-19096}"
else
    RUN_DIR="${CONFIGBUS_RUN_DIR:-$HERE/run}/kafka"
    PORT="${CONFIGBUS_KAFKA_PORT:-19092}"
    CONTROLLER_PORT="${CONFIGBUS_KAFKA_CONTROLLER_PORT:-19093}"
fi
START_TIMEOUT="${CONFIGBUS_KAFKA_START_TIMEOUT:-60}"
STOP_TIMEOUT=30

PID_FILE="$RUN_DIR/kafka.pid"
BOOTSTRAP_FILE="$RUN_DIR/bootstrap" # "127.0.0.1:PORT" of the broker that runs
LOG_FILE="$RUN_DIR/kafka.log"
DATA_DIR="$RUN_DIR/data"

read -r -a HEAP_OPTS <<<"${KAFKA_HEAP_OPTS:--Xms256m -Xmx1g}"
JAVA_OPTS=(
    "${HEAP_OPTS[@]}" -XX:+UseG1GC -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true
    -Dlog4j2.configurationFile="$RUN_DIR/log4j2.properties"
    # Keep logging until Kafka's own shutdown hook has finished (the appender is synchronous).
    -Dlog4j2.shutdownHookEnabled=false
    -cp "$LIBS/*"
)

NAME=kafka.sh
# shellcheck source=deploy/local/lib.sh
source "$HERE/lib.sh"

# Sets PID and BOOTSTRAP for the broker we started, if it still runs; the
# cmdline check guards against the pid having been reused by something else.
PID="" BOOTSTRAP=""
find_running() {
    [[ -f "$PID_FILE" ]] || return 1
    PID="$(<"$PID_FILE")"
    alive "$PID" && tr '\0' ' ' <"/proc/$PID/cmdline" | grep -qF "kafka.Kafka $RUN_DIR/" || return 1
    BOOTSTRAP="$(<"$BOOTSTRAP_FILE")"
}

ready() { # ready BOOTSTRAP_SERVERS TIMEOUT [PID]; exit status as kafka_ready.py
    python3 "$HERE/kafka_ready.py" "$1" --timeout "$2" ${3:+--pid "$3"} >/dev/null
}

# Hooks the secured broker (kafka-secure.sh) replaces: the listeners and their security,
# what is made before the storage is formatted, the extra arguments of the format, the
# other ports it needs, what `start` prints, and what `stop --wipe` removes.
listener_config() {
    cat <<EOF
listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$PORT
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
EOF
}
prepare() { :; }
FORMAT_ARGS=()
extra_ports() { :; }
announce() { echo "kafka ready on 127.0.0.1:$PORT (Kafka $KAFKA_VERSION, KRaft)"; }
wipe() { rm -rf "$DATA_DIR"; }

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

fetch_jars() {
    [[ -f "$LIBS/kafka_2.13-$KAFKA_VERSION.jar" ]] && return 0
    command -v mvn >/dev/null || die "mvn not found; Maven is needed to fetch the Kafka jars"
    log "fetching the Kafka $KAFKA_VERSION jars from Maven Central (once) ..."
    # Fetch into a temp dir and rename it, so an interrupted fetch never looks complete.
    local tmp="$LIBS.tmp.$$" out
    if ! out="$(mvn -q -B -f "$HERE/pom.xml" dependency:copy-dependencies -Dlibs.dir="$tmp" 2>&1)"; then
        echo "$out" | tail -n 30 >&2
        rm -rf "$tmp"
        die "mvn could not fetch the Kafka $KAFKA_VERSION jars (output above)"
    fi
    mv -T "$tmp" "$LIBS" 2>/dev/null || rm -rf "$tmp" # another start fetched them meanwhile
}

write_config() {
    mkdir -p "$RUN_DIR"
    cat >"$RUN_DIR/server.properties" <<EOF
# Generated by deploy/local/kafka.sh; overwritten on every start.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$CONTROLLER_PORT
controller.listener.names=CONTROLLER
$(listener_config)
log.dirs=$DATA_DIR

# A single node: every internal topic gets one replica, and one in-sync replica suffices.
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Few partitions for the internal topics: faster first use of groups and transactions.
offsets.topic.num.partitions=1
transaction.state.log.num.partitions=1
num.partitions=1

# Topics are created explicitly; consumer groups settle without the usual 3 s delay.
auto.create.topics.enable=false
group.initial.rebalance.delay.ms=0
# The log cleaner does compaction; look for work every second, not every 15 s.
log.cleaner.enable=true
log.cleaner.backoff.ms=1000
EOF
    cat >"$RUN_DIR/log4j2.properties" <<'EOF'
# Broker logs go to stdout, which kafka.sh appends to kafka.log.
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
logger.state.name = state.change.logger
logger.state.level = WARN
EOF
}

format_storage() {
    [[ -f "$DATA_DIR/meta.properties" ]] && return 0
    # A cluster id is 16 random bytes in unpadded base64url (22 characters). It may start
    # with "-", hence --cluster-id=ID: the argument parser would take "-..." for an option.
    local cluster_id
    cluster_id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')"
    java "${JAVA_OPTS[@]}" kafka.tools.StorageTool format --ignore-formatted \
        --cluster-id="$cluster_id" --config "$RUN_DIR/server.properties" "${FORMAT_ARGS[@]}" \
        >>"$LOG_FILE" 2>&1 || {
        tail -n 50 "$LOG_FILE" >&2
        die "formatting the storage in $DATA_DIR failed"
    }
}

cmd_start() {
    if [[ -n "${CONFIGBUS_BOOTSTRAP_SERVERS:-}" ]]; then
        if ready "$CONFIGBUS_BOOTSTRAP_SERVERS" 5; then
            echo "kafka: reusing the cluster at $CONFIGBUS_BOOTSTRAP_SERVERS (CONFIGBUS_BOOTSTRAP_SERVERS)"
            return 0
        fi
        log "CONFIGBUS_BOOTSTRAP_SERVERS=$CONFIGBUS_BOOTSTRAP_SERVERS does not answer; starting a local broker"
    fi
    if find_running; then
        ready "$BOOTSTRAP" "$START_TIMEOUT" "$PID" || die "broker pid $PID runs but does not answer on $BOOTSTRAP"
        echo "kafka already running (pid $PID) on $BOOTSTRAP (Kafka $KAFKA_VERSION, KRaft)"
        return 0
    fi
    rm -f "$PID_FILE" "$BOOTSTRAP_FILE"
    for port in "$PORT" "$CONTROLLER_PORT" $(extra_ports); do
        port_in_use "$port" &&
            die "port $port on 127.0.0.1 is in use (set CONFIGBUS_KAFKA_PORT / CONFIGBUS_KAFKA_CONTROLLER_PORT)"
    done
    command -v java >/dev/null || die "java not found (Kafka $KAFKA_VERSION needs Java 17+)"

    fetch_jars
    mkdir -p "$RUN_DIR"
    prepare
    write_config
    format_storage

    echo "=== kafka.sh start $(date -Is)" >>"$LOG_FILE"
    java "${JAVA_OPTS[@]}" kafka.Kafka "$RUN_DIR/server.properties" </dev/null >>"$LOG_FILE" 2>&1 &
    PID=$!
    echo "$PID" >"$PID_FILE"
    echo "127.0.0.1:$PORT" >"$BOOTSTRAP_FILE"

    local status=0
    ready "127.0.0.1:$PORT" "$START_TIMEOUT" "$PID" || status=$?
    if ((status != 0)); then
        tail -n 50 "$LOG_FILE" >&2
        ((status == 3)) && die "the broker exited during start-up (log: $LOG_FILE)"
        cmd_stop >/dev/null
        die "the broker was not ready within ${START_TIMEOUT}s (log: $LOG_FILE)"
    fi
    announce
}

cmd_stop() {
    if find_running; then
        terminate "$PID" "$STOP_TIMEOUT" # a clean KRaft shutdown takes a moment
        echo "kafka stopped (pid $PID)"
    else
        echo "kafka not running"
    fi
    rm -f "$PID_FILE" "$BOOTSTRAP_FILE"
    if [[ "${1:-}" == --wipe ]]; then
        wipe
        echo "kafka data wiped ($DATA_DIR)"
    fi
}

cmd_status() {
    if ! find_running; then
        echo "kafka not running"
        return 3
    fi
    if ! ready "$BOOTSTRAP" 2; then
        echo "kafka process $PID runs but does not answer on $BOOTSTRAP"
        return 1
    fi
    echo "kafka running (pid $PID) on $BOOTSTRAP (Kafka $KAFKA_VERSION, KRaft)"
}

cmd_logs() {
    [[ -f "$LOG_FILE" ]] || die "no log yet ($LOG_FILE)"
    if [[ "${1:-}" == -f ]]; then
        exec tail -n 100 -f "$LOG_FILE"
    fi
    tail -n 200 "$LOG_FILE"
}

USAGE="start | stop [--wipe] | status | logs [-f]"
if ((SECURE)); then
    # shellcheck source=deploy/local/kafka-secure.sh
    source "$HERE/kafka-secure.sh" # replaces the hooks above, adds `client-cert`
fi

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop "${2:-}" ;;
status) cmd_status ;;
logs) cmd_logs "${2:-}" ;;
client-cert) if ((SECURE)); then cmd_client_cert "${@:2}"; else
    echo "kafka.sh: client-cert: only with CONFIGBUS_KAFKA_SECURITY=1" >&2
    exit 2
fi ;;
*)
    echo "usage: $0 $USAGE" >&2
    exit 2
    ;;
esac
