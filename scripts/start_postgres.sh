#!/usr/bin/env bash
# Install PostgreSQL (Debian package) if needed, start a throw-away cluster listening on
# 127.0.0.1 only, create the test database and print its URL on stdout (everything else
# goes to stderr). Idempotent: a second run reuses the running cluster.
#
#   export DIFFQC_TEST_POSTGRES_URL="$(scripts/start_postgres.sh)"
#   scripts/start_postgres.sh stop        # stop the cluster
#
# Environment: DIFFQC_PG_DIR (data folder, default /tmp/diffqc-pg), DIFFQC_PG_PORT (54329),
# DIFFQC_PG_DB (diffqc_test).
set -euo pipefail
DATA="${DIFFQC_PG_DIR:-/tmp/diffqc-pg}"
PORT="${DIFFQC_PG_PORT:-54329}"
DB="${DIFFQC_PG_DB:-diffqc_test}"

log() { echo "start_postgres: $*" >&2; }

find_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

# initdb/postgres refuse to run as root: use the postgres system user then.
as_owner() {
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

PGBIN="$(find_bin || true)"
if [ "${1:-start}" = "stop" ]; then  # nothing installed: nothing runs (never an install to stop)
    if [ -n "$PGBIN" ] && [ -f "$DATA/PG_VERSION" ]; then
        as_owner "$PGBIN/pg_ctl" -D "$DATA" -m fast stop >&2 || true
    fi
    exit 0
fi
if [ -z "$PGBIN" ] || [ ! -x "$PGBIN/initdb" ]; then
    log "installing postgresql (apt)"
    bash "$(dirname "$0")/apt_install.sh" postgresql
    PGBIN="$(find_bin)"
fi

if [ ! -f "$DATA/PG_VERSION" ]; then
    log "initialising a cluster in $DATA"
    mkdir -p "$DATA"
    if [ "$(id -u)" -eq 0 ]; then chown postgres:postgres "$DATA"; fi
    chmod 700 "$DATA"
    as_owner "$PGBIN/initdb" -D "$DATA" -U postgres --auth=trust -E UTF8 >&2
fi

if ! as_owner "$PGBIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
    log "starting on 127.0.0.1:$PORT"
    as_owner "$PGBIN/pg_ctl" -D "$DATA" -l "$DATA/server.log" -w \
        -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DATA" start >&2
fi

PSQL=("$PGBIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -v ON_ERROR_STOP=1 -tAq)
if ! "${PSQL[@]}" -d postgres -c "SELECT 1 FROM pg_database WHERE datname = '$DB'" | grep -q 1; then
    "${PSQL[@]}" -d postgres -c "CREATE DATABASE $DB" >&2
fi
echo "postgresql://postgres@127.0.0.1:$PORT/$DB"
