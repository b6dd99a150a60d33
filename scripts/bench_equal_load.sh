#!/bin/sh
# scripts/bench_equal_load.sh: the "equal load" section of `make bench` (scripts/bench.sh runs it
# after peers.sh; BENCH_EQUAL=only runs it alone). peers.sh drives every server at its own
# saturation point. There, one wrk thread on one vCPU is the bottleneck of `hello` (a faster server
# loads wrk harder, and wrk's own queueing widens the tail it reports), and in `fanout0ms` CPU 1,
# shared by wrk and the upstream, is busy 85-99 % whatever the server. Here moonlet and nginx+lua
# (peers.sh's own nginx templates) get the same offered load instead: C connections, each waiting
# PACE ms after a response (bench/wrk_paced.lua), and we compare
#   hello:  the latency (p50/p90/p99) of examples/bench_hello.lua;
#   fanout: the server's CPU time per fan-out of examples/fanout.lua, upstream at 0 ms (the HTTP
#           client's own cost, read from /proc/PID/stat around the wrk run), and CPU 1's load:
#           its busy time per fan-out (/proc/stat), of which the upstream's worker (/proc/PID/stat)
#           and wrk (the rest). 1 s / that time is the most fan-outs per second CPU 1 can carry,
#           whatever the server: the ceiling of peers.sh's fanout0ms, printed beside 1.2x nginx+lua.
# Server on CPU 0, wrk (and the upstream) on CPU 1, the two servers alternating round by round;
# medians of the rounds. Writes bench/results/equal-load.md.
#
# Environment (defaults): BENCH_ROUNDS (3), BENCH_DURATION (5s), BENCH_RUN (/tmp/moonlet-peers),
# BENCH_PEERS (../shared/bench/peers.sh: its peers/ folder has the nginx templates),
# BENCH_LAT_LOADS ("32:1 64:1": CONNECTIONS:PACE_MS pairs for hello, far enough below saturation
# that wrk paces both servers alike), BENCH_FANOUT_LOADS ("64:5 64:0": the same for fanout; 5 ms is
# about 60 % of saturation here, and pace 0 is wrk unpaced, peers.sh's own load, shown for CPU 1).
set -eu

NAME=bench_equal_load.sh
RUN_KIND=equal
. "$(dirname "$0")/bench_common.sh"

LOADS=${BENCH_LAT_LOADS:-32:1 64:1}
FANOUT_LOADS=${BENCH_FANOUT_LOADS:-64:5 64:0}
NPORT=$(free_port)
MPORT=$(free_port)
UPORT=$(free_port)
nginx_conf nginx_lua.conf.in nginx-lua "$NPORT" "$UPORT"
nginx_conf nginx_upstream.conf.in upstream "$UPORT" "$UPORT"

trap stop_all EXIT INT TERM

# start_server PEER APP: starts it on CPU 0 and waits until it answers; sets SPID, PORT and WPID
# (the process that does the work: nginx's worker, not its master)
start_server() {
  case "$1" in
    nginx-lua)
      PORT=$NPORT
      taskset -c 0 nginx -p "$RUN" -e "$RUN/nginx-lua.error.log" -c "$RUN/nginx-lua.conf" \
        > "$RUN/nginx-lua.log" 2>&1 & ;;
    moonlet)
      PORT=$MPORT
      if [ "$2" = fanout ]; then
        taskset -c 0 ./build/moonlet examples/fanout.lua --port "$PORT" --upstream "$UPORT" \
          --log-level warn > "$RUN/moonlet.log" 2>&1 &
      else
        taskset -c 0 ./build/moonlet examples/bench_hello.lua --port "$PORT" --log-level warn \
          > "$RUN/moonlet.log" 2>&1 &
      fi ;;
  esac
  SPID=$!
  path=/
  [ "$2" = fanout ] && path=/fanout
  wait_ok "$1" "http://127.0.0.1:$PORT$path"
  WPID=$SPID
  if [ "$1" = nginx-lua ]; then WPID=$(pgrep -P "$SPID" | head -1); fi
}

cpu1_ticks() { awk '/^cpu1 / {print $2 + $3 + $4 + $7 + $8, $5 + $6}' /proc/stat; } # busy idle
UPW=""   # the upstream's worker (fanout only): its CPU time is read around each run
up_ticks() { if [ -n "$UPW" ]; then cpu_ticks "$UPW"; else echo 0; fi; }

