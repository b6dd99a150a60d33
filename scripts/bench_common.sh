# scripts/bench_common.sh: what the side sections of `make bench` share (sourced, not run, by
# scripts/bench_equal_load.sh, scripts/bench_access_log.sh and scripts/bench_proxy.sh): the checks
# of what they need, BENCH_ROUNDS / BENCH_DURATION / BENCH_PEERS, a free port, peers.sh's nginx
# templates made into configs as peers.sh makes them, and the one server under test at a time
# (SPID), stopped on exit.
# The including script sets NAME (for messages) and RUN_KIND (its scratch folder's prefix) first.

die() { echo "$NAME: $*" >&2; exit 2; }
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PEERS_SH=${BENCH_PEERS:-../shared/bench/peers.sh}
TPL=$(dirname "$PEERS_SH")/peers
[ -f "$TPL/nginx_lua.conf.in" ] || die "no $TPL/nginx_lua.conf.in (set BENCH_PEERS to peers.sh's path)"
[ -x build/moonlet ] || die "build/moonlet is missing: run make first"
for t in wrk nginx taskset curl; do command -v "$t" >/dev/null 2>&1 || die "needs $t"; done
[ -f /usr/share/nginx/modules/ngx_http_lua_module.so ] || die "needs libnginx-mod-http-lua"
PY=/usr/bin/python3
[ -x "$PY" ] || PY=python3

ROUNDS=${BENCH_ROUNDS:-3}
DURATION=${BENCH_DURATION:-5s}
RUN=${BENCH_RUN:-/tmp/moonlet-peers}/$RUN_KIND-$(date +%Y%m%d-%H%M%S)
mkdir -p "$RUN/tmp" bench/results
DATE=$(date -u '+%Y-%m-%d %H:%M UTC')

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# nginx_conf TEMPLATE NAME PORT UPPORT [SED_EXPR] -> $RUN/NAME.conf, as peers.sh makes it (SED_EXPR:
# one more change to the template, e.g. the access log turned on)
nginx_conf() {
  { sed -e "s|@RUN@|$RUN|g" -e "s|@NAME@|$2|g" "$TPL/nginx_common.inc.in"
    sed -e "s|@RUN@|$RUN|g" -e "s|@NAME@|$2|g" -e "s|@PORT@|$3|g" -e "s|@UPPORT@|$4|g" \
        -e "s|@DELAY@|0|g" -e "${5:-s|^\$||}" "$TPL/$1"
  } > "$RUN/$2.conf"
}

SPID=""
stop_server() {
  [ -n "$SPID" ] || return 0
  kill "$SPID" 2>/dev/null || true
  wait "$SPID" 2>/dev/null || true
  SPID=""
}

# stop_all: the server, and the upstream a section started (its pid in UPID), if any
UPID=""
stop_all() {
  stop_server
  [ -n "$UPID" ] || return 0
  kill "$UPID" 2>/dev/null || true
  wait "$UPID" 2>/dev/null || true
  UPID=""
}

wait_ok() {  # wait_ok NAME URL
  i=0
  while ! curl -sf "$2" > /dev/null 2>&1; do
    i=$((i + 1))
    [ $i -lt 100 ] || die "$1 did not answer $2 (logs in $RUN)"
    sleep 0.1
  done
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }     # utime + stime, clock ticks
