#!/usr/bin/env bash
# Install Mosquitto (Debian package) if needed, start a throw-away MQTT broker listening on
# 127.0.0.1 only (anonymous, no persistence) as a daemon and print its URL on stdout
# (everything else goes to stderr). Idempotent: a second run reuses the running broker.
#
#   export DIFFQC_TEST_MQTT_URL="$(scripts/start_mosquitto.sh)"
#   scripts/start_mosquitto.sh stop        # stop the broker
#
# Environment: DIFFQC_MQTT_DIR (config, pid and log folder, default /tmp/diffqc-mqtt),
# DIFFQC_MQTT_PORT (18839).
set -euo pipefail
DIR="${DIFFQC_MQTT_DIR:-/tmp/diffqc-mqtt}"
PORT="${DIFFQC_MQTT_PORT:-18839}"
PIDFILE="$DIR/mosquitto.pid"

log() { echo "start_mosquitto: $*" >&2; }

running() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }

if [ "${1:-start}" = "stop" ]; then
    if running; then
        kill "$(cat "$PIDFILE")"
        log "stopped"
    fi
    rm -f "$PIDFILE"
    exit 0
fi

MOSQUITTO="$(bash "$(dirname "$0")/apt_program.sh" mosquitto)"

if ! running; then
    if port_open; then
        log "port $PORT on 127.0.0.1 is taken by another program; set DIFFQC_MQTT_PORT"
        exit 1
    fi
    mkdir -p "$DIR"
    # As root, mosquitto drops privileges to its own user: it must be able to write its files.
    if [ "$(id -u)" -eq 0 ] && id mosquitto >/dev/null 2>&1; then chown mosquitto "$DIR"; fi
    cat >"$DIR/mosquitto.conf" <<EOF
listener $PORT 127.0.0.1
allow_anonymous true
persistence false
pid_file $PIDFILE
log_dest file $DIR/mosquitto.log
EOF
    log "starting on 127.0.0.1:$PORT"
    "$MOSQUITTO" -c "$DIR/mosquitto.conf" -d
    for _ in $(seq 50); do
        if port_open; then break; fi
        sleep 0.1
    done
    if ! port_open; then
        log "the broker did not start; see $DIR/mosquitto.log"
        exit 1
    fi
fi
echo "mqtt://127.0.0.1:$PORT"
