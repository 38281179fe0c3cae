#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for running control-plane replicas by hand (the tests start
# their own, see tests/servers.py). Durability is off: never keep data you care about in it.
#
#   scripts/postgres.sh start DIR [PORT]   initdb DIR/data if new, start on 127.0.0.1:PORT (default 5432),
#                                          create database "switchgear", print its DSN on stdout
#   scripts/postgres.sh stop DIR           fast shutdown
#
# PostgreSQL refuses to run as root: as root the cluster runs as the `postgres` system user, who
# must be able to reach DIR (e.g. under /tmp, not under /root). Messages go to stderr, so
# DSN=$(scripts/postgres.sh start DIR PORT) captures the DSN alone.
set -euo pipefail

say() { echo "postgres.sh: $*" >&2; }
die() { say "$*"; exit 1; }
usage() { die "usage: $0 start DIR [PORT] | stop DIR"; }

bindir() {
  local dir
  if command -v pg_config >/dev/null && dir=$(pg_config --bindir) && [ -x "$dir/postgres" ]; then
    echo "$dir"; return
  fi
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [ -n "$dir" ] || die "PostgreSQL is not installed (make system-deps installs Debian's postgresql)"
  echo "$dir"
}

# Run a PostgreSQL program as the postgres user when we are root, as ourselves otherwise.
as_owner() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start() {
  local dir=$1 port=${2:-5432} bin
  bin=$(bindir)
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  if [ "$(id -u)" -eq 0 ]; then
    chown postgres: "$dir"
    runuser -u postgres -- test -w "$dir" || die "the postgres user cannot write to $dir (is a parent directory private?): choose another, e.g. /tmp/sg-pg"
  fi
  if [ ! -f "$dir/data/PG_VERSION" ]; then
    say "creating a cluster in $dir/data"
    (cd "$dir" && as_owner "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --locale=C --no-sync \
      >"$dir/initdb.log" 2>&1) || die "initdb failed: see $dir/initdb.log"
  fi
  if as_owner "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
    die "already running in $dir (scripts/postgres.sh stop $dir first)"
  fi
  say "starting on 127.0.0.1:$port (log: $dir/postgres.log)"
  (cd "$dir" && as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 30 \
    -o "-h 127.0.0.1 -p $port -k $dir -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
    -o "-c shared_buffers=16MB -c max_connections=200" start >/dev/null) \
    || die "postgres did not start: see $dir/postgres.log"
  local psql=("$bin/psql" -X -q -h 127.0.0.1 -p "$port" -U postgres -d postgres -tA)
  if [ "$("${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname = 'switchgear'")" != 1 ]; then
    "${psql[@]}" -c "CREATE DATABASE switchgear" >/dev/null
  fi
  echo "postgresql://postgres@127.0.0.1:$port/switchgear"
}

stop() {
  local dir=$1 bin
  bin=$(bindir)
  [ -f "$dir/data/PG_VERSION" ] || die "no cluster in $dir"
  if ! as_owner "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
    say "not running in $dir"; return
  fi
  (cd "$dir" && as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null)
  say "stopped ($dir is kept; rm -rf it to start afresh)"
}

case "${1:-}" in
  start) [ $# -ge 2 ] && [ $# -le 3 ] || usage; start "$2" "${3:-5432}" ;;
  stop) [ $# -eq 2 ] || usage; stop "$2" ;;
  *) usage ;;
esac
