#!/bin/sh
# scripts/bench_proxy.sh: the "reverse proxy" section of `make bench` (scripts/bench.sh runs it
# after the access-log section; BENCH_PROXY=only runs it alone, 0 skips it). A client's GET /p/b
# goes through the proxy to peers.sh's fan-out upstream (nginx_upstream.conf.in at 0 ms, on CPU 1
# beside wrk, as in peers.sh's fanout), whose /b answers 1024 bytes; a second row asks /p/c, the
# same template with its /c made 64 KiB (65,536 bytes: one sed of its init_by_lua_block).
# The proxies: nginx (a minimal nginx.conf: one worker, access_log off, `location /p/ { proxy_pass
# http://up/; proxy_http_version 1.1; proxy_set_header Connection ""; }` with `upstream up {
# server 127.0.0.1:PORT; keepalive 256; }`, nginx's defaults otherwise: proxy_buffering on) and
# moonlet (examples/bench_proxy.lua: moonlet.proxy with strip_prefix = "/p"). Each runs at its own
# saturation (wrk -t1 -c64 after a 1 s warm-up, as peers.sh's hello), on CPU 0, the two
# alternating round by round; the table gives the medians of req/s, p50, p99, the proxy's CPU time
# per request (its /proc/PID/stat around the run) and CPU 1's busy share (wrk + the upstream: when
# it is near 100 %, req/s measures CPU 1 and the CPU time per request is the proxy's figure).
# Writes bench/results/proxy.md.
#
# Environment (defaults): BENCH_ROUNDS (3), BENCH_DURATION (5s), BENCH_RUN (/tmp/moonlet-peers),
# BENCH_PEERS (../shared/bench/peers.sh: its peers/ folder has the nginx templates).
set -eu

