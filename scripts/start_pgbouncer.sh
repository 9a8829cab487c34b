#!/usr/bin/env bash
# Install PgBouncer (Debian package) if needed and start it on 127.0.0.1 in front of the test
# PostgreSQL (scripts/start_postgres.sh, started first), in transaction pooling, as a plant's DBA
# runs it (a server connection per transaction, not per client), and print its URL on stdout
# (everything else goes to stderr). Any database name is passed through to the server, as
# postgres. Idempotent: a second run reuses the running PgBouncer.
#
#   export DIFFQC_TEST_PGBOUNCER_URL="$(scripts/start_pgbouncer.sh)"
#   scripts/start_pgbouncer.sh stop        # stop it
#
# Environment: DIFFQC_PGBOUNCER_DIR (config, pid and log folder, default /tmp/diffqc-pgbouncer),
# DIFFQC_PGBOUNCER_PORT (64329), DIFFQC_PG_PORT (the server's, 54329), DIFFQC_PG_DB (diffqc_test).
set -euo pipefail
DIR="${DIFFQC_PGBOUNCER_DIR:-/tmp/diffqc-pgbouncer}"
PORT="${DIFFQC_PGBOUNCER_PORT:-64329}"
PG_PORT="${DIFFQC_PG_PORT:-54329}"
DB="${DIFFQC_PG_DB:-diffqc_test}"
PIDFILE="$DIR/pgbouncer.pid"

log() { echo "start_pgbouncer: $*" >&2; }

running() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }

# PgBouncer refuses to run as root: as root, use the postgres system user.
as_owner() {
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

if [ "${1:-start}" = "stop" ]; then
    if running; then
        kill "$(cat "$PIDFILE")"
        log "stopped"
    fi
    exit 0
fi

PGBOUNCER="$(bash "$(dirname "$0")/apt_program.sh" pgbouncer)"

if ! running; then
    if port_open; then
        log "port $PORT on 127.0.0.1 is taken by another program; set DIFFQC_PGBOUNCER_PORT"
        exit 1
    fi
    mkdir -p "$DIR"
    if [ "$(id -u)" -eq 0 ]; then chown postgres "$DIR"; fi
    # auth_type any: the client's user name is not checked; every server login is postgres's
    # (the test cluster trusts it). The package's own service is not used (its config is /etc's).
    cat >"$DIR/pgbouncer.ini" <<EOF
[databases]
* = host=127.0.0.1 port=$PG_PORT user=postgres

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PORT
unix_socket_dir =
auth_type = any
pool_mode = transaction
max_client_conn = 200
default_pool_size = 5
logfile = $DIR/pgbouncer.log
pidfile = $PIDFILE
EOF
    log "starting on 127.0.0.1:$PORT in transaction pooling, in front of 127.0.0.1:$PG_PORT"
    as_owner "$PGBOUNCER" -d "$DIR/pgbouncer.ini" >&2
    for _ in $(seq 50); do
        if port_open; then break; fi
        sleep 0.1
    done
    if ! port_open; then
        log "pgbouncer did not start; its log:"
        tail -n 20 "$DIR/pgbouncer.log" >&2 || true
        exit 1
    fi
fi
echo "postgresql://postgres@127.0.0.1:$PORT/$DB"