# run_wrk PEER APP CONNS PACE ROUND: one measured run; wrk output in $RUN, CPU figures beside it
run_wrk() {
  f=$RUN/$1-$2-c$3-p$4-r$5
  timeout 60 taskset -c 1 wrk -t1 -c"$3" -d1s "http://127.0.0.1:$PORT$path" > /dev/null 2>&1 || true
  c0=$(cpu_ticks "$WPID")
  s0=$(cpu1_ticks)
  u0=$(up_ticks)
  if [ "$4" = 0 ]; then # unpaced: each server at its own saturation
    timeout 120 taskset -c 1 wrk -t1 -c"$3" -d"$DURATION" --latency \
      "http://127.0.0.1:$PORT$path" > "$f.txt" 2>&1 || true
  else
    timeout 120 taskset -c 1 wrk -t1 -c"$3" -d"$DURATION" --latency -s bench/wrk_paced.lua \
      "http://127.0.0.1:$PORT$path" -- "$4" > "$f.txt" 2>&1 || true
  fi
  c1=$(cpu_ticks "$WPID")
  s1=$(cpu1_ticks)
  u1=$(up_ticks)
  echo "$c0 $c1 $(getconf CLK_TCK) $s0 $s1 $u0 $u1" > "$f.cpu"
}

# all_rounds APP LOADS: every load, ROUNDS rounds, the two servers alternating
all_rounds() {
  for load in $2; do
    r=1
    while [ "$r" -le "$ROUNDS" ]; do
      for peer in nginx-lua moonlet; do
        start_server "$peer" "$1"
        run_wrk "$peer" "$1" "${load%%:*}" "${load#*:}" "$r"
        stop_server
      done
      r=$((r + 1))
    done
  done
}

all_rounds hello "$LOADS"

taskset -c 1 nginx -p "$RUN" -e "$RUN/upstream.error.log" -c "$RUN/upstream.conf" \
  > "$RUN/upstream.log" 2>&1 &
UPID=$!
wait_ok upstream "http://127.0.0.1:$UPORT/a"
UPW=$(pgrep -P "$UPID" | head -1)
all_rounds fanout "$FANOUT_LOADS"
stop_all

OUT=bench/results/equal-load.md
"$PY" - "$RUN" "$LOADS" "$FANOUT_LOADS" "$ROUNDS" "$DURATION" "$DATE" > "$OUT.tmp" <<'PYEOF'
import os, sys
sys.path.insert(0, "scripts")
from wrk_report import NAN, med, parse_wrk
run, loads, fanout_loads, rounds, duration, date = sys.argv[1:7]
rounds = int(rounds)

def parse(base):
    d = parse_wrk(base + ".txt")
    if os.path.exists(base + ".cpu"):
        c0, c1, hz, b0, i0, b1, i1, u0, u1 = (float(x) for x in open(base + ".cpu").read().split())
        if d.get("n"):
            d["us_per_req"] = (c1 - c0) / hz * 1e6 / d["n"]   # the 1 s warm-up is outside c0..c1
            d["cpu1_us"] = (b1 - b0) / hz * 1e6 / d["n"]      # CPU 1's busy time per request
            if u1 > u0:
                d["up_us"] = (u1 - u0) / hz * 1e6 / d["n"]    # of which the upstream's worker
        if (b1 - b0) + (i1 - i0) > 0:
            d["cpu1"] = 100.0 * (b1 - b0) / ((b1 - b0) + (i1 - i0))
    return d

def ratio(a, b):
    return f"{a / b:.2f}" if a == a and b == b and b > 0 else "n/a"

def rows(app, conns, pace):
    return {p: [parse(f"{run}/{p}-{app}-c{conns}-p{pace}-r{r}") for r in range(1, rounds + 1)]
            for p in ("nginx-lua", "moonlet")}

notes = []
print("# moonlet beside nginx+lua at equal load (`make bench`, scripts/bench_equal_load.sh)\n")
print(f"Date: {date}. Each round starts the server on CPU 0, warms it up for 1 s, then runs "
      f"`wrk -t1 -cC -d{duration} --latency -s bench/wrk_paced.lua URL -- PACE` on CPU 1: every "
      f"connection waits PACE ms after each response, so both servers see about the same offered "
      f"load (C / (PACE + latency) req/s) instead of each its own saturation. nginx-lua and moonlet "
      f"alternate; medians of {rounds} round(s). Raw outputs: `{run}`.\n")
