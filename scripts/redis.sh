#!/usr/bin/env bash
# A throwaway Redis for running agents by hand (the tests start their own, see tests/servers.py):
# no persistence, listening on 127.0.0.1 only.
#
#   scripts/redis.sh start DIR PORT   start redis-server on 127.0.0.1:PORT, print its URL on stdout
#   scripts/redis.sh stop DIR         stop the server started in DIR (by its pid file)
set -euo pipefail

say() { echo "redis.sh: $*" >&2; }
die() { say "$*"; exit 1; }
usage() { die "usage: $0 start DIR PORT | stop DIR"; }

running() { [ -f "$1/redis.pid" ] && kill -0 "$(cat "$1/redis.pid")" 2>/dev/null; }

start() {
  local dir=$1 port=$2
  command -v redis-server >/dev/null || die "redis-server is not installed (make system-deps installs it)"
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  running "$dir" && die "already running in $dir (scripts/redis.sh stop $dir first)"
  say "starting on 127.0.0.1:$port (log: $dir/redis.log)"
  redis-server --bind 127.0.0.1 --port "$port" --dir "$dir" --save "" --appendonly no \
    --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
  local deadline=$((SECONDS + 10))
  until [ "$(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null)" = PONG ]; do
    [ $SECONDS -lt $deadline ] || die "redis-server did not answer in 10 s: see $dir/redis.log"
    sleep 0.05
  done
  echo "redis://127.0.0.1:$port/0"
}

stop() {
  local dir=$1 pid
  running "$dir" || { say "not running in $dir"; return; }
  pid=$(cat "$dir/redis.pid")
  kill "$pid"
  local deadline=$((SECONDS + 10))
  while kill -0 "$pid" 2>/dev/null; do
    [ $SECONDS -lt $deadline ] || die "redis-server (pid $pid) did not stop in 10 s"
    sleep 0.05
  done
  say "stopped"
}

case "${1:-}" in
  start) [ $# -eq 3 ] || usage; start "$2" "$3" ;;
  stop) [ $# -eq 2 ] || usage; stop "$2" ;;
  *) usage ;;
esac
