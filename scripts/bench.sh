#!/bin/sh
# scripts/bench.sh: what `make bench` runs. Benchmarks moonlet beside its peers (nginx+lua, i.e.
# OpenResty's engine, nginx static, a raw libuv floor, node) with the shared harness peers.sh
# (../shared/bench/peers.sh, or $BENCH_PEERS; read-only, used in place): server on CPU 0, wrk on CPU 1.
# moonlet serves examples/bench_hello.lua (GET / only, no middleware: the peers' work).
# Then it prints a short summary (moonlet's req/s as a ratio of nginx-lua's, p99 beside nginx-lua's,
# idle RSS, bytes per idle connection) and saves it, with the command line and the date, to
# bench/results/latest.md.
#
# Environment (defaults): BENCH_ONLY (nginx-lua,nginx-static,uvfloor,node), BENCH_ROUNDS (3),
# BENCH_SCENARIOS (hello,pipelined,idle), BENCH_DURATION (5s), BENCH_RUN (/tmp/moonlet-peers: peers.sh's
# scratch folder), BENCH_PEERS (path of peers.sh), BENCH_TIMEOUT (3600: seconds for the whole run).
# Extra arguments are passed to peers.sh as they are (after ours, so they win: e.g. --conns 128).
# Missing peer packages are installed with `peers.sh --install` (apt-get, needs root); peers that
# still lack something are left out of the run with a warning.
set -eu