def report(app, load, label, cols, by_key):
    """One row per server: req/s, the medians of cols ((key, decimals)), by_key round by round."""
    conns, pace = load.split(":")
    rr = rows(app, conns, pace)
    for peer, xs in rr.items():
        for x in xs:
            if "errors" in x:
                notes.append(f"{app} {peer} at {load}: {x['errors']}")
        g = lambda k: med(x.get(k, NAN) for x in xs)
        by = " / ".join(f"{x.get(by_key, NAN):.2f}" for x in xs)
        print(f"| {label} | {peer} | {g('rps'):.0f} | " + " | ".join(f"{g(k):.{d}f}" for k, d in cols)
              + f" | {by} |")
    return rr

print("## hello: latency\n")
print("| load | server | req/s | p50 ms | p90 ms | p99 ms | p99 by round, ms |")
print("|---|---|---|---|---|---|---|")
for load in loads.split():
    conns, pace = load.split(":")
    rr = report("hello", load, f"{conns} conns, {pace} ms pace", (("p50", 3), ("p90", 3), ("p99", 3)), "p99")
    wins = sum(1 for a, b in zip(rr["moonlet"], rr["nginx-lua"]) if a.get("p99", NAN) <= b.get("p99", NAN))
    m99, n99 = (med(x.get("p99", NAN) for x in rr[p]) for p in ("moonlet", "nginx-lua"))
    notes.append(f"hello, {conns} conns, {pace} ms pace: moonlet's p99 at or below nginx-lua's in {wins} "
                 f"of {rounds} rounds; median p99 moonlet ÷ nginx-lua = {ratio(m99, n99)}.")
print("\n## fanout (upstream at 0 ms): server CPU per fan-out\n")
print("| load | server | req/s | p50 ms | p99 ms | server CPU µs per fan-out | CPU 1 busy % "
      "| CPU 1 µs per fan-out | of which the upstream | µs by round |")
print("|---|---|---|---|---|---|---|---|---|---|")
for load in fanout_loads.split():
    conns, pace = load.split(":")
    label = f"{conns} conns, " + (f"{pace} ms pace" if pace != "0" else "unpaced (saturation)")
    rr = report("fanout", load, label, (("p50", 2), ("p99", 2), ("us_per_req", 1), ("cpu1", 0),
                                        ("cpu1_us", 1), ("up_us", 1)), "us_per_req")
    mu, nu = (med(x.get("us_per_req", NAN) for x in rr[p]) for p in ("moonlet", "nginx-lua"))
    mr, nr = (med(x.get("rps", NAN) for x in rr[p]) for p in ("moonlet", "nginx-lua"))
    notes.append(f"fanout, {label}: fan-outs per server CPU-second, moonlet ÷ nginx-lua = {ratio(nu, mu)}; "
                 f"req/s ratio {ratio(mr, nr)}.")
    if pace == "0":
        # CPU 1 (wrk + the upstream) carries at most 1 s / (its busy time per fan-out) fan-outs a
        # second, whichever server asks: the ceiling of the saturated fan-out, in nginx-lua's rounds
        # and in moonlet's (where the upstream may cost a little more or less per request).
        cn, cm = (med(x.get("cpu1_us", NAN) for x in rr[p]) for p in ("nginx-lua", "moonlet"))
        if cn == cn and cm == cm and nr == nr and nr > 0:
            notes.append(f"fanout, {label}: CPU 1 (wrk + upstream) is busy {cn:.1f} µs per fan-out in "
                         f"nginx-lua's rounds, {cm:.1f} in moonlet's: it carries at most "
                         f"{1e6 / cn:.0f} and {1e6 / cm:.0f} fan-outs/s, {1e6 / cn / nr:.2f}× and "
                         f"{1e6 / cm / nr:.2f}× nginx-lua's {nr:.0f}/s (a 1.2× target needs "
                         f"{1.2 * nr:.0f}/s).")
print()
for n in notes:
    print(f"- {n}")
PYEOF
mv "$OUT.tmp" "$OUT"
echo
echo "================ equal load ================"
cat "$OUT"
