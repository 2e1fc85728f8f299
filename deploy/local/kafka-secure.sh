#!/usr/bin/env bash
# deploy/local/kafka-secure.sh - the local Kafka broker of kafka.sh, secured.
#
#   kafka-secure.sh start | stop [--wipe] | status | logs [-f]
#   kafka-secure.sh client-cert NAME...   issue client certificates (CN=NAME) from the CA
#
# Run directly it is `CONFIGBUS_KAFKA_SECURITY=1 kafka.sh ...`; kafka.sh sources it then
# and it replaces kafka.sh's hooks (listener_config, prepare, announce, ready, wipe). One
# JVM on 127.0.0.1, as the plain broker, with:
#
#   SASL_SSL on CONFIGBUS_KAFKA_PORT (19094)      SCRAM-SHA-512 users, TLS, no client certificate
#   SSL on CONFIGBUS_KAFKA_SSL_PORT (19095)       mutual TLS: a client certificate is required
#   CONTROLLER on CONFIGBUS_KAFKA_CONTROLLER_PORT (19096)  mutual TLS, the broker's own certificate
#
# ACLs are enforced (StandardAuthorizer, allow.everyone.if.no.acl.found=false): a principal
# may do nothing until an ACL says so (`configbus acl apply`), except the super users
# User:admin and the broker itself (User:kafka-broker). A certificate's principal is its
# CN (CN=svc-aurora is User:svc-aurora, as the SCRAM user svc-aurora is).
#
# Made in the run dir ($CONFIGBUS_RUN_DIR/kafka-secure) at start, kept across restarts:
#   tls/ca.pem, tls/ca.key             a CA made for this run dir (the key never leaves it)
#   tls/broker.pem                     the broker's key and certificate (127.0.0.1, localhost)
#   tls/clients/NAME.pem, NAME.key     client certificates, for CONFIGBUS_KAFKA_CLIENT_CERTS
#   users/NAME.password                SCRAM-SHA-512 passwords, for CONFIGBUS_KAFKA_SCRAM_USERS
#   users/NAME.env, tls/clients/NAME.env  CONFIGBUS_KAFKA_* settings of that principal
#   secure.env                         where everything is, and the admin's settings
# SCRAM users are created when the storage is formatted (the first start, or after
# `stop --wipe`); a user added to CONFIGBUS_KAFKA_SCRAM_USERS later needs a wipe.
# Passwords and keys are mode 600, and appear in no log.
#
# Environment (besides kafka.sh's):
#   CONFIGBUS_KAFKA_SSL_PORT        the mutual-TLS listener (default 19095)
#   CONFIGBUS_KAFKA_SCRAM_USERS     SCRAM users to create, e.g. "configbus-publisher svc-a" (admin always)
#   CONFIGBUS_KAFKA_CLIENT_CERTS    client certificates to issue, e.g. "svc-a" (admin always)
#   CONFIGBUS_BOOTSTRAP_SERVERS     ignored: a secured broker is always started here
set -euo pipefail

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then # run, not sourced: kafka.sh does the work
    CONFIGBUS_KAFKA_SECURITY=1 exec "$(dirname "${BASH_SOURCE[0]}")/kafka.sh" "$@"
fi

SSL_PORT="${CONFIGBUS_KAFKA_SSL_PORT:-19095}"
TLS_DIR="$RUN_DIR/tls"
CLIENTS_DIR="$TLS_DIR/clients"
USERS_DIR="$RUN_DIR/users"
ENV_FILE="$RUN_DIR/secure.env"
BROKER_CN=kafka-broker
NAME_RE='^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'
unset CONFIGBUS_BOOTSTRAP_SERVERS # the reuse check speaks plaintext; start our own
USAGE="$USAGE | client-cert NAME..."

# shellcheck disable=SC2317 # the hooks are called from kafka.sh
listener_config() {
    cat <<EOF
listeners=SASL_SSL://127.0.0.1:$PORT,SSL://127.0.0.1:$SSL_PORT,CONTROLLER://127.0.0.1:$CONTROLLER_PORT
advertised.listeners=SASL_SSL://127.0.0.1:$PORT,SSL://127.0.0.1:$SSL_PORT
inter.broker.listener.name=SSL
listener.security.protocol.map=SASL_SSL:SASL_SSL,SSL:SSL,CONTROLLER:SSL

# TLS everywhere: PEM files, made by kafka-secure.sh with openssl.
ssl.keystore.type=PEM
ssl.keystore.location=$TLS_DIR/broker.pem
ssl.truststore.type=PEM
ssl.truststore.location=$TLS_DIR/ca.pem
ssl.endpoint.identification.algorithm=https
# Client certificates: required on the SSL and controller listeners, not asked for on
# SASL_SSL (a SCRAM login names the principal there).
listener.name.ssl.ssl.client.auth=required
listener.name.controller.ssl.client.auth=required
# A certificate's principal is its CN: CN=svc-a is User:svc-a, like the SCRAM user svc-a.
ssl.principal.mapping.rules=RULE:^CN=([^,]+)$/\$1/,RULE:^CN=([^,]+),.*$/\$1/,DEFAULT

sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;

# Nothing is allowed that no ACL allows; the admin and the broker itself are exempt.
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=false
super.users=User:admin;User:$BROKER_CN
EOF
}