NAME=bench_proxy.sh
RUN_KIND=proxy
. "$(dirname "$0")/bench_common.sh"
[ -f examples/bench_proxy.lua ] || die "examples/bench_proxy.lua is missing"
NPORT=$(free_port)
MPORT=$(free_port)
UPORT=$(free_port)
BIG='string.rep("c", 65536)'
nginx_conf nginx_upstream.conf.in upstream "$UPORT" "$UPORT" "s|string.rep(\"c\", 4096)|$BIG|"
grep -qF "$BIG" "$RUN/upstream.conf" ||
  die "peers.sh's nginx_upstream.conf.in has no 'string.rep(\"c\", 4096)' to make 64 KiB"
{ sed -e "s|@RUN@|$RUN|g" -e "s|@NAME@|nginx-proxy|g" "$TPL/nginx_common.inc.in"
  cat <<NGX
events { worker_connections 16384; }
http {
    access_log off;
    client_body_temp_path $RUN/tmp/body;
    proxy_temp_path $RUN/tmp/proxy;
    fastcgi_temp_path $RUN/tmp/fastcgi;
    uwsgi_temp_path $RUN/tmp/uwsgi;
    scgi_temp_path $RUN/tmp/scgi;
    upstream up {
        server 127.0.0.1:$UPORT;
        keepalive 256;
    }
    server {
        listen 127.0.0.1:$NPORT backlog=4096;
        location /p/ {
            proxy_pass http://up/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
NGX
} > "$RUN/nginx-proxy.conf"

trap stop_all EXIT INT TERM

# start_server PEER PATH: on CPU 0, until PATH answers with the upstream's body; sets SPID, PORT
# and WPID (the process that does the work: nginx's worker, not its master)
start_server() {
  case "$1" in
    nginx)
      PORT=$NPORT
      taskset -c 0 nginx -p "$RUN" -e "$RUN/nginx-proxy.error.log" -c "$RUN/nginx-proxy.conf" \
        > "$RUN/nginx-proxy.log" 2>&1 & ;;
    moonlet)
      PORT=$MPORT
      taskset -c 0 ./build/moonlet examples/bench_proxy.lua --port "$PORT" --upstream "$UPORT" \
        --log-level warn > "$RUN/moonlet.log" 2>&1 & ;;
  esac
  SPID=$!
  wait_ok "$1" "http://127.0.0.1:$PORT$2"
  WPID=$SPID
  if [ "$1" = nginx ]; then WPID=$(pgrep -P "$SPID" | head -1); fi
}

cpu1_ticks() { awk '/^cpu1 / {print $2 + $3 + $4 + $7 + $8, $5 + $6}' /proc/stat; } # busy idle

taskset -c 1 nginx -p "$RUN" -e "$RUN/upstream.error.log" -c "$RUN/upstream.conf" \
  > "$RUN/upstream.log" 2>&1 &
UPID=$!
wait_ok upstream "http://127.0.0.1:$UPORT/a"

for path in /p/b /p/c; do
  r=1
  while [ "$r" -le "$ROUNDS" ]; do
    for peer in nginx moonlet; do
      start_server "$peer" "$path"
      f=$RUN/$peer-${path##*/}-r$r
      curl -s "http://127.0.0.1:$PORT$path" | wc -c > "$f.bytes" # the body as the client gets it
      timeout 60 taskset -c 1 wrk -t1 -c64 -d1s "http://127.0.0.1:$PORT$path" > /dev/null 2>&1 || true
      c0=$(cpu_ticks "$WPID")
      s0=$(cpu1_ticks)
      timeout 120 taskset -c 1 wrk -t1 -c64 -d"$DURATION" --latency "http://127.0.0.1:$PORT$path" \
        > "$f.txt" 2>&1 || true
      c1=$(cpu_ticks "$WPID")
      s1=$(cpu1_ticks)
      stop_server
      echo "$c0 $c1 $(getconf CLK_TCK) $s0 $s1" > "$f.cpu"
    done
    r=$((r + 1))
  done
done
stop_all

OUT=bench/results/proxy.md
"$PY" - "$RUN" "$ROUNDS" "$DURATION" "$DATE" > "$OUT.tmp" <<'PYEOF'
import sys
sys.path.insert(0, "scripts")
from wrk_report import NAN, med, parse_wrk
run, rounds, duration, date = sys.argv[1:5]
rounds = int(rounds)

def parse(base):
    d = parse_wrk(base + ".txt")
    c0, c1, hz, b0, i0, b1, i1 = (float(x) for x in open(base + ".cpu").read().split())
    if d.get("n"):
        d["us"] = (c1 - c0) / hz * 1e6 / d["n"]   # the 1 s warm-up is outside c0..c1
    if (b1 - b0) + (i1 - i0) > 0:
        d["cpu1"] = 100.0 * (b1 - b0) / ((b1 - b0) + (i1 - i0))
    d["bytes"] = int(open(base + ".bytes").read().split()[0])
    return d

peers = ["moonlet", "nginx"]
bodies = (("b", "GET /p/b, 1 KiB"), ("c", "GET /p/c, 64 KiB"))
notes = []
print("# moonlet.proxy beside nginx's proxy_pass (`make bench`)\n")
print(f"Date: {date}. Command: `make bench` (scripts/bench_proxy.sh; alone: `BENCH_PROXY=only make bench`).  ")
print(f"Proxy on CPU 0, `wrk -t1 -c64 -d{duration} --latency` on CPU 1 after a 1 s warm-up, median of "
      f"{rounds} round(s), the two proxies alternating. The upstream is peers.sh's fan-out upstream "
      "(nginx + lua, 0 ms, on CPU 1 beside wrk: /b answers 1024 bytes, /c made 65,536). nginx: one worker, "
      "`proxy_pass http://up/` with `keepalive 256`, HTTP/1.1 and `Connection \"\"` (proxy_buffering on, "
      "its default); moonlet: examples/bench_proxy.lua (`moonlet.proxy({ upstream =, strip_prefix = "
      "\"/p\" })`, never buffers). Raw results: `" + run + "`.\n")
print("| metric | moonlet | nginx proxy_pass | moonlet ÷ nginx |")
print("|---|---|---|---|")
for key, label in bodies:
    runs = {p: [parse(f"{run}/{p}-{key}-r{r}") for r in range(1, rounds + 1)] for p in peers}
    m = {p: {k: med([d.get(k, NAN) for d in runs[p]]) for k in ("rps", "p50", "p99", "us", "cpu1")}
         for p in peers}
    def row(name, k, fmt, ratio):
        a, b = m["moonlet"][k], m["nginx"][k]
        r = f"**{a / b:.2f}**" if ratio and a == a and b == b and b else ""
        print(f"| {label}: {name} | {fmt.format(a)} | {fmt.format(b)} | {r} |")
    row("req/s", "rps", "{:.0f}", True)
    row("p50 ms", "p50", "{:.2f}", False)
    row("p99 ms", "p99", "{:.2f}", False)
    row("proxy CPU µs per request", "us", "{:.1f}", True)
    row("CPU 1 busy % (wrk + upstream)", "cpu1", "{:.0f}", False)
    for p in peers:
        notes.append(f"{label}, {p}: req/s by round " + " / ".join(f"{d.get('rps', NAN):.0f}" for d in runs[p])
                     + "; µs per request " + " / ".join(f"{d.get('us', NAN):.1f}" for d in runs[p]))
        for d in runs[p]:
            if "errors" in d:
                notes.append(f"**{label}, {p}: {d['errors']}**")
        sizes = sorted(set(d["bytes"] for d in runs[p]))
        if sizes != [1024 if key == "b" else 65536]:
            notes.append(f"**{label}, {p}: the client got a body of {sizes} bytes**")
print()
for n in notes:
    print(f"- {n}")
PYEOF
mv "$OUT.tmp" "$OUT"
echo
echo "================ reverse proxy ================"
cat "$OUT"