die() { echo "bench.sh: $*" >&2; exit 2; }
warn() { echo "bench.sh: $*" >&2; }
q() {  # q ARG -> ARG quoted for a shell when it needs it
  case "$1" in
    *[!A-Za-z0-9_./=,:+@%-]* | "") printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")" ;;
    *) printf '%s' "$1" ;;
  esac
}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ -n "${BENCH_PEERS:-}" ]; then
  case "$BENCH_PEERS" in /*) PEERS_SH=$BENCH_PEERS ;; *) PEERS_SH=$(pwd)/$BENCH_PEERS ;; esac
else
  PEERS_SH=../shared/bench/peers.sh      # relative to the repo root (we cd there below)
fi
cd "$ROOT"
[ -f "$PEERS_SH" ] || die "the peer harness peers.sh is not at $PEERS_SH
  (expected ../shared/bench/peers.sh beside the repo, i.e. $(cd .. && pwd)/shared/bench/peers.sh;
   set BENCH_PEERS=/path/to/peers.sh to use another one)"
[ -x build/moonlet ] || die "build/moonlet is missing: run \`make\` first (or \`make bench\`)"
[ -f examples/bench_hello.lua ] || die "examples/bench_hello.lua is missing"
command -v bash >/dev/null || die "peers.sh needs bash"
command -v timeout >/dev/null || die "needs timeout (coreutils)"

ENVLINE=""                               # the BENCH_* settings given, for the record
for v in BENCH_ONLY BENCH_ROUNDS BENCH_SCENARIOS BENCH_DURATION BENCH_RUN BENCH_PEERS BENCH_TIMEOUT; do
  eval "val=\${$v-}"
  [ -z "$val" ] || ENVLINE="$ENVLINE$v=$(q "$val") "
done
ONLY=${BENCH_ONLY:-nginx-lua,nginx-static,uvfloor,node}
ROUNDS=${BENCH_ROUNDS:-3}
SCENARIOS=${BENCH_SCENARIOS:-hello,pipelined,idle}
DURATION=${BENCH_DURATION:-5s}
TOTAL_TIMEOUT=${BENCH_TIMEOUT:-3600}
BENCH_RUN=${BENCH_RUN:-/tmp/moonlet-peers}
export BENCH_RUN
PY=/usr/bin/python3                      # peers.sh writes its report with Debian's python3 too
[ -x "$PY" ] || PY=python3
MOONLET_CMD='./build/moonlet examples/bench_hello.lua --port {PORT} --log-level warn'

# ------------------------------------------------------------ what each peer needs
# tools peers.sh refuses to run without, whatever the peers
missing_tools() {
  m=""
  for t in wrk taskset curl nginx node cc; do command -v "$t" >/dev/null 2>&1 || m="$m $t"; done
  [ -x /usr/bin/python3 ] || m="$m /usr/bin/python3"
  echo "$m"
}
peer_ok() {  # peer_ok NAME -> 0 when what NAME needs is installed
  case "$1" in
    nginx-static) command -v nginx >/dev/null 2>&1 ;;
    nginx-lua) command -v nginx >/dev/null 2>&1 &&
      [ -f /usr/share/nginx/modules/ngx_http_lua_module.so ] &&
      [ -f /usr/share/nginx/modules/ndk_http_module.so ] ;;
    node) command -v node >/dev/null 2>&1 ;;
    uvfloor) printf '#include <uv.h>\n' | timeout 60 cc -E -x c - >/dev/null 2>&1 ;;
    aiohttp | tornado | twisted) timeout 60 /usr/bin/python3 -c "import $1" >/dev/null 2>&1 ;;
    luahttp) timeout 60 luajit -e 'require "http.server"; require "cqueues"' >/dev/null 2>&1 ;;
    *) return 0 ;;                       # unknown to us: let peers.sh judge
  esac
}
missing_peers() {
  m=""
  for p in $(echo "$ONLY" | tr ',' ' '); do peer_ok "$p" || m="$m $p"; done
  echo "$m"
}

if [ -n "$(missing_tools)$(missing_peers)" ]; then
  warn "missing:$(missing_tools)$(missing_peers); installing the peers' packages (peers.sh --install)"
  # --install apt-gets every peer's packages then runs; an empty --only/--scenarios makes the run a no-op.
  if ! timeout --foreground -k 30 1200 bash "$PEERS_SH" --install --only none --scenarios none >/dev/null; then
    warn "peers.sh --install failed (see above); going on with the peers that are installed"
  fi
fi
mt=$(missing_tools)
[ -z "$mt" ] || die "peers.sh needs:$mt (apt-get install as root, see $(dirname "$PEERS_SH")/README.md)"
mp=$(missing_peers)
if [ -n "$mp" ]; then
  keep=""
  for p in $(echo "$ONLY" | tr ',' ' '); do
    case " $mp " in *" $p "*) ;; *) keep="${keep:+$keep,}$p" ;; esac
  done
  warn "leaving out peers whose packages are missing:$mp"
  ONLY=${keep:-none}
fi
case ",$ONLY," in *,nginx-lua,*) ;; *) warn "nginx-lua is not in the run: the ratios will be n/a" ;; esac

# ------------------------------------------------------------ the run
PASS=""
for a in "$@"; do PASS="$PASS $(q "$a")"; done
set -- --only "$ONLY" --scenarios "$SCENARIOS" --rounds "$ROUNDS" --duration "$DURATION" \
  --extra "moonlet=$MOONLET_CMD" "$@"
CMDLINE="bash $(q "$PEERS_SH")"
for a in "$@"; do CMDLINE="$CMDLINE $(q "$a")"; done
if [ -n "${MAKELEVEL:-}" ]; then OUTER="${ENVLINE}make bench"; else OUTER="${ENVLINE}sh scripts/bench.sh$PASS"; fi

mkdir -p "$BENCH_RUN" bench/results
STAMP=$(date +%Y%m%d-%H%M%S)
LOG=$BENCH_RUN/bench-sh-$STAMP.log
RCF=$BENCH_RUN/bench-sh-$STAMP.rc
DATE=$(date -u '+%Y-%m-%d %H:%M UTC')
warn "cd $ROOT && BENCH_RUN=$(q "$BENCH_RUN") $CMDLINE"
warn "(log: $LOG; the whole run is bounded to ${TOTAL_TIMEOUT}s)"
# stdout and stderr of peers.sh go to the terminal and to $LOG; its exit status to $RCF
{
  rc=0
  # --foreground: Ctrl-C reaches peers.sh, and on timeout it gets TERM and stops its servers itself
  timeout --foreground -k 30 "$TOTAL_TIMEOUT" bash "$PEERS_SH" "$@" 2>&1 || rc=$?
  echo "$rc" > "$RCF"
} | tee "$LOG"
rc=$(cat "$RCF" 2>/dev/null || echo 1)
[ "$rc" = 0 ] || die "peers.sh failed (exit $rc$([ "$rc" = 124 ] && echo ": timed out after ${TOTAL_TIMEOUT}s")); log: $LOG"

# peers.sh ends with "results: MD (raw: TSV, wrk outputs and server logs in DIR)"
MD=$(sed -n 's/^\[[0-9:]*\] results: \(.*\) (raw: .*, wrk outputs and server logs in .*)$/\1/p' "$LOG" | tail -1)
TSV=$(sed -n 's/^\[[0-9:]*\] results: .* (raw: \(.*\), wrk outputs and server logs in .*)$/\1/p' "$LOG" | tail -1)
if [ -z "$TSV" ] || [ ! -f "$TSV" ]; then die "cannot find peers.sh's results in its output (log: $LOG)"; fi
JSONL=$(dirname "$TSV")/idle-$(basename "$TSV" .tsv | sed 's/^results-//').jsonl

# ------------------------------------------------------------ the summary
OUT=bench/results/latest.md
TMP_OUT=$OUT.tmp.$$
"$PY" - "$TSV" "$JSONL" "$MD" "$DATE" "$OUTER" \
  "$CMDLINE" "$ROUNDS" > "$TMP_OUT" <<'PYEOF' || { rm -f "$TMP_OUT"; die "the summary failed (raw: $TSV)"; }
import csv, json, os, re, statistics, sys
tsv, jsonl, md, date, outer, cmd, rounds = sys.argv[1:8]
rows = list(csv.DictReader(open(tsv), delimiter="\t"))

def med(xs):
    xs = [float(x) for x in xs if x not in ("", "nan")]
    return statistics.median(xs) if xs else float("nan")

def agg(scen, peer):
    rr = [r for r in rows if r["scenario"] == scen and r["peer"] == peer]
    if not rr:
        return None
    return dict(rps=med(r["rps"] for r in rr), p99=med(r["p99_ms"] for r in rr),
                idle=med(r["idle_rss_kb"] for r in rr),
                rounds=" / ".join(f"{float(r['rps']):.0f}" for r in rr),
                err=sum(int(float(r["errors"] or 0)) for r in rr),
                chk=",".join(sorted(set(r["check"] for r in rr))))

def num(v, fmt):
    return "n/a" if v is None or v != v else format(v, fmt)

def ratio(a, b):
    return f"{a / b:.2f}" if a == a and b == b and a > 0 and b > 0 else "n/a"

scens = []
for r in rows:
    if r["scenario"] not in scens:
        scens.append(r["scenario"])
lines, notes = [], []
lines.append("| metric | moonlet | nginx-lua | moonlet ÷ nginx-lua |")
lines.append("|---|---|---|---|")
for s in scens:
    m, n = agg(s, "moonlet"), agg(s, "nginx-lua")
    if m is None:
        continue
    nr = n["rps"] if n else float("nan")
    lines.append(f"| {s}: req/s | {num(m['rps'], '.0f')} | {num(nr, '.0f')} | **{ratio(m['rps'], nr)}** |")
    if not s.startswith("pipelined"):      # wrk's latency is per batch when pipelined: peers.sh shows n/a
        lines.append(f"| {s}: p99 ms | {num(m['p99'], '.2f')} | {num(n['p99'] if n else None, '.2f')} | |")
    if s == "hello":
        lines.append(f"| idle RSS before load, MiB | {num(m['idle'] / 1024, '.1f')} "
                     f"| {num(n['idle'] / 1024 if n else None, '.1f')} | |")
    if int(rounds) > 1:
        notes.append(f"{s} req/s by round: moonlet {m['rounds']}" + (f"; nginx-lua {n['rounds']}" if n else ""))
    if m["chk"] != "ok" or m["err"]:
        notes.append(f"**{s}: moonlet check = {m['chk']}, errors = {m['err']}**")
    if n and (n["chk"] != "ok" or n["err"]):
        notes.append(f"{s}: nginx-lua check = {n['chk']}, errors = {n['err']}")
idle = {}
if os.path.exists(jsonl):
    for l in open(jsonl):
        if l.strip():
            e = json.loads(l)
            idle[e["peer"]] = e["result"]
if "moonlet" in idle:
    m, n = idle["moonlet"], idle.get("nginx-lua", {})
    def g(r, k):
        return r.get(k) if isinstance(r, dict) and "error" not in r else None
    if "error" in m:
        notes.append(f"**idle: moonlet error: {m['error']}**")
    conns = g(m, "n") or "?"
    lines.append(f"| idle: bytes per connection ({conns} open, no request) "
                 f"| {num(g(m, 'per_conn_connected_b'), '.0f')} | {num(g(n, 'per_conn_connected_b'), '.0f')} | |")
    lines.append(f"| idle: bytes per connection (after 1 request each) "
                 f"| {num(g(m, 'per_conn_after_req_b'), '.0f')} | {num(g(n, 'per_conn_after_req_b'), '.0f')} | |")
    if g(m, "open") is not None and g(m, "open") != g(m, "n"):
        notes.append(f"**idle: moonlet kept {m['open']} of {m['n']} connections open**")

host = ""
if md and os.path.exists(md):
    full = open(md).read()
    first = full.split("\n", 1)[0]
    host = first[len("Run: "):].rstrip(" .") if first.startswith("Run: ") else ""
else:
    full = ""
busy = re.search(r"before/after the run.*?: CPU0 (\d+)%/(\d+)%, CPU1 (\d+)%/(\d+)%", host)
if busy and max(int(x) for x in busy.groups()) > 20:
    notes.append("**Other tenants kept the CPUs busy around the run (CPU0 %s%%/%s%%, CPU1 %s%%/%s%% before/after): "
                 "the numbers are noisy, rerun on a quiet machine before citing them.**" % busy.groups())
print("# moonlet beside nginx+lua (`make bench`)\n")
print(f"Date: {date}.  ")
print(f"Command (from the repo root): `{outer}`, which ran  ")
print(f"`{cmd}`  ")
print(f"Raw results: `{tsv}`" + (f", `{jsonl}`" if os.path.exists(jsonl) else "") + ".\n")
if host:
    print(f"Host: {host}.\n")
print(f"Server on CPU 0, wrk on CPU 1 (2 vCPUs, shared machine: only ratios within one run mean anything); "
      f"median of {rounds} round(s). moonlet serves examples/bench_hello.lua (GET / only, no middleware).\n")
print("\n".join(lines))
print()
for x in notes:
    print(f"- {x}")
if notes:
    print()
if full:
    print("## Every peer (peers.sh's tables)\n")
    print(full.rstrip())
PYEOF
mv "$TMP_OUT" "$OUT"
echo
echo "================ moonlet summary ================"
sed '/^## Every peer/,$d' "$OUT"
echo "saved to $ROOT/$OUT (with every peer's tables)"