extra_ports() { echo "$SSL_PORT"; }

# shellcheck disable=SC2317
ready() { # ready BOOTSTRAP TIMEOUT [PID]: asks the mutual-TLS listener, as the admin
    # The port the broker's config names: `status` (or a second `start`) may run without
    # the CONFIGBUS_KAFKA_SSL_PORT the broker was started with.
    local port
    port="$(sed -n 's/^listeners=.*,SSL:\/\/127\.0\.0\.1:\([0-9]*\).*/\1/p' "$RUN_DIR/server.properties" 2>/dev/null)"
    python3 "$HERE/kafka_ready.py" "127.0.0.1:${port:-$SSL_PORT}" --timeout "$2" ${3:+--pid "$3"} \
        --cafile "$TLS_DIR/ca.pem" --certfile "$CLIENTS_DIR/admin.pem" \
        --keyfile "$CLIENTS_DIR/admin.key" >/dev/null
}

# shellcheck disable=SC2317
prepare() {
    command -v openssl >/dev/null || die "openssl not found (needed for the broker's certificates)"
    umask 077
    mkdir -p "$CLIENTS_DIR" "$USERS_DIR"
    make_ca
    [[ -s "$TLS_DIR/broker.pem" ]] || issue "$BROKER_CN" "$TLS_DIR/broker" server
    cat "$TLS_DIR/broker.key" "$TLS_DIR/broker.crt" "$TLS_DIR/ca.pem" >"$TLS_DIR/broker.pem"
    local name
    parse_names "${CONFIGBUS_KAFKA_CLIENT_CERTS:-}"
    for name in admin "${NAMES[@]}"; do
        client_cert "$name"
    done
    parse_names "${CONFIGBUS_KAFKA_SCRAM_USERS:-}"
    FORMAT_ARGS=()
    for name in admin "${NAMES[@]}"; do
        if [[ ! -s "$USERS_DIR/$name.password" ]]; then
            [[ -f "$DATA_DIR/meta.properties" ]] &&
                die "SCRAM user $name is new, but users are made when the storage is formatted: stop --wipe, then start"
            head -c 24 /dev/urandom | base64 | tr -d '+/=\n' >"$USERS_DIR/$name.password"
        fi
        # Read into the argument here, never echoed: the format's output goes to the log.
        # (It is on the format's command line for a second, visible to this user's `ps`.)
        FORMAT_ARGS+=(--add-scram "SCRAM-SHA-512=[name=$name,password=$(<"$USERS_DIR/$name.password")]")
        user_env "$name"
    done
    write_env_file
}

