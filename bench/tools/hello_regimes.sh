#!/bin/sh
# bench/tools/hello_regimes.sh [ROUNDS]: what the saturated hello's p99 depends on. Runs peers.sh's
# hello load (wrk -t1 -c64 -d5s after a 1 s warm-up; server on CPU 0, wrk on CPU 1) on nginx+lua
# (peers.sh's own template), the README's app and the benchmark app, round after round, each under
# bench/tools/epoll_trace.c, and prints per run: req/s, p50, p99 and how many events its epoll_wait
# calls returned (median). A server in lockstep with wrk's 64 connections gets ~64 per wait and a
# tight latency spread; one that answers each request as it comes gets 1-3 and a wider one, with a
# lower p50 and a higher p99 for the same mean (64 / req/s). Which of the two a run falls into is
# not the server's choice alone. Needs nginx, libnginx-mod-http-lua, wrk, cc; run from the repo root.
set -eu
ROUNDS=${1:-4}
PEERS=${BENCH_PEERS:-../shared/bench/peers.sh}
TPL=$(dirname "$PEERS")/peers
RUN=$(mktemp -d /tmp/moonlet-regimes.XXXXXX)
chmod 777 "$RUN" # nginx's worker writes its trace as another user
mkdir -p "$RUN/tmp"
cc -O2 -shared -fPIC -o "$RUN/epoll_trace.so" bench/tools/epoll_trace.c -ldl
NPORT=18480
MPORT=18481
{ sed -e "s|@RUN@|$RUN|g" -e "s|@NAME@|nginx-lua|g" "$TPL/nginx_common.inc.in"
  sed -e "s|@RUN@|$RUN|g" -e "s|@NAME@|nginx-lua|g" -e "s|@PORT@|$NPORT|g" -e "s|@UPPORT@|1|g" \
      -e "s|@DELAY@|0|g" "$TPL/nginx_lua.conf.in"
} > "$RUN/nginx-lua.conf"

one() { # one NAME PORT PID: warm-up, then the measured run under the trace window
  taskset -c 1 wrk -t1 -c64 -d1s "http://127.0.0.1:$2/" > /dev/null
  out=$(taskset -c 1 wrk -t1 -c64 -d5s --latency "http://127.0.0.1:$2/")
  kill "$3" 2>/dev/null || true
  wait "$3" 2>/dev/null || true
  sleep 0.3
  ev=$(for f in "$RUN"/trace."$1".*; do [ -s "$f" ] && awk '{print $3}' "$f"; done | sort -n |
       awk '{a[NR]=$1} END{if (NR) print a[int((NR+1)/2)]; else print "-"}')
  rm -f "$RUN"/trace."$1".*
  printf '%-12s req/s %7s  p50 %9s  p99 %9s  events per epoll_wait (median) %s\n' "$1" \
    "$(echo "$out" | awk '/Requests\/sec/{printf "%d", $2}')" \
    "$(echo "$out" | awk '$1=="50%"{print $2}')" "$(echo "$out" | awk '$1=="99%"{print $2}')" "$ev"
}

export EPT_START=2.2 EPT_DUR=2
r=1
while [ "$r" -le "$ROUNDS" ]; do
  echo "round $r"
  LD_PRELOAD="$RUN/epoll_trace.so" EPT_OUT="$RUN/trace.nginx-lua" taskset -c 0 \
    nginx -p "$RUN" -e "$RUN/nginx.err" -c "$RUN/nginx-lua.conf" > /dev/null 2>&1 &
  pid=$!
  sleep 0.7
  one nginx-lua "$NPORT" "$pid"
  for app in hello bench_hello; do
    LD_PRELOAD="$RUN/epoll_trace.so" EPT_OUT="$RUN/trace.$app" taskset -c 0 \
      ./build/moonlet "examples/$app.lua" --port "$MPORT" --log-level warn > /dev/null 2>&1 &
    pid=$!
    sleep 0.7
    one "$app" "$MPORT" "$pid"
  done
  r=$((r + 1))
done
rm -rf "$RUN"
