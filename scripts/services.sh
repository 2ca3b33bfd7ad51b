#!/usr/bin/env bash
# Throwaway PostgreSQL + Redis on loopback for tests and CI (never for real data).
#   scripts/services.sh start   install if missing, start both, print DATABASE_URL / REDIS_URL
#   scripts/services.sh stop    stop both (data stays until `wipe`)
#   scripts/services.sh status  say what is running
#   scripts/services.sh env     print the two URL lines only
#   scripts/services.sh wipe    stop and delete all their files
# Only the URL lines go to stdout, so `export $(scripts/services.sh start)` works.
set -euo pipefail

PG_PORT=54329
REDIS_PORT=63799
PG_ROOT=/tmp/hearth-pg
PGDATA=$PG_ROOT/data
PG_LOG=$PG_ROOT/postgres.log
REDIS_DIR=/tmp/hearth-redis
DATABASE_URL="postgres://hearth@127.0.0.1:$PG_PORT/hearth"
REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
# chromium: Debian's headless browser for tests/browser (Playwright drives /usr/bin/chromium).
APT_PACKAGES=(postgresql redis-server bubblewrap chromium)

log() { echo "services: $*" >&2; }
die() { log "$*"; exit 1; }
is_root() { [[ $(id -u) == 0 ]]; }

pg_bin() {
    # Newest installed major version; Debian keeps each under its own directory.
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    [[ -n $dir ]] || return 1
    echo "$dir"
}

# initdb and postgres refuse to run as root, so root runs them as `postgres`.
as_pg() {
    if is_root; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

install_missing() {
    if pg_bin >/dev/null && command -v redis-server >/dev/null && command -v redis-cli >/dev/null \
        && command -v bwrap >/dev/null && [[ -x /usr/bin/chromium ]]; then
        return
    fi
    is_root || die "missing packages; run as root or: sudo apt-get install ${APT_PACKAGES[*]}"
    log "installing ${APT_PACKAGES[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${APT_PACKAGES[@]}" >&2
    pg_bin >/dev/null || die "postgresql installed but no /usr/lib/postgresql/*/bin"
}

pg_running() {
    local bin=$1
    [[ -f $PGDATA/postmaster.pid ]] && as_pg "$bin/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1
}

pg_init() {
    local bin=$1 major
    major=$("$bin/postgres" --version | sed -E 's/.* ([0-9]+)(\.[0-9]+)*.*/\1/')
    if [[ -f $PGDATA/PG_VERSION && $(cat "$PGDATA/PG_VERSION") == "$major" ]]; then
        return
    fi
    # Half-made or from another major version: it is throwaway, start over.
    rm -rf "$PG_ROOT"
    mkdir -p "$PG_ROOT"
    is_root && chown postgres: "$PG_ROOT"
    log "initdb $PGDATA (PostgreSQL $major)"
    as_pg "$bin/initdb" -D "$PGDATA" -U postgres --auth=trust --encoding=UTF8 --locale=C.UTF-8 \
        --no-sync >/dev/null
    # Speed over durability: a crash loses only test data.
    cat >>"$PGDATA/postgresql.conf" <<CONF

# --- hearth test cluster (scripts/services.sh) ---
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_ROOT'
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
CONF
}

pg_start() {
    local bin
    bin=$(pg_bin)
    pg_init "$bin"
    if ! pg_running "$bin"; then
        log "starting PostgreSQL on 127.0.0.1:$PG_PORT"
        as_pg "$bin/pg_ctl" -D "$PGDATA" -l "$PG_LOG" -w -t 60 start >/dev/null \
            || { tail -n 20 "$PG_LOG" >&2 || true; die "PostgreSQL did not start"; }
    fi
    wait_for "PostgreSQL" "$bin/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"
    local psql=("$bin/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -qtA)
    # Superuser, because the tests create and drop their own databases.
    if [[ -z $("${psql[@]}" -c "SELECT 1 FROM pg_roles WHERE rolname = 'hearth'") ]]; then
        "${psql[@]}" -c "CREATE ROLE hearth LOGIN SUPERUSER"
    fi
    if [[ -z $("${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname = 'hearth'") ]]; then
        "${psql[@]}" -c "CREATE DATABASE hearth OWNER hearth"
    fi
}

redis_cli() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@"; }
redis_running() { [[ $(redis_cli ping 2>/dev/null) == PONG ]]; }

redis_start() {
    if ! redis_running; then
        log "starting Redis on 127.0.0.1:$REDIS_PORT"
        mkdir -p "$REDIS_DIR"
        redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --daemonize yes --save '' --appendonly no \
            --dir "$REDIS_DIR" --logfile "$REDIS_DIR/redis.log" --pidfile "$REDIS_DIR/redis.pid" >&2
    fi
    wait_for "Redis" redis_running
}

wait_for() {
    local name=$1
    shift
    for _ in $(seq 1 60); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    die "$name did not answer within 30 s"
}

print_env() {
    echo "DATABASE_URL=$DATABASE_URL"
    echo "REDIS_URL=$REDIS_URL"
}

stop() {
    local bin
    if bin=$(pg_bin) && pg_running "$bin"; then
        log "stopping PostgreSQL"
        as_pg "$bin/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null
    fi
    if command -v redis-cli >/dev/null && redis_running; then
        log "stopping Redis"
        redis_cli shutdown nosave >/dev/null 2>&1 || true
        for _ in $(seq 1 20); do redis_running || break; sleep 0.25; done
        ! redis_running || die "Redis did not stop"
    fi
}

status() {
    local bin rc=0
    if bin=$(pg_bin) && pg_running "$bin"; then
        log "PostgreSQL: running on 127.0.0.1:$PG_PORT"
    else
        log "PostgreSQL: stopped"; rc=3
    fi
    if command -v redis-cli >/dev/null && redis_running; then
        log "Redis: running on 127.0.0.1:$REDIS_PORT"
    else
        log "Redis: stopped"; rc=3
    fi
    return $rc
}

case ${1:-} in
    start)
        install_missing
        pg_start
        redis_start
        print_env
        ;;
    stop) stop ;;
    status) status ;;
    env) print_env ;;
    wipe)
        stop
        rm -rf "$PG_ROOT" "$REDIS_DIR"
        ;;
    *)
        echo "usage: $0 start|stop|status|env|wipe" >&2
        exit 2
        ;;
esac