NAMES=()
parse_names() { # parse_names "a b,c": NAMES=(a b c) without admin and the broker; dies on a bad one
    local name
    NAMES=()
    for name in ${1//,/ }; do
        [[ "$name" =~ $NAME_RE ]] || die "$name: a principal name is 1-64 of A-Z a-z 0-9 . _ -" 2
        [[ "$name" == admin || "$name" == "$BROKER_CN" ]] || NAMES+=("$name")
    done
}

make_ca() {
    [[ -s "$TLS_DIR/ca.pem" && -s "$TLS_DIR/ca.key" ]] && return 0
    openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 \
        -days 825 -subj "/CN=configbus local CA $(hostname)" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -keyout "$TLS_DIR/ca.key" -out "$TLS_DIR/ca.pem" 2>>"$LOG_FILE" ||
        die "openssl could not make the CA (log: $LOG_FILE)"
    rm -f "$CLIENTS_DIR"/*.pem "$TLS_DIR/broker.pem" # issued by an older CA
}

issue() { # issue CN PATH_PREFIX server|client: PATH_PREFIX.key and PATH_PREFIX.crt
    local cn=$1 out=$2 kind=$3 ext
    if [[ "$kind" == server ]]; then # the broker: a server, and a client of its controller
        ext="subjectAltName=IP:127.0.0.1,DNS:localhost
extendedKeyUsage=serverAuth,clientAuth"
    else
        ext="extendedKeyUsage=clientAuth"
    fi
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 \
        -subj "/CN=$cn" -keyout "$out.key" -out "$out.csr" 2>>"$LOG_FILE" &&
        openssl x509 -req -in "$out.csr" -CA "$TLS_DIR/ca.pem" -CAkey "$TLS_DIR/ca.key" \
            -set_serial "0x$(openssl rand -hex 16)" -days 825 -sha256 \
            -extfile <(printf '%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n' "$ext") \
            -out "$out.crt" 2>>"$LOG_FILE" ||
        die "openssl could not issue a certificate for $cn (log: $LOG_FILE)"
    rm -f "$out.csr"
}

client_cert() { # client_cert NAME: tls/clients/NAME.pem, .key and .env (kept if there)
    local name=$1
    if [[ ! -s "$CLIENTS_DIR/$name.pem" || ! -s "$CLIENTS_DIR/$name.key" ]]; then
        issue "$name" "$CLIENTS_DIR/$name" client
        mv "$CLIENTS_DIR/$name.crt" "$CLIENTS_DIR/$name.pem"
    fi
    cat >"$CLIENTS_DIR/$name.env" <<EOF
# User:$name over mutual TLS (written by deploy/local/kafka-secure.sh)
export CONFIGBUS_BOOTSTRAP_SERVERS=127.0.0.1:$SSL_PORT
export CONFIGBUS_KAFKA_SECURITY_PROTOCOL=SSL
export CONFIGBUS_KAFKA_SSL_CA_LOCATION=$(quoted "$TLS_DIR/ca.pem")
export CONFIGBUS_KAFKA_SSL_CERTIFICATE_LOCATION=$(quoted "$CLIENTS_DIR/$name.pem")
export CONFIGBUS_KAFKA_SSL_KEY_LOCATION=$(quoted "$CLIENTS_DIR/$name.key")
EOF
}

user_env() { # user_env NAME: users/NAME.env
    cat >"$USERS_DIR/$1.env" <<EOF
# User:$1 over SASL_SSL with SCRAM-SHA-512 (written by deploy/local/kafka-secure.sh)
export CONFIGBUS_BOOTSTRAP_SERVERS=127.0.0.1:$PORT
export CONFIGBUS_KAFKA_SECURITY_PROTOCOL=SASL_SSL
export CONFIGBUS_KAFKA_SASL_MECHANISM=SCRAM-SHA-512
export CONFIGBUS_KAFKA_SASL_USERNAME=$1
export CONFIGBUS_KAFKA_SASL_PASSWORD_FILE=$(quoted "$USERS_DIR/$1.password")
export CONFIGBUS_KAFKA_SSL_CA_LOCATION=$(quoted "$TLS_DIR/ca.pem")
EOF
}

quoted() { printf '%q' "$1"; } # a path as the shell reads it back, spaces and all

write_env_file() {
    cat >"$ENV_FILE" <<EOF
# The secured local broker (deploy/local/kafka-secure.sh). Sourcing this file makes you
# its admin (a super user) over SASL_SSL; users/NAME.env and tls/clients/NAME.env hold
# the settings of the other principals.
KAFKA_SECURE_RUN_DIR=$(quoted "$RUN_DIR")
KAFKA_SASL_SSL_BOOTSTRAP=127.0.0.1:$PORT
KAFKA_SSL_BOOTSTRAP=127.0.0.1:$SSL_PORT
KAFKA_CA=$(quoted "$TLS_DIR/ca.pem")
KAFKA_USERS_DIR=$(quoted "$USERS_DIR")
KAFKA_CLIENTS_DIR=$(quoted "$CLIENTS_DIR")
$(grep '^export ' "$USERS_DIR/admin.env")
EOF
}

# shellcheck disable=SC2317
announce() {
    echo "kafka ready (Kafka $KAFKA_VERSION, KRaft, secured): SASL_SSL/SCRAM-SHA-512 on 127.0.0.1:$PORT," \
        "mutual TLS on 127.0.0.1:$SSL_PORT"
    echo "  settings: $ENV_FILE (the admin's; users/NAME.env, tls/clients/NAME.env: the others')"
    echo "  CA: $TLS_DIR/ca.pem; SCRAM users: $(cd "$USERS_DIR" && ls -- *.password | sed 's/\.password$//' | xargs)"
    echo "  client certificates: $(cd "$CLIENTS_DIR" && ls -- *.pem | sed 's/\.pem$//' | xargs)"
}

# shellcheck disable=SC2317
wipe() { rm -rf "$DATA_DIR" "$TLS_DIR" "$USERS_DIR" "$ENV_FILE"; }

cmd_client_cert() { # client-cert NAME...: certificates from the run dir's CA, any time
    (($#)) || die "client-cert: name the certificate(s), e.g. client-cert svc-aurora" 2
    [[ -s "$TLS_DIR/ca.pem" ]] || die "no CA in $TLS_DIR yet: start the broker first"
    umask 077
    local name
    parse_names "$*"
    for name in "${NAMES[@]}"; do
        client_cert "$name"
        echo "$CLIENTS_DIR/$name.pem $CLIENTS_DIR/$name.key ($CLIENTS_DIR/$name.env)"
    done
}
