#!/bin/sh
# scripts/bench_access_log.sh: the "access log" section of `make bench` (scripts/bench.sh runs it
# after the equal-load section; BENCH_LOG=only runs it alone, 0 skips it). OpenResty deployments
# keep nginx's access log on, where peers.sh turns it off; here moonlet and nginx+lua serve `hello`
# with every request logged to a file in nginx's combined format: nginx+lua is peers.sh's own
# template with `access_log FILE combined;` for its `access_log off;`, moonlet serves
# examples/bench_hello.lua with `--access-log=FILE --access-log-format combined`. Each runs at its
# own saturation (wrk -t1 -c64, as peers.sh's hello), server on CPU 0, wrk on CPU 1, the two
# alternating round by round; the table gives the medians of req/s, p99 and the server's CPU time
# per request (its /proc/PID/stat around the run), and the lines each log got per request (1.00:
# nothing lost). Writes bench/results/access-log.md.
#
# Environment (defaults): BENCH_ROUNDS (3), BENCH_DURATION (5s), BENCH_RUN (/tmp/moonlet-peers),
# BENCH_PEERS (../shared/bench/peers.sh: its peers/ folder has the nginx templates).
set -eu

NAME=bench_access_log.sh
RUN_KIND=log
. "$(dirname "$0")/bench_common.sh"
NPORT=$(free_port)
MPORT=$(free_port)
nginx_conf nginx_lua.conf.in nginx-lua "$NPORT" 1 "s|access_log off;|access_log $RUN/access-nginx-lua.log combined;|"
grep -q "access_log $RUN/access-nginx-lua.log combined;" "$RUN/nginx-lua.conf" ||
  die "peers.sh's nginx_lua.conf.in has no 'access_log off;' to turn on"

trap stop_server EXIT INT TERM

# start_server PEER: on CPU 0, with a fresh log file; sets SPID, PORT, WPID (the worker), LOG
start_server() {
  LOG=$RUN/access-$1.log
  rm -f "$LOG"
  case "$1" in
    nginx-lua)
      PORT=$NPORT
      taskset -c 0 nginx -p "$RUN" -e "$RUN/nginx-lua.error.log" -c "$RUN/nginx-lua.conf" \
        > "$RUN/nginx-lua.out" 2>&1 & ;;
    moonlet)
      PORT=$MPORT
      taskset -c 0 ./build/moonlet examples/bench_hello.lua --port "$PORT" --log-level warn \
        --access-log="$LOG" --access-log-format combined > "$RUN/moonlet.out" 2>&1 & ;;
  esac
  SPID=$!
  wait_ok "$1" "http://127.0.0.1:$PORT/"
  WPID=$SPID
  if [ "$1" = nginx-lua ]; then WPID=$(pgrep -P "$SPID" | head -1); fi
}

lines() { if [ -f "$1" ]; then wc -l < "$1"; else echo 0; fi; }

r=1
while [ "$r" -le "$ROUNDS" ]; do
  for peer in nginx-lua moonlet; do
    start_server "$peer"
    f=$RUN/$peer-r$r
    timeout 60 taskset -c 1 wrk -t1 -c64 -d1s "http://127.0.0.1:$PORT/" > /dev/null 2>&1 || true
    sleep 0.2 # the warm-up's last lines written
    l0=$(lines "$LOG")
    c0=$(cpu_ticks "$WPID")
    timeout 120 taskset -c 1 wrk -t1 -c64 -d"$DURATION" --latency "http://127.0.0.1:$PORT/" \
      > "$f.txt" 2>&1 || true
    c1=$(cpu_ticks "$WPID")
    stop_server # (nginx writes each line as it goes; moonlet's last block at the latest now)
    echo "$c0 $c1 $(getconf CLK_TCK) $l0 $(lines "$LOG")" > "$f.cpu"
    sample=$(tail -1 "$LOG" 2>/dev/null || true)
    echo "$sample" > "$f.sample"
  done
  r=$((r + 1))
done

OUT=bench/results/access-log.md
"$PY" - "$RUN" "$ROUNDS" "$DURATION" "$DATE" > "$OUT.tmp" <<'PYEOF'
import sys
sys.path.insert(0, "scripts")
from wrk_report import NAN, med, parse_wrk
run, rounds, duration, date = sys.argv[1:5]
rounds = int(rounds)

def parse(base):
    d = parse_wrk(base + ".txt")
    c0, c1, hz, l0, l1 = (float(x) for x in open(base + ".cpu").read().split())
    if d.get("n"):
        d["us"] = (c1 - c0) / hz * 1e6 / d["n"]
        d["lines"] = (l1 - l0) / d["n"]
    return d

peers = ["moonlet", "nginx-lua"]
runs = {p: [parse(f"{run}/{p}-r{r}") for r in range(1, rounds + 1)] for p in peers}
m = {p: {k: med([d.get(k, NAN) for d in runs[p]]) for k in ("rps", "p99", "us", "lines")} for p in peers}
print("# hello with the access log on: moonlet beside nginx+lua (`make bench`)\n")
print(f"Date: {date}. Command: `make bench` (scripts/bench_access_log.sh; alone: `BENCH_LOG=only make bench`).  ")
print(f"Server on CPU 0, `wrk -t1 -c64 -d{duration} --latency` on CPU 1, median of {rounds} round(s), the two "
      "servers alternating. Every request is logged to a file in nginx's combined format: nginx+lua is "
      "peers.sh's template with `access_log FILE combined;`, moonlet serves examples/bench_hello.lua with "
      "`--access-log=FILE --access-log-format combined`. Raw results: `" + run + "`.\n")
print("| metric | moonlet | nginx-lua | moonlet ÷ nginx-lua |")
print("|---|---|---|---|")
def row(name, k, fmt, ratio):
    a, b = m["moonlet"][k], m["nginx-lua"][k]
    r = f"**{a / b:.2f}**" if ratio and a == a and b == b and b else ""
    print(f"| {name} | {fmt.format(a)} | {fmt.format(b)} | {r} |")
row("req/s", "rps", "{:.0f}", True)
row("p99 ms", "p99", "{:.2f}", False)
row("server CPU µs per request", "us", "{:.1f}", True)
row("log lines per request", "lines", "{:.3f}", False)
print()
for p in peers:
    print(f"- {p} req/s by round: " + " / ".join(f"{d.get('rps', NAN):.0f}" for d in runs[p]) +
          "; µs per request: " + " / ".join(f"{d.get('us', NAN):.1f}" for d in runs[p]))
for p in peers:
    s = open(f"{run}/{p}-r{rounds}.sample").read().strip()
    print(f"- {p}'s last line: `{s}`")
PYEOF
mv "$OUT.tmp" "$OUT"
cat "$OUT"
